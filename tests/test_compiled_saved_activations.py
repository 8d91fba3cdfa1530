"""What a compiled training step keeps of the neuron-block MLP for its backward, traced on a machine without a GPU.

Under torch.compile, AOTAutograd's partitioner (not the op's `setup_context`) decides what the forward graph saves:
whatever the traced backward reads. Frozen MLP weights (LoRA on attention, fig7's step) must leave only the ReLU
bits, 1/16 of the fp16 compact activation h: at fig7's paper order, with ids padded to the widest layer (0.94 of
the blocks), keeping h put the exposed step's peak memory above the dense one's (8.19 vs 7.78 GiB on the H200).

The trace needs the real kernels (the interpreter's cannot be traced), so it runs in a child process without
TRITON_INTERPRET, with an sm_90 target in place of a GPU driver: Dynamo's kernel wrapper compiles each kernel to
TTIR to find which arguments it writes. Nothing is launched: the partitioned forward graph is read and the call
stopped there.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest

TOKENS, D_MODEL, FFN, BLOCK, CAPACITY = 64, 32, 128, 16, 8


def saved_by_compiled_forward(trainable: str) -> list[list]:
    """The child: (shape, dtype) of every tensor the partitioned forward graph saves for the backward."""
    import torch
    import triton
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from triton.backends.compiler import GPUTarget

    class Sm90:  # what Dynamo's kernel wrapper asks the driver for
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(Sm90())
    from longexposure.ops.neuron_block_mlp import neuron_block_mlp, neuron_major_

    x = torch.randn(TOKENS, D_MODEL, requires_grad=True)
    w1, b1 = torch.randn(FFN, D_MODEL), torch.randn(FFN)
    w2, b2 = neuron_major_(torch.randn(D_MODEL, FFN)), torch.randn(D_MODEL)
    if trainable == "full":
        for t in (w1, b1, w2, b2):
            t.requires_grad_(True)
    ids, count = torch.arange(CAPACITY, dtype=torch.int32), torch.tensor([CAPACITY - 2], dtype=torch.int32)
    forward = {}

    class Partitioned(Exception):
        pass

    def keep_forward(gm, _example):  # called with the partitioned forward graph, before anything runs
        forward["graph"] = gm
        raise Partitioned

    def mlp(x, ids, w1, b1, w2, b2, count):
        return neuron_block_mlp(x, ids, w1, b1, w2, b2, block_size=BLOCK, n_active=count, check_indices=False)

    traced = aot_function(mlp, fw_compiler=keep_forward, bw_compiler=keep_forward,
                          partition_fn=min_cut_rematerialization_partition)
    with contextlib.suppress(Partitioned):  # raised once the partitioned forward graph is in hand
        traced(x, ids, w1, b1, w2, b2, count)
    (outputs,) = [n.args[0] for n in forward["graph"].graph.nodes if n.op == "output"]
    vals = [node.meta["val"] for node in outputs[1:]]  # outputs[0] is y; the rest is saved for the backward
    return [[list(v.shape), str(v.dtype)] for v in vals]


@pytest.mark.parametrize("trainable", ["frozen", "full"])
def test_compiled_forward_saves_relu_bits_not_activations(trainable):
    import torch  # here, not at the top: the child imports the kernels only once it has set up its target
    from longexposure.kernels.neuron_block_mlp import relu_bits

    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    child = subprocess.run([sys.executable, __file__, trainable], env=env, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-4000:]
    saved = [(tuple(shape), dtype) for shape, dtype in json.loads(child.stdout.splitlines()[-1])]
    cols = CAPACITY * BLOCK
    bits = (tuple(relu_bits(TOKENS, cols, torch.device("meta")).shape), "torch.uint8")
    h, x = ((TOKENS, cols), "torch.float32"), ((TOKENS, D_MODEL), "torch.float32")
    assert bits in saved, saved
    if trainable == "frozen":  # x gets a gradient, no weight does
        assert h not in saved and x not in saved, f"a frozen MLP saved activations: {saved}"
    else:  # the weight gradients read h (fc2) and x (fc1)
        assert h in saved and x in saved, saved


if __name__ == "__main__":
    print(json.dumps(saved_by_compiled_forward(sys.argv[1])))
