"""longexposure: faster parameter-efficient fine-tuning from the activation sparsity that survives it.

The public API is small: registries to look plug-ins up by name; `longexposure.expose.expose` / `unexpose`.
Importing this package loads no GPU code; a registry imports its built-in plug-ins on first lookup.
"""

import importlib.machinery
import importlib.util
import os
import sys

from longexposure.registry import ALL as REGISTRIES
from longexposure.registry import Registry, RegistryError, registry

__version__ = "0.1.0"

__all__ = ["REGISTRIES", "Registry", "RegistryError", "__version__", "registry"]

# kernels/ and predictors/ sit at the repository's top level with no __init__.py: they are namespace portions, so a
# `python` started in the repository root never lets `import kernels` shadow the PyPI package of that name (which
# transformers imports). A wheel installs them inside this package. From a source tree (an editable install, or the
# repository root on sys.path) they are joined here, since setuptools' editable finder does not look for namespace
# portions inside a regular package.
_HERE = os.path.dirname(os.path.abspath(__file__))
for _name in ("kernels", "predictors"):
    _folder = os.path.join(os.path.dirname(_HERE), _name)
    if f"{__name__}.{_name}" in sys.modules or os.path.isdir(os.path.join(_HERE, _name)) or not os.path.isdir(_folder):
        continue
    _spec = importlib.machinery.ModuleSpec(f"{__name__}.{_name}", None, is_package=True)
    _spec.submodule_search_locations = [_folder]
    sys.modules[_spec.name] = globals()[_name] = importlib.util.module_from_spec(_spec)
del _HERE, _name, _folder
