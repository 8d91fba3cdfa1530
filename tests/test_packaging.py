"""Packaging: kernels/ and predictors/ install as longexposure.kernels / .predictors and shadow nothing.

The top-level `kernels/` folder once had an __init__.py, so a Python started in the repository root imported it
for `import kernels`, and transformers (which imports the PyPI `kernels` package) failed to build any model.
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _from_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("folder", ["kernels", "predictors"])
def test_top_level_folders_are_namespace_portions(folder):
    assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py makes `import {folder}` ours"


def test_import_kernels_from_the_root_never_resolves_to_ours():
    done = _from_root("import importlib.util; s = importlib.util.find_spec('kernels'); print(s and s.origin)")
    assert done.returncode == 0, done.stderr
    origin = done.stdout.strip()
    assert not origin.startswith(str(ROOT / "kernels")), origin


def test_transformers_hub_kernels_imports_from_the_root():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI `kernels` package is not installed here (transformers < 5.25 does not need it)")
    done = _from_root("import transformers.integrations.hub_kernels")
    assert done.returncode == 0, done.stderr[-2000:]


def test_package_imports_from_the_root_build_a_model():
    code = (
        "import longexposure.expose, longexposure.kernels.neuron_block_mlp, longexposure.predictors.fit\n"
        "from longexposure.models import build_model\n"
        "print(type(build_model('opt-tiny', seed=0)).__name__)"
    )
    done = _from_root(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "OPTForCausalLM" in done.stdout
