"""Helpers shared by the tests: model and vLLM objects, process launchers, KV layouts,
workloads. Nothing here is collected as a test."""
