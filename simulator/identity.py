"""Content identities of a simulation's inputs: a trace and a profile named as the user names them.

Names are resolved (bundled trace or profile, or a path) and the resolved file's bytes hashed with
:func:`moesim.content.file_sha256`; the resolution needs ``traces`` and ``calib``, so it lives at the
simulator's stage rather than in the core.
"""

from __future__ import annotations

import os
from pathlib import Path

from moesim.calib.profile import bundled_profiles, load_profile
from moesim.content import file_sha256
from moesim.traces import resolve_trace


def trace_sha256(spec: str | os.PathLike) -> str:
    return file_sha256(resolve_trace(str(spec)))


def profile_file(spec: str | os.PathLike) -> Path:
    bundled = bundled_profiles()
    return Path(bundled[str(spec)]) if str(spec) in bundled else Path(spec)


def profile_sha256(spec: str | os.PathLike) -> str:
    path = profile_file(spec)
    if not path.is_file():
        load_profile(str(spec))  # raises the one-line "not a bundled profile or a file" error
    return file_sha256(path)
