"""Where a result came from (device, commit, library versions): one source for the suite runner and every benchmark,
so no result file names its machine or code in its own way."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from longexposure import __version__


def git_revision() -> str:
    """The commit the code came from; `LONGEXPOSURE_GIT` overrides (a copied tree has no .git)."""
    if os.environ.get("LONGEXPOSURE_GIT"):
        return os.environ["LONGEXPOSURE_GIT"]
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    """Python's and the libraries' versions; a library that is not installed says so."""
    found = {"python": platform.python_version(), "torch": torch.__version__, "longexposure": __version__}
    for name in ("triton", "transformers", "peft"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = "not installed"
    return found


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name, or the CPU's with its core count; `None` means the current CUDA device if there is one."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def provenance(device: torch.device | str | None = None) -> dict[str, str]:
    """A benchmark's header: device, commit, versions (flat) and when it started."""
    return {"device": device_name(device), "git": git_revision(), **versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
