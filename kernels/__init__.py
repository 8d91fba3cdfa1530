"""Triton operators. Kernels, launchers and autograd Functions only; wrappers live in longexposure/."""
