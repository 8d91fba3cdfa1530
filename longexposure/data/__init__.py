"""Datasets by name: each yields fixed-shape token batches; none downloads anything."""

from longexposure.data.builtin import Batches, load_batches, model_batches

__all__ = ["Batches", "load_batches", "model_batches"]
