"""Policies shipped with the package, usable by name: ``bitalloc solve --policy smollm2-135m-sac``.

Each shipped policy is a pair ``<name>.zip`` + ``<name>.json`` in this directory: the SB3 zip and
its sidecar exactly as :func:`policies.sac.train` wrote them (``policy.zip`` / ``policy.json`` of a
run directory, renamed), so loading one goes through the same checks as any policy file
(:func:`policies.artifact.load_policy`: sidecar, hash, feature schema; no unpickling).
:func:`policies.shipping.ship_policy` copies a policy here (``python benchmarks/policy.py --ship``
ships the SmolLM2-trained policy of that benchmark).

:func:`resolve` turns what a user typed into a path: an existing file (or a run directory holding
``policy.zip``), anything that looks like a path (ends in ``.zip`` or has a separator), or else the
name of a shipped policy; an unknown name is a one-line :class:`~allocator.errors.BitallocError`
that lists the shipped names.
"""

from __future__ import annotations

import os
from pathlib import Path

from allocator.errors import BitallocError
from allocator.storage import is_dir, is_file, path_stat

PRETRAINED_DIR = Path(__file__).resolve().parent
"""Where the shipped policies live (read at call time, so tests can point it elsewhere)."""

POLICY_FILE = "policy.zip"


def shipped(directory: Path | None = None) -> list[str]:
    """Names of the shipped policies (a ``<name>.zip`` with its ``<name>.json`` sidecar), sorted."""
    directory = Path(directory or PRETRAINED_DIR)
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.zip") if p.with_suffix(".json").is_file())


def shipped_path(name: str, directory: Path | None = None) -> Path:
    """The zip of the shipped policy ``name``; a one-line error listing the shipped names otherwise."""
    directory = Path(directory or PRETRAINED_DIR)
    names = shipped(directory)
    if name not in names:
        listed = ", ".join(names) if names else "none are shipped in this installation"
        raise BitallocError(f"unknown policy {name!r}: not a file, and not a shipped policy (shipped: {listed})")
    return directory / f"{name}.zip"


def resolve(spec: str | os.PathLike[str]) -> Path:
    """A policy zip path from a path, a run directory or a shipped name (see the module doc)."""
    text = os.fspath(spec)
    path = Path(text)
    # a path the system cannot look up (a name too long, ...) is refused here in one line
    if is_dir(path, "--policy") and is_file(path / POLICY_FILE, "--policy"):
        return path / POLICY_FILE
    if path_stat(path, "--policy") is not None or path.suffix == ".zip" or os.sep in text or (os.altsep and os.altsep in text):
        return path  # a path: load_policy reports a missing or bad file itself
    return shipped_path(text)


def load(spec: str | os.PathLike[str]):  # -> policies.artifact.LoadedPolicy
    """Load a policy by path or shipped name (:func:`resolve`, then :func:`policies.artifact.load_policy`)."""
    from policies.artifact import load_policy

    return load_policy(resolve(spec))


__all__ = ["PRETRAINED_DIR", "shipped", "shipped_path", "resolve", "load"]
