"""Model presets (real architectures, random-init or loaded) and the one factory that builds them."""

from longexposure.arch import family_of
from longexposure.models.factory import build_model
from longexposure.models.presets import ModelPreset

__all__ = ["ModelPreset", "build_model", "family_of"]
