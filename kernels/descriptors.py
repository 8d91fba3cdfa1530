"""When the Triton operators may read through Hopper tensor descriptors (TMA), one rule for all of them.

A kernel built with `tl.make_tensor_descriptor` copies whole boxes with one bulk instruction instead of having
every thread compute addresses; out-of-range rows and columns read as zeros. Each operator family has its own
environment switch, read per launch (or per trace), so each kernel is measured against pointer loads on its own
before it becomes a default: `LONGEXPOSURE_TMA` for the neuron-block MLP kernels (default `sdd,dsd` since
2026-12-06: on the H100 descriptors sped up sdd and dsd but slowed the weight gradient), `LONGEXPOSURE_BSA_TMA=1`
for block-sparse attention (opt-in). `0` turns a family's descriptors off, `1` on for every kernel.

An operand is descriptor-legal when its innermost stride is 1 and every other stride and its start address are
multiples of 16 bytes. A traced call (torch.compile) has no address yet: its storage is taken as aligned
(torch's allocators and Inductor's buffers start at 16-byte multiples or more) and its offset into it is checked.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from longexposure.backends import interpreting


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global scratch for device-side descriptors (Triton asks for it at launch)."""
    return torch.empty(size, dtype=torch.int8, device="cpu" if interpreting() else "cuda")


@functools.lru_cache(maxsize=16)
def has_tma(device: torch.device) -> bool:
    """A Hopper (sm_90) or newer GPU, or the interpreter (which emulates descriptors on the CPU)."""
    return interpreting() or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


def legal(t: torch.Tensor, traced: bool = False) -> bool:
    """`t` can be read through a tensor descriptor (see the module docstring)."""
    size = t.element_size()
    start = t.storage_offset() * size if traced else t.data_ptr()
    outer = t.stride()[:-1]
    return t.stride(-1) == 1 and start % 16 == 0 and all(s > 0 and (s * size) % 16 == 0 for s in outer)


def switched_on(switch: str, kernel: str | None = None, kernels: tuple[str, ...] = (), default: str = "0") -> bool:
    """Environment `switch` (`default` where unset) turns its feature (descriptors here; also the MLP's half-width
    tiles, LONGEXPOSURE_NARROW) on for `kernel`: "1" (every kernel), "0" (none), or a comma-separated list of names
    from `kernels`; anything else is an error naming the valid values."""
    value = os.environ.get(switch, default)
    if value in ("0", "1"):
        return value == "1"
    names = {name.strip() for name in value.split(",")}
    if not kernels or not names <= set(kernels):
        valid = "'0' or '1'" + (f" or a comma-separated list of {', '.join(kernels)}" if kernels else "")
        raise ValueError(f"{switch}={value!r}: expected {valid}")
    return kernel in names


def use(switch: str, *operands: torch.Tensor, traced: bool = False, kernel: str | None = None,
        kernels: tuple[str, ...] = (), default: str = "0") -> bool:
    """Whether a launch of `kernel` (one of the family's `kernels`) reads `operands` through descriptors: the
    environment `switch` asks for it (`switched_on`, with the family's `default`), the device has TMA and every
    operand is legal. Installs the scratch allocator the descriptors need when none is set."""
    if not switched_on(switch, kernel, kernels, default) or not has_tma(operands[0].device):
        return False
    if not all(legal(t, traced) for t in operands):
        return False
    install_allocator()
    return True


def install_allocator() -> None:
    """Give Triton the scratch allocator device-side descriptors need, unless one is set."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)
