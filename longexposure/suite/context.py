"""What a task receives besides its typed case: where it runs and where it may write."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class RunContext:
    """Run-level facts shared by every case of a suite run.

    Attributes:
        device: where the case runs (`cuda` when a GPU is present, else `cpu`).
        preset: the suite preset being run (`cpu-tiny`, `paper`, ...).
        out_dir: the suite's artifact directory; a task may write extra files here.
        seed: base seed; tasks seed their generators from it so reruns draw the same tensors.
        shared_dir: where `../shared` data and reference files are read from (None if absent).
        info: run-level facts a task wants recorded in meta.json (weights, data, sparsity source).
    """

    device: torch.device
    preset: str
    out_dir: Path
    seed: int = 0
    shared_dir: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
