"""Where bitalloc keeps cached artifacts, how it writes files atomically, and the checks that an
input or output path is usable before any work starts."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from allocator.errors import BitallocError

CACHE_ENV = "BITALLOC_CACHE"

DEFAULT_NAME_MAX = 255
"""Longest file name (bytes) where the file system does not say (Linux and macOS both allow 255)."""
DEFAULT_PATH_MAX = 4096
"""Longest path (bytes, with its terminating NUL) where the file system does not say (Linux's)."""
SHOWN_PATH_CHARS = 120
"""Paths longer than this are shortened in messages, so that an error stays one readable line."""


def cache_dir(*parts: str) -> Path:
    """``$BITALLOC_CACHE`` (default ``~/.cache/bitalloc``) joined with ``parts``, created."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "bitalloc")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- messages ---------------------------------------------------------------------------------


def shown(path: Path | str) -> str:
    """``path`` for a one-line message: as given, or its start and end around an ellipsis when long."""
    text = str(path)
    if len(text) <= SHOWN_PATH_CHARS:
        return text
    return f"{text[:60]}...{text[-40:]} ({len(text)} characters)"


def os_error_line(exc: OSError) -> str:
    """An OSError in one line: its reason and the (shortened) paths it names."""
    reason = exc.strerror or type(exc).__name__
    paths = [shown(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{reason}: {' -> '.join(paths)}" if paths else reason


# -- checking paths ---------------------------------------------------------------------------


def path_stat(path: Path, what: str) -> os.stat_result | None:
    """``os.stat(path)``, or None when nothing is there; a path the system cannot even look up (a name
    too long, a directory it may not search) is a one-line :class:`BitallocError` naming ``what``."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise BitallocError(f"{what} {shown(path)}: {exc.strerror or type(exc).__name__}") from None


def is_dir(path: Path, what: str) -> bool:
    """Whether ``path`` is a directory (see :func:`path_stat` for what is refused)."""
    status = path_stat(path, what)
    return status is not None and stat.S_ISDIR(status.st_mode)


def is_file(path: Path, what: str) -> bool:
    """Whether ``path`` is a regular file (or a link to one; see :func:`path_stat` for what is refused)."""
    status = path_stat(path, what)
    return status is not None and stat.S_ISREG(status.st_mode)


def _nearest_existing(path: Path, what: str) -> Path:
    """``path`` or its closest ancestor that exists (``.`` for a relative path with none)."""
    for candidate in (path, *path.parents):
        if path_stat(candidate, what) is not None:
            return candidate
    return Path(".")


def _limit(directory: Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(directory, name))
    except (OSError, ValueError):
        return default


def check_path_length(path: Path, what: str) -> None:
    """Refuse a path whose file names or whole length the file system cannot hold (ENAMETOOLONG)."""
    try:  # where to ask for the limits: the closest ancestor the system can look up
        anchor = _nearest_existing(Path(path).absolute().parent, what)
    except BitallocError:
        anchor = Path(Path(path).absolute().anchor)
    name_max = _limit(anchor, "PC_NAME_MAX", DEFAULT_NAME_MAX)
    for part in Path(path).parts:
        if len(os.fsencode(part)) > name_max:
            raise BitallocError(f"{what} {shown(path)}: File name too long (a name of {len(os.fsencode(part))} bytes, "
                                f"the file system allows {name_max})")
    path_max = _limit(anchor, "PC_PATH_MAX", DEFAULT_PATH_MAX)
    length = len(os.fsencode(str(Path(path).absolute())))
    if length >= path_max:
        raise BitallocError(f"{what} {shown(path)}: File name too long (the path is {length} bytes, the file system allows {path_max - 1})")


def _temp_prefix(target: Path) -> str:
    # bounded, so that the temporary name of a target whose name is near the limit still fits
    return f".{target.name[:48]}."


def _probe_writable(directory: Path, target: Path, what: str) -> None:
    """Create and remove in ``directory`` the temporary directory :func:`atomic_path` would create there."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=directory))
    except OSError as exc:
        raise BitallocError(f"{what} {shown(target)}: cannot write in {shown(directory)}: {exc.strerror or type(exc).__name__}") from None


def check_output_file(target: Path, what: str, make_parents: bool = False) -> None:
    """Refuse, in one line and before any work, a file output that could not be written where asked:
    a name or path too long, a directory where the file should be, a parent directory that is missing
    (unless ``make_parents``) or not a directory, or one bitalloc may not create files in."""
    target = Path(target)
    check_path_length(target, what)
    if is_dir(target, what):
        raise BitallocError(f"{what} {shown(target)} is a directory; give a file name")
    parent = target.parent
    status = path_stat(parent, what)
    if status is None:
        if not make_parents:
            raise BitallocError(f"{what}: directory {shown(parent)} does not exist")
        _check_creatable(parent, target, what)
    elif not stat.S_ISDIR(status.st_mode):
        raise BitallocError(f"{what}: {shown(parent)} is not a directory")
    else:
        _probe_writable(parent, target, what)


def check_output_dir(target: Path, what: str, files: Iterable[str] = ()) -> None:
    """Refuse, in one line and before any work, a directory output that could not be written: a name
    or path too long, an existing file where the directory should be, an existing directory bitalloc
    may not write in, or a missing one that cannot be created (its closest existing ancestor is not
    a writable directory). ``files``: names bitalloc will write inside it, none of which may be a
    directory already."""
    target = Path(target)
    check_path_length(target, what)
    status = path_stat(target, what)
    if status is None:
        _check_creatable(target, target, what)
        return
    if not stat.S_ISDIR(status.st_mode):
        raise BitallocError(f"{what} {shown(target)} exists and is not a directory")
    for name in files:
        if is_dir(target / name, what):
            raise BitallocError(f"{what}: {shown(target / name)} is a directory, where bitalloc writes a file")
    _probe_writable(target, target / ".probe", what)


def _check_creatable(directory: Path, target: Path, what: str) -> None:
    """``directory`` does not exist: its closest existing ancestor must be a directory bitalloc may write in."""
    anchor = _nearest_existing(directory, what)
    if not is_dir(anchor, what):
        raise BitallocError(f"{what} {shown(target)}: {shown(anchor)} is not a directory")
    _probe_writable(anchor, target, what)


# -- writing ----------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success move it to ``target``.

    A file is renamed over ``target``. A directory is renamed onto a missing or empty ``target``;
    into an existing non-empty one each entry it holds is renamed over its namesake, so files in
    ``target`` that bitalloc did not write stay where they are (callers decide whether such a
    directory may be written into at all). Nothing is ever deleted but the temporary path.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent)) / target.name
    try:
        yield tmp
        if tmp.is_dir() and target.is_dir() and any(target.iterdir()):
            _move_entries(tmp, target)
        elif target.is_dir() and not tmp.is_dir():
            raise BitallocError(f"{shown(target)} is a directory; not replacing it with a file")
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def _move_entries(source: Path, target: Path) -> None:
    """Rename every entry of ``source`` over its namesake in ``target`` (merging subdirectories)."""
    for entry in sorted(source.iterdir()):
        destination = target / entry.name
        if entry.is_dir() and destination.is_dir() and any(destination.iterdir()):
            _move_entries(entry, destination)
        else:
            try:
                os.replace(entry, destination)
            except OSError as exc:
                if exc.errno not in (errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY):
                    raise
                raise BitallocError(f"cannot put {entry.name} into {shown(target)}: {shown(destination)} is in the way") from None


def write_json(target: Path, data: Any) -> None:
    with atomic_path(Path(target)) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, what: str) -> Any:
    """The JSON value in ``path``; a missing, unreadable, malformed or absurdly nested file is a
    one-line :class:`BitallocError` that starts with ``what``."""
    path = Path(path)
    if not is_file(path, what):
        raise BitallocError(f"no {what} at {shown(path)}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BitallocError(f"cannot read {what} {shown(path)}: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise BitallocError(f"cannot read {what} {shown(path)}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise BitallocError(f"cannot read {what} {shown(path)}: {str(exc).splitlines()[0]}") from None
    except RecursionError:  # json's decoder recurses once per nesting level
        raise BitallocError(f"cannot read {what} {shown(path)}: nested too deeply to be a {what}") from None
