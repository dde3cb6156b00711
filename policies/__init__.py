"""Allocation policies: SAC training (:mod:`policies.sac`), the policy artifact
(:mod:`policies.artifact`), zero-shot application to a new model (:mod:`policies.apply`), a run's
best checkpoint and its selection (:mod:`policies.best_checkpoint`, :mod:`policies.selection`), and
shipping a policy (:mod:`policies.shipping`, into :mod:`policies.pretrained`).

Submodules import stable-baselines3 and torch on use; importing this package is cheap.
"""
