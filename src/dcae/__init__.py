"""dcae: Deep Compression Autoencoders for efficient high-resolution diffusion models."""

from dcae.models import DCAE, DCAEConfig, get_config, list_models

__version__ = "0.1.0"


def create_model(name_or_config) -> DCAE:
    """A randomly initialised DC-AE from a zoo name, a DCAEConfig or a config file."""
    return DCAE.from_config(name_or_config)


__all__ = ["DCAE", "DCAEConfig", "create_model", "get_config", "list_models", "__version__"]
