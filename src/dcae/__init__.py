"""dcae: Deep Compression Autoencoders for efficient high-resolution diffusion models."""

__version__ = "0.1.0"
