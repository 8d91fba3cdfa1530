"""Where an installed transformers version needs a hand to train at full speed; each fix says which versions.

`causal_mask_under_capture`: transformers (5.17 and 5.25 alike) treats CUDA-graph capture like tracing when it
decides whether sdpa may use its `is_causal` flag instead of a mask: while capturing it cannot read the padding
mask (5.17's OPT always makes an all-ones one) or the position ids (to rule out packed sequences), so a captured
step builds an explicit (B, 1, S, S) causal mask. sdpa then runs its masked kernel instead of the causal flash
one, and a compiled decoder layer recompiles for the new argument in the middle of the capture (which fails:
H200, torch 2.11, transformers 5.17). The `Trainer` passes neither an attention mask nor position ids: there is
no padding and no packing, so for sdpa the causal flag is exact, and inside this context the models' causal-mask
builder returns None (what it returns outside a capture) for sdpa; other attention implementations keep it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def causal_mask_under_capture() -> Iterator[None]:
    """While capturing a training step with no attention mask and no position ids: sdpa gets `is_causal`, not a
    materialised mask (see the module docstring)."""
    import transformers.masking_utils as masking

    original = masking.create_causal_mask

    def create_causal_mask(*args: Any, **kwargs: Any):
        config = kwargs.get("config", args[0] if args else None)
        if getattr(config, "_attn_implementation", None) == "sdpa":
            return None
        return original(*args, **kwargs)

    patched = [m for name, m in list(sys.modules.items()) if name.startswith("transformers.models.") and
               getattr(m, "create_causal_mask", None) is original]  # fmt: skip
    for module in patched:
        module.create_causal_mask = create_causal_mask
    try:
        yield
    finally:
        for module in patched:
            module.create_causal_mask = original
