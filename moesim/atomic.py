"""Write output files so that a failure never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from moesim.errors import MoesimError

# The files the running command has read as its inputs (a trace, a profile, a config, ...), while a command
# runs (:func:`tracking_inputs`); an output path may not name one of them, or the output would replace it.
_inputs: Optional[set[Path]] = None


@contextlib.contextmanager
def tracking_inputs() -> Iterator[None]:
    """Within: the readers' :func:`note_input` calls are kept, and every output path is checked against them."""
    global _inputs
    saved, _inputs = _inputs, set()
    try:
        yield
    finally:
        _inputs = saved


def note_input(path: str | os.PathLike) -> None:
    """Record that the running command read ``path`` as an input (nothing outside :func:`tracking_inputs`)."""
    if _inputs is not None:
        with contextlib.suppress(OSError, RuntimeError):
            _inputs.add(Path(path).resolve())


def forget_input(path: str | os.PathLike) -> None:
    """``path`` was read as this command's own earlier output (e.g. a trace to resume), not as an input."""
    if _inputs is not None:
        with contextlib.suppress(OSError, RuntimeError):
            _inputs.discard(Path(path).resolve())


def check_not_input(path: str | os.PathLike) -> None:
    if not _inputs:
        return
    try:
        same = Path(path).resolve() in _inputs
    except (OSError, RuntimeError):
        return
    if same:
        raise MoesimError(f"{path}: is also an input of this command; write the output to another path "
                          f"(nothing was written)")


def prepare_output_path(path: str | os.PathLike) -> Path:
    """Create the parent folder of ``path`` and check it is writable, or raise a one-line error."""
    path = Path(path)
    check_not_input(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoesimError(f"{path}: cannot create its folder ({exc.strerror or exc})") from None
    if path.is_dir():
        raise MoesimError(f"{path}: is a folder, expected a file path")
    if not os.access(path.parent, os.W_OK):
        raise MoesimError(f"{path}: folder {path.parent} is not writable")
    return path


def check_output_target(path: str | os.PathLike) -> Path:
    """Check ``path`` could be written (its nearest existing folder is writable) without creating anything.

    Commands call this before long work so a read-only or misspelt target fails in a second, not after it.
    """
    path = Path(path)
    check_not_input(path)
    if path.is_dir():
        raise MoesimError(f"{path}: is a folder, expected a file path")
    parent = path.parent
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise MoesimError(f"{path}: {parent} is a file, expected a folder")
    if not os.access(parent, os.W_OK):
        raise MoesimError(f"{path}: folder {parent} is not writable")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_path_for(path: Path) -> Path:
    """A unique temp file beside ``path`` (same file system, so the final rename is atomic).

    Its name carries the writer's process id, so a later writer can tell a temp file of a killed process
    (removed by :func:`remove_stale_temps`) from one still being written.

    mkstemp creates it 0600; it gets the mode an ordinary new file would have, since it becomes the output.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return Path(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Remove the temp files of ``path`` that killed writers left behind (their process is gone)."""
    path = Path(path)
    removed = 0
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        pid_text = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _alive(int(pid_text)):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed += 1
    return removed


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write to; on success rename it onto ``path``, on failure remove it."""
    final = prepare_output_path(path)
    remove_stale_temps(final)
    try:
        tmp = temp_path_for(final)
    except OSError as exc:
        raise MoesimError(f"{final}: cannot write ({exc.strerror or exc})") from None
    try:
        yield tmp
        check_not_input(final)  # an input read after the path was first checked
        os.replace(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):  # a full disk or a lost mount: the user's to fix, said in one line
            raise MoesimError(f"{final}: cannot write ({exc.strerror or exc}); nothing was written there") from None
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
