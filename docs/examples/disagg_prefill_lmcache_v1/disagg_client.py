"""Sends one completion through the prefill/decode proxy and prints the answer.

    python disagg_client.py --port 1000 --model meta-llama/Llama-3.1-8B-Instruct
"""

import argparse

import httpx

DEFAULT_PROMPT = (
    "LMCache stores the KV cache of a prompt so that a later request, in this process or "
    "another, starts from it instead of recomputing it. "
) * 24


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=1000)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=20)
    args = parser.parse_args()
    body = {"model": args.model, "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0}
    response = httpx.post(f"http://localhost:{args.port}/v1/completions", json=body, timeout=600)
    response.raise_for_status()
    print(f"Generated text: {response.json()['choices'][0]['text']!r}")


if __name__ == "__main__":
    main()
