"""The output checks every command runs before any work starts (before a model loads).

Every ``--out``/``--json`` goes through one of these, so that a path bitalloc could not write (a
missing or read-only directory, a directory where a file belongs or a file where a directory belongs,
a name too long for the file system, a place like ``/proc``) is refused in one line and exit code 2,
instead of failing after minutes of profiling, quantizing or evaluating. The checks themselves live in
:mod:`allocator.storage` (beside :func:`~allocator.storage.atomic_path`, which does the writing).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def output_file(path: Path | None, flag: str) -> None:
    """A file ``flag`` writes (its directory must exist): see :func:`allocator.storage.check_output_file`."""
    from allocator.storage import check_output_file

    if path is not None:
        check_output_file(path, flag)


def output_dir(path: Path | None, flag: str, files: Iterable[str] = ()) -> None:
    """A directory ``flag`` writes ``files`` into (created with its parents when missing): see
    :func:`allocator.storage.check_output_dir`."""
    from allocator.storage import check_output_dir

    if path is not None:
        check_output_dir(path, flag, files)


def packed_output(path: Path | None, flag: str) -> None:
    """A packed model directory: see :func:`allocator.runtime.packed.check_packed_target`."""
    from allocator.runtime.packed import check_packed_target

    if path is not None:
        check_packed_target(path, flag)
