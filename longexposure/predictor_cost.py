"""What the live MLP predictors cost inside a fine-tuning step.

In a CUDA-graph step the predictors run inside the one replay, so the step's timer cannot tell their share
(`predict_ms` exists for eager steps only). Here the same calls (the compiled predictor call with
fixed-capacity ids, as the graph step makes them) run on the run's own MLP inputs for every layer that
predicts in the step (a layer on its dense fallback predicts nothing), captured into one CUDA graph and
replayed: the GPU time one step spends predicting, under the step's autocast (the predictor's matmuls then run
in the step's precision, as they do in the step). With the refresh's mean per step (`refresh_ms_mean`) it is the
whole predictor cost of the step. On a CPU the eager calls are timed.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from longexposure.measure import time_fn


@torch.no_grad()
def mlp_predict_ms(
    exposure: Any, inputs: dict[int, torch.Tensor], *, autocast_dtype: torch.dtype | None = None, reps: int = 20
) -> dict[str, Any]:
    """Median ms of one step's MLP predictor calls on `inputs` (per layer, its MLP input), under the step's
    autocast (`autocast_dtype`, None: none), and the layers timed."""
    from longexposure.predictors.compiled import EAGER, compiled

    layers = [s for s in exposure.layer_states if not s.dense_mlp and s.index in inputs]
    if not layers:
        return {"predict_graph_ms": 0.0, "predict_graph_layers": 0}
    device = inputs[layers[0].index].device
    cuda = device.type == "cuda"
    call = compiled("mlp") if cuda else EAGER["mlp"]
    xs = {s.index: (inputs[s.index] if inputs[s.index].dim() == 3 else inputs[s.index][None]) for s in layers}

    def predict() -> None:
        on = autocast_dtype is not None
        with torch.autocast(device.type, dtype=autocast_dtype) if on else contextlib.nullcontext():
            for s in layers:
                call(s.predictors["mlp"], xs[s.index])

    fn = predict
    if cuda:  # warm up (compile) on a side stream, as torch.cuda.graph asks, then capture every layer's call
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                predict()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            predict()
        fn = graph.replay
    ms = time_fn(fn, device, warmup=3, reps=reps).p50
    timed = "cuda graph" if cuda else "eager"
    return {"predict_graph_ms": ms, "predict_graph_layers": len(layers), "predict_graph_timed": timed}
