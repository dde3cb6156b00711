"""Copying a policy artifact (the zip and its sidecar, byte for byte) to where it is used: a run's
best checkpoint, or the shipped policies of :mod:`policies.pretrained` (``bitalloc solve --policy <name>``).

A copy is the artifact unchanged, so the sidecar's hash still matches and a shipped policy loads
through the same checks as any policy file (:func:`policies.artifact.load_policy`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import policies.pretrained as pretrained
from allocator.errors import BitallocError
from policies.artifact import load_policy, sidecar_path


def copy_artifact(source: Path, target: Path) -> Path:
    """Copy the policy ``source`` (a .zip with its sidecar) to ``target`` (a .zip path) and its sidecar beside it."""
    source, target = Path(source), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sidecar_path(source), sidecar_path(target))
    shutil.copyfile(source, target)
    return target


def ship_policy(source: Path, name: str, directory: Path | None = None) -> Path:
    """Ship the policy ``source`` as ``<name>.zip`` + ``<name>.json`` in ``directory`` (default: the
    package's pretrained directory, :data:`policies.pretrained.PRETRAINED_DIR`), and check the copy
    loads. Returns the shipped zip."""
    # a name that resolve() would take for a path could never be used by name
    if name in ("", ".", "..") or Path(name).name != name or name.endswith(".zip") or (os.altsep and os.altsep in name):
        raise BitallocError(f"a shipped policy's name is a plain file name without .zip, got {name!r}")
    target = copy_artifact(source, Path(directory or pretrained.PRETRAINED_DIR) / f"{name}.zip")  # read now: tests move it
    load_policy(target)  # sidecar and hash still match
    return target
