"""DC-AE models: building blocks (`layers`), the autoencoder, configurations and the model zoo."""

from dcae.models.autoencoder import DCAE, Decoder, Encoder
from dcae.models.config import DCAEConfig, get_config, list_models

__all__ = ["DCAE", "DCAEConfig", "Decoder", "Encoder", "get_config", "list_models"]
