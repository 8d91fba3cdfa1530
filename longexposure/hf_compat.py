"""Where an installed transformers version needs a hand to train at full speed; each fix says which versions.

`causal_mask_under_capture`: transformers up to 5.2x treats CUDA-graph capture like tracing when it decides
whether sdpa may use its `is_causal` flag, even with no padding mask (nothing to read from the device), so a
captured step builds an explicit (B, 1, S, S) causal mask: sdpa then runs its masked kernel instead of the
causal flash one, and a compiled decoder layer recompiles for the new argument in the middle of the capture
(which fails). Later versions look at capture only when there is a padding mask; inside this context older
ones follow the same rule. Training batches here are packed (no padding), so the causal flag is exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def causal_mask_under_capture() -> Iterator[None]:
    """While capturing a CUDA graph: decide the causal-mask shortcut as if not capturing when there is no
    padding mask (see the module docstring); with a padding mask, transformers' own rule applies."""
    try:
        import transformers.masking_utils as masking
        from transformers.utils import import_utils
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    original = getattr(masking, "is_tracing", None)
    if original is None:
        yield
        return

    def is_tracing(tensor=None) -> bool:
        if tensor is None:
            return bool(import_utils.is_torchdynamo_compiling() or import_utils.is_jit_tracing())
        return original(tensor)

    masking.is_tracing = is_tracing
    try:
        yield
    finally:
        masking.is_tracing = original
