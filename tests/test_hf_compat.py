"""transformers' causal-mask shortcut under CUDA-graph capture (see longexposure.hf_compat)."""

import torch
import transformers.masking_utils as masking
from transformers.utils import import_utils

from longexposure.hf_compat import causal_mask_under_capture


def test_capture_without_a_padding_mask_keeps_the_causal_shortcut(monkeypatch):
    monkeypatch.setattr(import_utils, "is_cuda_stream_capturing", lambda: True)  # as inside torch.cuda.graph
    original = masking.is_tracing
    with causal_mask_under_capture():
        assert masking.is_tracing(None) is False, "no padding mask: nothing is read, sdpa may use is_causal"
        assert masking.is_tracing(torch.ones(2, 4, dtype=torch.bool)) is True, "a padding mask: capture counts"
        # the shortcut itself: no padding mask, square attention -> sdpa's causal flag, no explicit mask
        assert masking._ignore_causal_mask_sdpa(None, 16, 16, 0, 0) is True
    assert masking.is_tracing is original
