"""Read-only and full-disk folders for the write-failure tests (a real mount when running as root)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest


def _mount_tmpfs(path: Path, options: str) -> bool:
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def readonly_folder(tmp_path: Path):
    d = tmp_path / "read-only"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        try:
            yield d
        finally:
            d.chmod(0o755)
        return
    if not _mount_tmpfs(d, "ro,size=1m"):
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        yield d
    finally:
        _umount(d)


@contextlib.contextmanager
def full_folder(tmp_path: Path):
    """A folder on a file system with no free space left (a small tmpfs, filled)."""
    d = tmp_path / "full-disk"
    d.mkdir()
    if not _mount_tmpfs(d, "size=256k"):
        pytest.skip("a full file system needs root to mount a small tmpfs")
    try:
        fd = os.open(d / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass  # ENOSPC: the disk is full
        finally:
            os.close(fd)
        yield d
    finally:
        _umount(d)


def leftovers(d: Path) -> list[str]:
    """Files a failed write left behind (temp files, half-written outputs), filler aside."""
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != "filler")
