"""Failures inside third-party libraries, reported as one line that a user can act on.

``calib``, ``trace`` and ``validate`` drive torch and transformers for minutes. When one of those
libraries raises (an API that changed, a kernel that does not run on this device), a bare traceback
hides which step failed and which release did it. :func:`reported_failures` turns such an exception into
a one-line :class:`StepFailure` naming the command's current step, the library and its version, and
the file the full traceback was written to; user errors (:class:`MoesimError`) pass through unchanged.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

from moesim.errors import MoesimError

# Where full tracebacks go; a user may point it elsewhere (CI artifacts, a bug report folder).
LOG_DIR_ENV = "MOESIM_LOG_DIR"


class StepFailure(MoesimError):
    """A step failed for a reason that is not the user's input: a library or a moesim bug."""

    exit_code = 1


@dataclass
class StepLog:
    """The step a long command is in, kept current by its progress messages."""

    current: str = "setting up"

    def wrap(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """``log`` that also records each message as the current step."""

        def logged(message: str) -> None:
            self.current = message.strip().rstrip(". ").strip() or self.current
            log(message)

        return logged


def culprit(exc: BaseException) -> tuple[str, str]:
    """(package, version) of the code that raised ``exc``: the innermost frame of moesim or of an installed
    distribution, by the frame's module name (the standard library's frames are passed over, so a moesim call
    that fails inside ``json`` names moesim, and a moesim hook that fails when torch calls it names moesim,
    not torch). Module names, not file paths, so an editable install of moesim counts as moesim."""
    modules = []
    tb = exc.__traceback__
    while tb is not None:
        modules.append(str(tb.tb_frame.f_globals.get("__name__") or ""))
        tb = tb.tb_next
    installed = metadata.packages_distributions()
    for module in reversed(modules):
        top = module.partition(".")[0]
        if top == "moesim":
            break
        if top and top not in sys.stdlib_module_names and top in installed:
            return top, _version_of(top)
    return "moesim", _version_of("moesim")


def _version_of(top_level: str) -> str:
    distributions = metadata.packages_distributions().get(top_level, [top_level])
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "(version unknown)"


def write_traceback(command: str, exc: BaseException) -> Path:
    folder = Path(os.environ.get(LOG_DIR_ENV) or tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = folder / f"moesim-{command}-{stamp}-{os.getpid()}.txt"
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    path.write_text(f"moesim {command}, argv: {sys.argv!r}\n\n{text}")
    return path


@contextlib.contextmanager
def reported_failures(command: str) -> Iterator[StepLog]:
    """Run a command's body; an unexpected exception becomes a one-line :class:`StepFailure`."""
    steps = StepLog()
    try:
        yield steps
    except (MoesimError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except Exception as exc:
        if type(exc).__module__.startswith("click"):
            raise
        package, version = culprit(exc)
        try:
            where = f"full traceback in {write_traceback(command, exc)}"
        except OSError as write_error:
            where = f"the traceback could not be written ({write_error.strerror or write_error})"
        summary = (str(exc).strip().splitlines() or [""])[0][:300]
        raise StepFailure(f"{command}: step '{steps.current}' failed inside {package} {version}: "
                          f"{type(exc).__name__}: {summary}; {where}") from None
