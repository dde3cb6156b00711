"""Allocation policies: SAC training (:mod:`policies.sac`), the policy artifact and its checks
(:mod:`policies.artifact`), checkpoints' replay buffers as plain arrays (:mod:`policies.replay_buffer`)
and zero-shot application to a new model (:mod:`policies.apply`). Nothing read from a policy or a
run directory is ever unpickled.

Submodules import stable-baselines3 and torch on use; importing this package is cheap.
"""
