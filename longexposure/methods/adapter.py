"""Houlsby bottleneck adapters (peft has none): down-project, nonlinearity, up-project, residual.

Attached with a forward hook on an existing module, stored as that module's `adapter` child, so the
base model's parameter names and module types are unchanged (other patches keep finding them).
"""

from __future__ import annotations

import torch
from torch import nn


class HoulsbyAdapter(nn.Module):
    """y + up(gelu(down(y))); `up` starts at zero so the adapted model equals the base model at step 0."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(nn.functional.gelu(self.down(y)))


def _apply_adapter(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return module.adapter(output)


def attach_adapter(module: nn.Module, dim: int, bottleneck: int) -> HoulsbyAdapter:
    """Add a Houlsby adapter after `module`'s output (a Linear or GPT-2 Conv1D)."""
    if hasattr(module, "adapter"):
        raise ValueError(f"{type(module).__name__} already has an adapter")
    weight = next(module.parameters())
    module.adapter = HoulsbyAdapter(dim, bottleneck).to(device=weight.device)
    module.register_forward_hook(_apply_adapter)
    return module.adapter
