"""A tiny prefill/decode proxy: each completion request goes first to the prefiller
with max_tokens=1 (it computes the prompt's KV and stores it in the shared tier), then
to the decoder, whose answer (streamed or not) is returned to the client.

    python disagg_proxy_server.py --port 1000 --prefiller-port 1100 --decoder-port 1200
"""

import argparse
import os
from contextlib import asynccontextmanager

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=1000)
    parser.add_argument("--prefiller-host", default="localhost")
    parser.add_argument("--prefiller-port", type=int, default=1100)
    parser.add_argument("--decoder-host", default="localhost")
    parser.add_argument("--decoder-port", type=int, default=1200)
    return parser.parse_args()


ARGS = parse_args() if __name__ == "__main__" else None


@asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.prefiller = httpx.AsyncClient(
        base_url=f"http://{ARGS.prefiller_host}:{ARGS.prefiller_port}/v1", timeout=None)
    app.state.decoder = httpx.AsyncClient(
        base_url=f"http://{ARGS.decoder_host}:{ARGS.decoder_port}/v1", timeout=None)
    yield
    await app.state.prefiller.aclose()
    await app.state.decoder.aclose()


app = FastAPI(lifespan=lifespan)


def headers() -> dict:
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


async def prefill(endpoint: str, body: dict) -> None:
    """Only the prompt's KV matters here: one token is enough."""
    body = dict(body, max_tokens=1, stream=False)
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = 1
    body.pop("stream_options", None)
    response = await app.state.prefiller.post(endpoint, json=body, headers=headers())
    response.raise_for_status()


async def decode(endpoint: str, body: dict):
    if not body.get("stream"):
        response = await app.state.decoder.post(endpoint, json=body, headers=headers())
        return JSONResponse(response.json(), status_code=response.status_code)

    async def chunks():
        async with app.state.decoder.stream("POST", endpoint, json=body, headers=headers()) as response:
            async for chunk in response.aiter_bytes():
                yield chunk

    return StreamingResponse(chunks(), media_type="text/event-stream")


async def prefill_then_decode(endpoint: str, request: Request):
    body = await request.json()
    await prefill(endpoint, body)
    return await decode(endpoint, body)


@app.post("/v1/completions")
async def completions(request: Request):
    return await prefill_then_decode("/completions", request)


@app.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await prefill_then_decode("/chat/completions", request)


if __name__ == "__main__":
    uvicorn.run(app, host=ARGS.host, port=ARGS.port)
