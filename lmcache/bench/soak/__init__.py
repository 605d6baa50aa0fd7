"""`python -m lmcache bench soak`: hours of mixed load with faults (cli.py is the entry)."""
