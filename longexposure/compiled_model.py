"""torch.compile for fine-tuning, as the strongest dense baseline runs it: every decoder layer an Inductor program.

`torch.compile(peft_model)` compiled one frame: on the H200 (transformers 5.17) a profile of that step showed
the decoder layers still running as eager aten kernels, since a graph break or a recompile per layer left them
to eager once Dynamo's recompile limit was hit. Compiling each decoder layer as its own frame (as torchtitan
does) makes a break between layers harmless, and one compilation serves every layer: Dynamo lifts a module's
parameters to graph inputs, so layers differ only by guards (layer 0's input does not require grad, the
others' do: two programs in all). The loss (upcast logits + cross-entropy over the vocabulary) is compiled too,
where Inductor fuses the upcast into the reductions. The recompile limit is raised to the depth so that no
layer could fall back to eager even if a transformers version guards on a per-layer attribute.

Each compiled model starts from empty Dynamo caches (`fresh_dynamo`, called by the Trainer), and hitting the
recompile limit is an error. The decoder layers of every model share one code object, so in a process that runs
several cases (a suite) the earlier models' cache entries counted against the limit. On the H200 (e2e_real at
77ef17a) the ninth case of one process compiled 1 frame where its twin compiled 5, and ran slower at half the
density: most likely its layers hit the limit, and Dynamo's default is to warn and run such a frame eagerly.

`dynamo_counters()` reads Dynamo's own counters (frames, graphs, graph breaks, recompiles), so an artifact
proves what compiled instead of asserting it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from longexposure.arch import base_model, decoder_layers


def compile_layers_(model: nn.Module) -> dict[str, Any]:
    """Compile each decoder layer and the loss in place (static shapes); returns what was compiled. Call
    `fresh_dynamo` first when other models were compiled in this process."""
    layers = decoder_layers(model)
    limit = max(torch._dynamo.config.recompile_limit, len(layers) + 8)
    torch._dynamo.config.recompile_limit = limit
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # never a layer silently left eager
    for layer in layers:
        layer.compile(dynamic=False)
    base = base_model(model)
    base.loss_function = torch.compile(base.loss_function, dynamic=False)
    return {"compiled": f"{len(layers)} decoder layers + loss, torch.compile (Inductor)", "recompile_limit": limit}


def dynamo_counters() -> dict[str, Any]:
    """Dynamo's counters since the process started (or since `fresh_dynamo`): frames compiled, graphs,
    graph breaks, and why a frame was compiled again (each distinct guard failure, e.g. layer 0's input not
    requiring grad)."""
    from torch._dynamo import utils

    breaks = utils.counters.get("graph_break", {})
    reasons = sorted({r.split(": ", 1)[-1] for fails in utils.guard_failures.values() for r in fails})
    return {
        "frames_compiled": int(utils.counters["frames"].get("ok", 0)),
        "graphs": int(utils.counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(breaks.values())),
        "graph_break_reasons": sorted(breaks)[:10],
        "recompile_reasons": reasons[:10],
    }


def fresh_dynamo() -> None:
    """Empty Dynamo's caches and counters, so a new model compiles its own programs and `dynamo_counters`
    counts them only (functions compiled for earlier models recompile on their next call)."""
    from torch._dynamo import utils

    torch._dynamo.reset()
    utils.counters.clear()
    utils.guard_failures.clear()
