"""Which policy a finished training run hands on: its best checkpoint.

:func:`select_best` returns the run's ``best_policy.zip`` (:mod:`policies.best_checkpoint`). A run
trained before :func:`policies.sac.train` kept one gets it here, scored as the training callback
scores: :func:`policies.sac.policy_score` on the run's own tables, at the budgets and with the
constraints, reward and action mapping its sidecar records. The candidates are the checkpoints and
the final policy, which stands for the checkpoint of its step count (it also has the updates SB3
makes after the last checkpoint); the lowest score wins, the earlier one on a tie.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from allocator.errors import BitallocError
from allocator.table.sensitivity import SensitivityTable
from envs.bitalloc_env import BitAllocEnv
from policies.artifact import constraints_from_dict, load_policy, read_card, sidecar_path, table_record
from policies.best_checkpoint import BEST_FILE, BEST_RECORD, keep_if_better
from policies.sac import CHECKPOINT_PREFIX, CHECKPOINTS, POLICY_FILE, eval_budgets, policy_score
from policies.shipping import copy_artifact

log = logging.getLogger(__name__)

_CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}_(\d+)_steps\.zip", re.ASCII)


def checkpoint_steps(path: Path) -> int | None:
    """The step count in a checkpoint's file name (``sac_<N>_steps.zip``), or None for another name."""
    match = _CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_zips(run_dir: Path) -> list[tuple[int, Path]]:
    """(steps, zip) of every checkpoint of the run that has a sidecar, and of its final policy (which
    stands for the checkpoint of its step count), ordered by steps."""
    run_dir = Path(run_dir)
    found: dict[int, Path] = {}
    for path in (run_dir / CHECKPOINTS).glob(f"{CHECKPOINT_PREFIX}_*_steps.zip"):
        steps = checkpoint_steps(path)
        if steps is not None and sidecar_path(path).is_file():
            found[steps] = path
    final = run_dir / POLICY_FILE
    if final.is_file():
        found[read_card(final).timesteps] = final
    return sorted(found.items())


def select_best(run_dir: Path, tables: Sequence[SensitivityTable]) -> Path:
    """The run's best checkpoint (``best_policy.zip``), chosen now over its checkpoints where the run
    has none yet (see the module doc); ``tables`` are the tables it was trained on, in order."""
    run_dir = Path(run_dir)
    best = run_dir / BEST_FILE
    if best.is_file() and (run_dir / BEST_RECORD).is_file():
        return best
    card = read_card(run_dir / POLICY_FILE)
    if [table_record(t)["table_key"] for t in tables] != [m.get("table_key") for m in card.models]:
        raise BitallocError(f"{run_dir} was trained on other tables than these; its checkpoints are scored on its own")
    env = BitAllocEnv(list(tables), bpw_range=card.bpw_range, constraints=constraints_from_dict(card.constraints), reward=card.reward,
                      normalization=card.normalization, action_mapping=card.action_mapping)
    budgets = eval_budgets(card.bpw_range)
    # the actor alone (load_policy: no unpickling) acts as the training model's predict() did
    scores = {steps: (policy_score(load_policy(path).policy, env, budgets), path) for steps, path in checkpoint_zips(run_dir)}
    steps = min(scores, key=lambda k: (scores[k][0], k))
    score, path = scores[steps]
    keep_if_better(run_dir, steps, score, budgets, lambda target: copy_artifact(path, target), chosen_after_training=True)
    log.info("best checkpoint of %s chosen after training: %d steps (score %.4f)", run_dir, steps, score)
    return best
