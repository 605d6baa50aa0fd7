"""How close two runs' outputs must be (demo, soak and the e2e tests all compare by these).

Outputs are compared by the generated tokens and their top log-probabilities: a random
model's greedy tokens alone say little.
"""

# bf16 KV and bf16 matmuls: the same prompt split into other steps or batched with other
# prompts moves a log-probability by up to ~0.03 here (kernels differ by CPU instruction
# set). Wrong KV moves them by far more: a corrupted load changes the generated tokens,
# and a wrong prefix shifts top log-probabilities by > 1.
LOGPROB_TOLERANCE = 0.1

# LMCache's hit and vLLM's own prefix-cache hit, split at the same token and fed the same
# stored KV, run the very same computation: their outputs must be identical.
EXACT_TOLERANCE = 1e-4
