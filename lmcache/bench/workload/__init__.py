"""`python -m lmcache bench workload`: real vLLM serving workloads (cli.py is the entry)."""
