"""Names of upstream LMCache's multi-process mode that vLLM imports at start-up.

This package runs LMCache inside vLLM's processes; it has no separate LMCache server.
See lmcache.integration.vllm.vllm_multi_process_adapter.
"""
