"""The README's python blocks run as written (issue 16): each in a fresh interpreter started in the
repository root, as a newcomer runs it (no TRITON_INTERPRET, so a CPU gets the torch backends), on tiny
models: a paper-size preset keeps its depth and ffn width (a replayed profile needs them) at d_model 64.
A block that reads the shared directory (the paper's reference profile) fails here when it is missing."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
NEEDS_SHARED = ("from_reference", "../shared", "LONGEXPOSURE_SHARED")

# Runs one block (stdin) with build_model narrowed, then prints the exposure's report for the test to read.
DRIVER = """
import json, sys
import longexposure.models as models
from longexposure.registry import MODEL_PRESETS

NARROW = {
    "opt": {"hidden_size": 64, "num_attention_heads": 4, "word_embed_proj_dim": 64},
    "gpt2": {"n_embd": 64, "n_head": 4},
}
build = models.build_model

def tiny(model, **kwargs):
    if model in MODEL_PRESETS and kwargs.get("weights") is None:
        kwargs = {**NARROW.get(MODEL_PRESETS.get(model).family, {}), **kwargs}
    return build(model, **kwargs)

models.build_model = tiny
scope = {"__name__": "__main__"}
exec(compile(sys.stdin.read(), "README.md", "exec"), scope)
exposure = scope.get("exposure")
print("REPORT " + json.dumps(None if exposure is None else exposure.report(), default=str))
"""


def shared_dir() -> Path:
    env = os.environ.get("LONGEXPOSURE_SHARED")
    return Path(env) if env else ROOT.parent / "shared"


def run_block(code: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if any(s in code for s in NEEDS_SHARED):
        shared = shared_dir()
        if not (shared / "reference").is_dir():
            pytest.fail(
                f"this README block reads the reference profile, and {shared}/reference does not exist: "
                "put the shared directory beside the clone or set LONGEXPOSURE_SHARED"
            )
        env["LONGEXPOSURE_SHARED"] = str(shared)
        code = code.replace('"../shared"', repr(str(shared)))
    done = subprocess.run(
        [sys.executable, "-c", DRIVER], input=code, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"README block failed:\n{code}\n--- stderr ---\n{done.stderr[-4000:]}"
    line = [x for x in done.stdout.splitlines() if x.startswith("REPORT ")][-1]
    return json.loads(line.removeprefix("REPORT "))


def test_the_readme_shows_a_runnable_expose_example():
    """The expose example was an indented fragment (no `model`, OPT-1.3B only): nothing here ran it."""
    assert len(BLOCKS) >= 2, "README.md has no ```python blocks for this test to run"
    small = [b for b in BLOCKS if "expose(" in b and not any(s in b for s in NEEDS_SHARED)]
    assert small, "one expose example must run without the shared directory"


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(code):
    report = run_block(code)
    if "expose(" not in code:
        return
    assert report is not None, "an expose example must leave its `exposure` to inspect"
    assert report["backend_choice"], "the examples name no backend: the report says which ran and why"
    if not torch.cuda.is_available():  # a newcomer's CPU: the torch backends, not a Triton error
        assert (report["mlp_backend"], report["attention_backend"]) == ("torch-gather", "sdpa")
    if 'source="replay"' in code:
        assert "replay: OPT-1.3B profile of the Long Exposure artifact" in report["sparsity_source"]
