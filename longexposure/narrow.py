"""Narrowed MLPs: each layer's fc1 / fc2 cut down to a fixed set of neuron blocks, as plain dense layers.

The speed of light of the neuron-block MLP operator. A ReLU MLP restricted to the neurons of the blocks
a pattern keeps computes what the exposed MLP computes under that pattern; written as `nn.Linear`
layers of exactly the kept width, it runs on cuBLAS with the gather done once, here, instead of every
call. Timed beside `long-exposure` under the same replayed pattern, it says how far the sparse operator
is from ideal; timed beside the dense step, it bounds what MLP sparsity at that profile can give at all.
It is a yardstick for speed, not a method: the narrowed model is a smaller model, and reports say so.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from longexposure.profiling import decoder_layers, relu_family
from longexposure.replay import RecordedProfile


def _replace(layer: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(layer.get_submodule(parent_path) if parent_path else layer, name, new)


@torch.no_grad()
def narrow_mlp_(model: nn.Module, keep: Sequence[Tensor], block: int) -> list[int]:
    """In place: layer l's fc1 / fc2 become Linear layers over the neurons of blocks `keep[l]` (block ids);
    returns each layer's new hidden width. Weights and biases of the kept neurons are copied unchanged."""
    mlp = relu_family(model).mlp
    layers = decoder_layers(model)
    if len(keep) != len(layers):
        raise ValueError(f"narrow_mlp_: {len(keep)} block lists for {len(layers)} layers")
    neurons = []  # everything is checked first, so a refusal leaves the model as it was
    for i, (layer, ids) in enumerate(zip(layers, keep, strict=True)):
        for part in (mlp.fc1, mlp.fc2):
            mod = layer.get_submodule(part)
            if type(mod) is not nn.Linear:
                raise TypeError(
                    f"narrow_mlp_: layer {i} {part} is a {type(mod).__name__}, not nn.Linear; narrow the "
                    "model before applying a PEFT method"
                )
        ffn = layer.get_submodule(mlp.fc1).out_features
        ids = torch.as_tensor(ids).flatten().long().cpu()
        if ffn % block:
            raise ValueError(f"layer {i}: ffn {ffn} is not a multiple of the block size {block}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= ffn // block):
            raise ValueError(f"layer {i}: block ids must lie in [0, {ffn // block}), got {ids.min()}..{ids.max()}")
        neurons.append((ids[:, None] * block + torch.arange(block)).flatten())
    for layer, idx in zip(layers, neurons, strict=True):
        fc1, fc2 = layer.get_submodule(mlp.fc1), layer.get_submodule(mlp.fc2)
        idx = idx.to(fc1.weight.device)
        kw = {"device": fc1.weight.device, "dtype": fc1.weight.dtype}
        new1 = nn.Linear(fc1.in_features, idx.numel(), bias=fc1.bias is not None, **kw)
        new2 = nn.Linear(idx.numel(), fc2.out_features, bias=fc2.bias is not None, **kw)
        new1.weight.copy_(fc1.weight[idx])
        if fc1.bias is not None:
            new1.bias.copy_(fc1.bias[idx])
        new2.weight.copy_(fc2.weight[:, idx])
        if fc2.bias is not None:
            new2.bias.copy_(fc2.bias)
        _replace(layer, mlp.fc1, new1)
        _replace(layer, mlp.fc2, new2)
    return [int(idx.numel()) for idx in neurons]


def narrow_to_profile_(model: nn.Module, profile: RecordedProfile, theta: float, block: int) -> list[float]:
    """`narrow_mlp_` to the blocks that replaying `profile` keeps (`RecordedProfile.mlp_blocks`, the same
    rule the `replay` source uses); returns each layer's kept fraction of the neurons."""
    mlp = relu_family(model).mlp  # a clear error for an architecture without a ReLU MLP
    layers = decoder_layers(model)
    ffn = layers[0].get_submodule(mlp.fc1).out_features
    profile.check_model(len(layers), ffn)
    widths = narrow_mlp_(model, [profile.mlp_blocks(i, block, theta) for i in range(len(layers))], block)
    return [w / ffn for w in widths]
