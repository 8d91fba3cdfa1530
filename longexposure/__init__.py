"""longexposure: faster parameter-efficient fine-tuning from the activation sparsity that survives it.

The public API is small: registries to look plug-ins up by name, and (later) `expose`/`unexpose`.
Importing this package loads no GPU code; a registry imports its built-in plug-ins on first lookup.
"""

from longexposure.registry import ALL as REGISTRIES
from longexposure.registry import Registry, RegistryError, registry

__version__ = "0.1.0"

__all__ = ["REGISTRIES", "Registry", "RegistryError", "__version__", "registry"]
