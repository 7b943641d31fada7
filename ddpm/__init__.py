"""ddpm: a minimal, pure-PyTorch diffusion library for medical-imaging research."""

__version__ = "0.1.0"
