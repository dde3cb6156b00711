"""The measure stage: what a model's layers cost and how sensitive they are (the profile, per-layer
features, single-layer KL, the option-weight cache)."""
