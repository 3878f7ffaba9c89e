"""The CPU experiment's autoencoder (see docs/diffusion.md): python make_ae.py IMAGE_DIR OUT_DIR."""

# A random-weight tiny f32c32 DC-AE, its scaling factor set to 1 / RMS of its latents on the chosen photos.
import sys
from pathlib import Path

import torch

from dcae.data.images import center_crop_arr, find_images, load_image_uint8, uint8_to_tensor
from dcae.models import DCAE, DCAEConfig

data, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
cfg = DCAEConfig(
    name="tiny-f32c32-random",
    latent_channels=32,
    encoder_widths=(16, 32, 32, 64, 64, 64),
    encoder_depths=(0, 1, 1, 1, 1, 1),
    encoder_block_types=("ResBlock",) * 3 + ("EViTGLU",) * 3,
    decoder_widths=(16, 32, 32, 64, 64, 64),
    decoder_depths=(0, 1, 1, 1, 1, 1),
    decoder_block_types=("ResBlock",) * 3 + ("EViTGLU",) * 3,
)
ae = DCAE.from_config(cfg).eval()
x = torch.stack([uint8_to_tensor(center_crop_arr(load_image_uint8(p), 256)) for p in find_images(data)])
with torch.no_grad():
    rms = ae.encode(x).square().mean().sqrt().item()
ae.config.scaling_factor = 1.0 / rms
ae.save_pretrained(out, overwrite=True)
print(f"{sum(p.numel() for p in ae.parameters()) / 1e6:.2f}M params, latent RMS {rms:.4f}, scaling {1 / rms:.4f}")
