"""Reasoning data: rationale teachers (RUPR, direct), ORFT filtering, the ablation.

`teachers` (the grounded attribute teacher) and `lm_teacher` (any decoder
of this codebase) write k candidate rationales per (user, history, target);
`data` turns them into `[prompt] <think> z </think> <answer> SID </answer>`
rows; `orft` scores each by the perplexity of the target's SID tokens given
[prompt, rationale] and keeps those below a quantile threshold; `ablation`
runs the paper's no-CoT / direct / RUPR / RUPR + ORFT comparison.
Decoding with reasoning is `taiji_jax.generate.think`.
"""
