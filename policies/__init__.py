"""Allocation policies: SAC training (:mod:`policies.sac`), the policy artifact
(:mod:`policies.artifact`) and zero-shot application to a new model (:mod:`policies.apply`).

Submodules import stable-baselines3 and torch on use; importing this package is cheap.
"""
