"""Metrics and events: vLLM's connector stats, Prometheus series, KV events, the workers'
figures (answered over the lookup channel) and the worker_stats tools for users."""
