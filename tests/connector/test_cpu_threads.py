"""Helper threads for host copies run on every CPU of the process, not only their creator's."""

import os
import threading

import pytest

from lmcache.v1.gpu_connector.cpu.threads import process_cpus, widen_affinity

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux CPU affinity only")


def test_a_thread_pinned_to_one_cpu_is_widened_to_the_process_cpus():
    cpus = process_cpus()
    if len(cpus) < 2:
        pytest.skip(f"this process may use only {sorted(cpus)}: nothing to widen to")
    seen = {}

    def pinned_like_vllm_main_thread():
        os.sched_setaffinity(0, {min(cpus)})  # what OpenMP binding does to vLLM's CPU worker thread
        seen["before"] = os.sched_getaffinity(0)
        widen_affinity()
        seen["after"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=pinned_like_vllm_main_thread)
    thread.start()
    thread.join()
    assert seen["before"] == {min(cpus)}
    assert seen["after"] == cpus
