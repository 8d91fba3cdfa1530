"""Model presets (real architectures, random-init or loaded) and the one factory that builds them."""

from longexposure.models.factory import build_model, family_of
from longexposure.models.presets import ModelPreset

__all__ = ["ModelPreset", "build_model", "family_of"]
