"""`python -m lmcache doctor`: checks a setup and says, per check, OK / WARN / FAIL, what it
saw and the fix. Groups, one module each: device, vllm_setup, config_check, tiers (with
lm_health), keys; report.py prints. Exit code 0 ok, 1 warnings, 2 failures."""
