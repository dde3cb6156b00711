"""A SAC replay buffer on disk as plain arrays (``.npz``), never as a pickle.

stable-baselines3's ``save_replay_buffer`` pickles the whole buffer object, and loading a pickle
runs whatever code it names: anyone who can write a run directory could make ``--resume`` execute
code. Here a checkpoint's buffer is the arrays alone (:data:`ARRAYS` plus ``pos`` and ``full``),
written with :func:`numpy.savez` and read back with pickling disabled into a buffer that trusted code
built for the run's own spaces and size. Every member's header (shape, dtype, layout) is checked
before its data is read, so a file can neither run code nor make us allocate more than the buffer
holds; values are checked against the spaces (finite, inside the observation and action bounds,
done flags 0 or 1).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from allocator.errors import BitallocError
from allocator.storage import atomic_path

if TYPE_CHECKING:
    from stable_baselines3.common.buffers import ReplayBuffer

SUFFIX = ".npz"
ARRAYS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")
"""The per-transition arrays stored, each cut to the filled part of the buffer."""
SCALARS = {"pos": np.dtype(np.int64), "full": np.dtype(np.bool_)}
BOUND_SLACK = 1e-5
"""Float rounding allowed beyond a space's bounds."""


def _filled(buffer: ReplayBuffer) -> int:
    return buffer.buffer_size if buffer.full else buffer.pos


def _check_buffer(buffer: ReplayBuffer) -> None:
    # the layout stored here is that of a plain ReplayBuffer that keeps next_observations
    from gymnasium import spaces

    if buffer.optimize_memory_usage or type(buffer).__name__ != "ReplayBuffer" or not all(
        isinstance(space, spaces.Box) for space in (buffer.observation_space, buffer.action_space)
    ):
        raise BitallocError(f"only a plain ReplayBuffer over Box spaces is stored as arrays, not a {type(buffer).__name__} "
                            f"(optimize_memory_usage={buffer.optimize_memory_usage})")


def save_replay_buffer(buffer: ReplayBuffer, path: Path) -> Path:
    """Write the filled part of ``buffer`` to ``path`` (``.npz``, atomically)."""
    _check_buffer(buffer)
    path = Path(path)
    if path.suffix != SUFFIX:
        raise BitallocError(f"a replay buffer file must end in {SUFFIX}, got {path}")
    count = _filled(buffer)
    arrays: dict[str, Any] = {name: getattr(buffer, name)[:count] for name in ARRAYS}
    arrays["pos"] = np.asarray(buffer.pos, dtype=SCALARS["pos"])
    arrays["full"] = np.asarray(buffer.full, dtype=SCALARS["full"])
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)  # uncompressed, members stamped 1980-01-01: the same arrays give the same bytes
    return path


def _header(archive: zipfile.ZipFile, member: str, source: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of one ``.npy`` member, read without its data."""
    with archive.open(member) as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(handle)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(handle)
    raise BitallocError(f"{source}: {member} has .npy format version {version}, this code reads 1.0 and 2.0")


def load_replay_buffer(buffer: ReplayBuffer, path: Path) -> None:
    """Fill ``buffer`` (built by trusted code for the run's spaces and buffer size) from ``path``.

    Refuses with a one-line :class:`BitallocError` anything but exactly the arrays
    :func:`save_replay_buffer` writes, in the shapes and dtypes of ``buffer``, with values inside
    its spaces. Nothing is unpickled (``allow_pickle=False``; object arrays are refused by dtype
    before that).
    """
    _check_buffer(buffer)
    path = Path(path)
    source = str(path)
    if path.suffix != SUFFIX:
        raise BitallocError(f"{source}: not a {SUFFIX} replay buffer; pickled buffers (.pkl) are never loaded")
    per_step = {
        "observations": ((buffer.n_envs, *buffer.obs_shape), buffer.observations.dtype),
        "next_observations": ((buffer.n_envs, *buffer.obs_shape), buffer.next_observations.dtype),
        "actions": ((buffer.n_envs, buffer.action_dim), buffer.actions.dtype),
        "rewards": ((buffer.n_envs,), buffer.rewards.dtype),
        "dones": ((buffer.n_envs,), buffer.dones.dtype),
        "timeouts": ((buffer.n_envs,), buffer.timeouts.dtype),
    }
    try:
        with zipfile.ZipFile(path) as archive:
            members = sorted(archive.namelist())
            expected = sorted(f"{name}.npy" for name in (*ARRAYS, *SCALARS))
            if members != expected:
                extra = sorted(set(members) - set(expected)) or sorted(set(expected) - set(members))
                raise BitallocError(f"{source}: holds {members[:8]}, a replay buffer holds exactly {expected} ({extra[0]!r} differs)")
            count: int | None = None
            for name, (tail, dtype) in per_step.items():
                shape, fortran, found = _header(archive, f"{name}.npy", source)
                if count is None and len(shape) == len(tail) + 1:
                    count = shape[0]
                if fortran or found != dtype or shape != (count, *tail) or not 0 <= shape[0] <= buffer.buffer_size:
                    raise BitallocError(f"{source}: {name} is {found} {shape}, this buffer stores {dtype} (N <= {buffer.buffer_size}, *{tail})")
            for name, dtype in SCALARS.items():
                shape, fortran, found = _header(archive, f"{name}.npy", source)
                if shape != () or found != dtype:
                    raise BitallocError(f"{source}: {name} is {found} {shape}, expected a {dtype} scalar")
            # headers checked: the reads below allocate only what this buffer holds anyway
            arrays = {}
            for name in (*ARRAYS, *SCALARS):
                with archive.open(f"{name}.npy") as handle:
                    arrays[name] = np.lib.format.read_array(handle, allow_pickle=False)
    except BitallocError:
        raise
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        first = (str(exc).splitlines() or [""])[0][:120]
        raise BitallocError(f"{source}: not a replay buffer written by this code ({type(exc).__name__}: {first})") from None
    assert count is not None
    pos, full = int(arrays["pos"]), bool(arrays["full"])
    if not 0 <= pos < buffer.buffer_size or (count != buffer.buffer_size if full else count != pos):
        raise BitallocError(f"{source}: pos {pos} / full {full} do not fit {count} stored transitions of a buffer of {buffer.buffer_size}")
    _check_values(arrays, buffer, source)
    for name in ARRAYS:
        getattr(buffer, name)[:count] = arrays[name]
    buffer.pos, buffer.full = pos, full


def _check_values(arrays: dict[str, np.ndarray], buffer: ReplayBuffer, source: str) -> None:
    """Values a run of this env can produce: finite, inside the spaces, flags 0 or 1."""
    for name in ARRAYS:
        if not np.isfinite(arrays[name]).all():
            raise BitallocError(f"{source}: {name} holds non-finite values")
    space: Any = buffer.observation_space  # a Box (_check_buffer)
    # SB3 stores Box actions rescaled to [-1, 1] (policy.scale_action), observations as the env gave them
    bounds = {"observations": (space.low, space.high), "next_observations": (space.low, space.high), "actions": (-1.0, 1.0)}
    for name, (low, high) in bounds.items():
        values = arrays[name]
        if ((values < np.asarray(low) - BOUND_SLACK) | (values > np.asarray(high) + BOUND_SLACK)).any():
            raise BitallocError(f"{source}: {name} holds values outside the bounds of the env's spaces")
    for name in ("dones", "timeouts"):
        if not np.isin(arrays[name], (0.0, 1.0)).all():
            raise BitallocError(f"{source}: {name} holds values other than 0 and 1")
