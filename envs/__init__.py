"""Gymnasium environments for bit allocation (registered as ``bitalloc/BitAlloc-v0``).

``gymnasium.make("bitalloc/BitAlloc-v0", tables=[...])`` builds :class:`envs.bitalloc_env.BitAllocEnv`;
the observation is documented in ``envs/FEATURES.md``, the reward in :mod:`envs.reward`.
"""

from __future__ import annotations

import gymnasium

from envs.bitalloc_env import BitAllocEnv
from envs.observation import OBSERVATION_VERSION, FeatureNormalization
from envs.reward import RewardConfig

ENV_ID = "bitalloc/BitAlloc-v0"

if ENV_ID not in gymnasium.registry:  # importing twice (reloads, notebooks) must not re-register
    gymnasium.register(id=ENV_ID, entry_point="envs.bitalloc_env:BitAllocEnv")

__all__ = ["ENV_ID", "OBSERVATION_VERSION", "BitAllocEnv", "FeatureNormalization", "RewardConfig"]
