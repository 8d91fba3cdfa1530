"""What every backend family shares: the one error a backend asked for by name raises when it cannot run here,
and the one check of whether the Triton kernels can run on a device.

Torch-free at import (the CLI looks `BackendUnavailable` up without loading torch). The attention and MLP
backends, the Sylva / SP-LoRA operator choice (`longexposure.ops.backend`) and the kernels' own guards use these.
"""

from __future__ import annotations

import os
from typing import Any


class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot run on this device / dtype / installation / mode; says why. Nothing
    falls back to another backend."""


def interpreting() -> bool:
    """`TRITON_INTERPRET=1` is set now (it must be set before the kernels are imported to take effect)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_triton_cannot_run(device: Any, interpret: bool | None = None) -> str | None:
    """None if the Triton kernels can run on `device` (a torch.device), else why not, as one clause.

    `interpret`: whether the kernels run in Triton's interpreter; None reads `TRITON_INTERPRET` now (a kernel
    module, which fixed it when it was imported, passes its own flag).
    """
    interpret = interpreting() if interpret is None else interpret
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        if interpret:
            return "TRITON_INTERPRET=1 is set, so the kernels cannot take CUDA tensors"
        return None
    if device.type == "cpu":
        if not interpret:
            return (
                "on CPU it needs the Triton interpreter: set TRITON_INTERPRET=1 before the kernels are imported "
                "(or run on a CUDA device)"
            )
        return None
    return f"it does not run on {device.type}"
