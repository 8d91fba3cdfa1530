"""Recorded sparsity profiles, replayed instead of predicted (sparsity source `replay`).

Replay makes paper-shape speed measurable on random-init weights: the per-layer patterns come from a
profile recorded on real weights, not from this model's activations, and every result says so.

A profile holds, per layer, the mean ReLU activation mass of each MLP neuron (what the Long Exposure
artifact ships for OPT-1.3B) and the attention block density that the paper's exposer kept (fraction
of the full block grid, as the artifact records it: causal-only is about 0.52 at 32 blocks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ARTIFACT = "long-exposure-artifact"


@dataclass
class RecordedProfile:
    """Per-layer MLP neuron mass (layers, ffn) and attention density (layers,), and where they came from."""

    source: str
    mlp_neuron_mass: torch.Tensor | None = None
    attn_density: list[float] | None = None

    @classmethod
    def from_reference(cls, shared_dir: str | Path | None = None) -> RecordedProfile:
        """The OPT-1.3B profile of the paper's artifact (`<shared>/reference/long-exposure-artifact`).

        `shared_dir` None: `LONGEXPOSURE_SHARED`, else the `shared/` folder beside the repository (or beside
        the working directory), so the call works from any directory.
        """
        if shared_dir is None:
            from longexposure.paths import shared_dir as find_shared

            shared_dir = find_shared()
            if shared_dir is None:
                raise FileNotFoundError(
                    "replay profile: no shared directory (set LONGEXPOSURE_SHARED, put shared/ beside the "
                    "repository, or pass its path)"
                )
        root = Path(shared_dir)
        if (root / "reference" / ARTIFACT).is_dir():
            root = root / "reference" / ARTIFACT
        npy, attn = root / "opt-1.3b-mlp-activations.npy", root / "ablation-attention__record.json"
        for f in (npy, attn):
            if not f.exists():
                raise FileNotFoundError(f"replay profile: {f} does not exist (pass the shared/ directory)")
        mass = torch.from_numpy(np.load(npy)).float()
        density = [float(r["exposer_sparsity"]) for r in sorted(json.loads(attn.read_text()), key=lambda r: r["layer"])]
        return cls(f"OPT-1.3B profile of the Long Exposure artifact ({root})", mass, density)

    @classmethod
    def load(cls, path: str | Path) -> RecordedProfile:
        data = json.loads(Path(path).read_text())
        mass = data.get("mlp_neuron_mass")
        return cls(
            data["source"],
            torch.tensor(mass, dtype=torch.float32) if mass is not None else None,
            data.get("attn_density"),
        )

    def save(self, path: str | Path) -> None:
        mass = self.mlp_neuron_mass.tolist() if self.mlp_neuron_mass is not None else None
        Path(path).write_text(
            json.dumps({"source": self.source, "mlp_neuron_mass": mass, "attn_density": self.attn_density})
        )

    def check_model(self, num_layers: int, ffn: int | None) -> None:
        """The profile must have the model's layer count (and ffn width for the MLP part)."""
        if (
            self.mlp_neuron_mass is not None
            and ffn is not None
            and tuple(self.mlp_neuron_mass.shape) != (num_layers, ffn)
        ):
            raise ValueError(
                f"replay profile MLP shape {tuple(self.mlp_neuron_mass.shape)} does not match the model "
                f"({num_layers} layers, ffn {ffn}); record a profile on this architecture"
            )
        if self.attn_density is not None and len(self.attn_density) != num_layers:
            raise ValueError(
                f"replay profile has attention densities for {len(self.attn_density)} layers, "
                f"the model has {num_layers}"
            )

    def resampled(self, num_layers: int) -> RecordedProfile:
        """The attention densities stretched to `num_layers` by relative depth (linear interpolation),
        for a model of another depth (e.g. GPT-2); the MLP part, tied to one ffn width, is dropped."""
        if self.attn_density is None:
            raise ValueError(f"replay profile {self.source!r} has no attention densities to resample")
        src = torch.tensor(self.attn_density, dtype=torch.float64)
        pos = torch.linspace(0, len(src) - 1, num_layers, dtype=torch.float64)
        lo = pos.floor().long().clamp(max=len(src) - 1)
        hi = (lo + 1).clamp(max=len(src) - 1)
        density = (src[lo] + (src[hi] - src[lo]) * (pos - lo)).tolist()
        note = f"attention densities resampled from {len(src)} to {num_layers} layers by relative depth"
        return RecordedProfile(f"{self.source}; {note}", None, density)

    def mlp_blocks(self, layer: int, block_size: int, theta: float) -> torch.Tensor:
        """Sorted int32 ids of the neuron blocks whose mass is >= theta x the layer's largest block mass."""
        if self.mlp_neuron_mass is None:
            raise ValueError(f"replay profile {self.source!r} has no MLP activations")
        mass = self.mlp_neuron_mass[layer]
        if mass.numel() % block_size:
            raise ValueError(f"ffn {mass.numel()} is not a multiple of the block size {block_size}")
        blocks = mass.view(-1, block_size).sum(-1)
        return torch.nonzero(blocks >= theta * blocks.max()).flatten().to(torch.int32)

    def neuron_order(self) -> list[torch.Tensor]:
        """Per layer, the permutation putting neurons in decreasing recorded mass (ties by index)."""
        if self.mlp_neuron_mass is None:
            raise ValueError(f"replay profile {self.source!r} has no MLP activations to reorder by")
        return [torch.sort(m.double(), descending=True, stable=True).indices for m in self.mlp_neuron_mass]

    def reordered(self, perms: list[torch.Tensor]) -> RecordedProfile:
        """The profile after each layer's neurons are permuted by `perms` (what an exact reordering of real
        weights by recorded mass does to where the mass sits: it concentrates in the first blocks)."""
        mass = torch.stack([m[p] for m, p in zip(self.mlp_neuron_mass, perms, strict=True)])
        return RecordedProfile(f"{self.source}; neurons reordered by recorded mass", mass, self.attn_density)

    def mlp_blocks_at_mass(self, layer: int, block_size: int, mass: float) -> torch.Tensor:
        """Sorted int32 ids of the fewest neuron blocks (largest recorded block mass first) holding `mass` of
        the layer's recorded activation mass."""
        if self.mlp_neuron_mass is None:
            raise ValueError(f"replay profile {self.source!r} has no MLP activations")
        if not 0 < mass <= 1:
            raise ValueError(f"mass must be in (0, 1], got {mass}")
        neuron = self.mlp_neuron_mass[layer].double().clamp_min(0)
        if neuron.numel() % block_size:
            raise ValueError(f"ffn {neuron.numel()} is not a multiple of the block size {block_size}")
        blocks = neuron.view(-1, block_size).sum(-1)
        order = torch.sort(blocks, descending=True, stable=True).indices
        cum = torch.cumsum(blocks[order], 0) / blocks.sum().clamp_min(1e-30)
        keep = int((cum < mass - 1e-12).sum()) + 1
        return torch.sort(order[:keep]).values.to(torch.int32)

    def attention_window(self, layer: int, n_blocks: int, global_blocks: int = 1) -> int:
        """Causal window (in blocks) whose local + global layout keeps the layer's recorded density."""
        if self.attn_density is None:
            raise ValueError(f"replay profile {self.source!r} has no attention densities")
        target = self.attn_density[layer] * n_blocks * n_blocks
        best = 1
        for w in range(1, n_blocks + 1):
            if _window_kept(w, n_blocks, global_blocks) <= target:
                best = w
        return best

    def attention_windows(self, layer: int, n_blocks: int, heads: int, global_blocks: int = 1) -> list[int]:
        """Per-head causal windows whose mean kept blocks match the layer's recorded density.

        One window for every head moves the density in steps of a whole diagonal band (at 16 blocks, 0.121 ->
        0.176 of the square, 0.228 -> 0.331 of the causal blocks), so every layer of OPT-1.3B's profile
        (0.086-0.142 of the square) got window 1. Heads mixing the window below the target and the next one
        (head-specific masks, as the exposer's are) reach the recorded density to within one head's share of
        a band; below window 1's density, window 1 it is."""
        low = self.attention_window(layer, n_blocks, global_blocks)
        if low >= n_blocks:
            return [low] * heads
        target = self.attn_density[layer] * n_blocks * n_blocks
        kept_low, kept_high = (_window_kept(w, n_blocks, global_blocks) for w in (low, low + 1))
        wider = round(heads * (target - kept_low) / (kept_high - kept_low)) if target > kept_low else 0
        wider = max(0, min(heads, wider))
        return [low + 1] * wider + [low] * (heads - wider)


def _window_kept(window: int, n_blocks: int, global_blocks: int) -> int:
    """Blocks a causal local `window` + `global_blocks` layout keeps on an n_blocks x n_blocks grid."""
    i = torch.arange(n_blocks)
    return int((torch.clamp(i + 1, max=window) + torch.clamp(i + 1 - window, min=0, max=global_blocks)).sum())
