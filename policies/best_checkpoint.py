"""A training run's best checkpoint: ``best_policy.zip`` (+ its sidecar) and ``best.json`` beside it.

The best is the checkpoint with the lowest score (:func:`policies.sac.policy_score`), kept as SB3's
EvalCallback keeps a best model. Both ways a run gets one write it here, so they agree on the files
and on when a score replaces the recorded one: the training callback of :func:`policies.sac.train`,
and :func:`policies.selection.select_best` for a run trained before that callback existed.

``best.json`` holds ``steps`` and ``score`` of the kept checkpoint and the ``budgets`` it was scored
at (plus whatever notes its writer adds, e.g. ``chosen_after_training``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from allocator.storage import write_json

BEST_FILE = "best_policy.zip"
BEST_RECORD = "best.json"


def read_best(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``best.json``, or None where there is none (or it cannot be read: then the next
    checkpoint scored replaces it)."""
    try:
        record = json.loads((Path(run_dir) / BEST_RECORD).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def keep_if_better(run_dir: Path, steps: int, score: float, budgets: Sequence[float], write_policy: Callable[[Path], Any],
                   **notes: Any) -> bool:
    """Make the checkpoint at ``steps`` the run's best when ``score`` is below the recorded best's
    (or none is recorded, or its zip is missing): ``write_policy(path)`` writes the policy artifact to
    ``path``, then ``best.json`` records it (with ``notes``). Returns whether it was kept."""
    run_dir = Path(run_dir)
    recorded = (read_best(run_dir) or {}).get("score")
    if isinstance(recorded, (int, float)) and (run_dir / BEST_FILE).is_file() and not score < recorded:
        return False
    write_policy(run_dir / BEST_FILE)  # the artifact first: a record always names a written zip
    write_json(run_dir / BEST_RECORD, {"steps": steps, "score": score, "budgets": list(budgets), **notes})
    return True
