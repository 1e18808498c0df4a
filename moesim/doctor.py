"""`moesim doctor`: the facts a bug report needs, in a block to paste.

Versions of the libraries moesim drives, whether each lies in the range moesim declares (and so was
tested), and whether CUDA and NVML are usable here. It only reads; it changes nothing.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from importlib import metadata

import click

from moesim import __version__

# The distributions whose versions decide whether moesim works; the first five are the ones that move fastest.
REPORTED = ("torch", "transformers", "simpy", "pyarrow", "numpy", "tokenizers", "scipy", "scikit-learn",
            "click", "nvidia-ml-py", "matplotlib", "tqdm")


@dataclass(frozen=True)
class PackageStatus:
    name: str
    installed: str | None
    declared: str  # the range in moesim's metadata, "" where moesim declares none
    in_range: bool | None  # None where either side is unknown

    def line(self) -> str:
        version = self.installed or "not installed"
        if self.in_range is None:
            verdict = ""
        else:
            verdict = "  ok" if self.in_range else "  OUTSIDE the tested range"
        declared = f" (moesim wants {self.declared})" if self.declared else ""
        return f"{self.name:14s} {version}{declared}{verdict}"


def declared_ranges() -> dict[str, str]:
    """Distribution name -> version range, as the installed moesim declares them (base dependencies only)."""
    from packaging.requirements import Requirement

    ranges: dict[str, str] = {}
    for text in metadata.requires("moesim") or []:
        req = Requirement(text)
        if req.marker is None:
            ranges[req.name.lower()] = str(req.specifier)
    return ranges


def package_statuses() -> list[PackageStatus]:
    from packaging.specifiers import SpecifierSet

    ranges = declared_ranges()
    rows = []
    for name in REPORTED:
        try:
            installed: str | None = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        declared = ranges.get(name, "")
        in_range = None
        if installed and declared:
            in_range = SpecifierSet(declared).contains(installed, prereleases=True)
        rows.append(PackageStatus(name, installed, declared, in_range))
    return rows


def cuda_status() -> str:
    try:
        import torch
    except Exception as exc:  # a broken torch install is exactly what this report is for
        return f"torch does not import ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (CPU build)"
        return f"not available (torch built for CUDA {built})"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"available, CUDA {torch.version.cuda}, {len(names)} device(s): {', '.join(names)}"


def nvml_status() -> str:
    try:
        import pynvml
    except Exception as exc:
        return f"pynvml does not import ({type(exc).__name__})"
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return f"not usable ({type(exc).__name__}: {exc})"
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        count = pynvml.nvmlDeviceGetCount()
        return f"usable, driver {driver.decode() if isinstance(driver, bytes) else driver}, {count} device(s)"
    finally:
        pynvml.nvmlShutdown()


def report() -> tuple[str, bool]:
    """The report's text, and whether every reported library lies in its declared range."""
    statuses = package_statuses()
    lines = [f"moesim {__version__}", f"python {sys.version.split()[0]} on {platform.platform()}", ""]
    lines += [s.line() for s in statuses]
    lines += ["", f"CUDA: {cuda_status()}", f"NVML: {nvml_status()}"]
    all_in_range = all(s.in_range is not False for s in statuses)
    if not all_in_range:
        lines += ["", "a library outside moesim's tested range may work, but report the versions above with any bug"]
    return "\n".join(lines), all_in_range


@click.command("doctor")
def doctor_command() -> None:
    """Print library versions, CUDA and NVML status, and whether each library is in moesim's tested range."""
    text, _ = report()
    click.echo(text)
