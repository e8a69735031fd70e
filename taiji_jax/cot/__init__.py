"""Reasoning data: rationale teachers (RUPR, direct) and ORFT filtering.

`teachers` writes k candidate rationales per (user, history, target);
`orft` scores each by the perplexity of the target's SID tokens given
[prompt, rationale] and keeps those below a quantile threshold.
"""
