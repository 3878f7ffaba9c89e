"""`make demo` / `dcae demo`: reconstruct real photos that ship with scikit-image.

With the released weights (Hub reachable or cached) the photos go through them. Offline, a small
f32 DC-AE is trained on the spot through the three phases (`dcae.train.demo`), and the held-out
photos are reconstructed before and after; without the training package the demo says plainly that
it runs with untrained weights.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dcae.data.images import center_crop_arr, make_grid, save_image, tensor_to_uint8, uint8_to_tensor
from dcae.data.sources import skimage_photo
from dcae.errors import UserError
from dcae.metrics.psnr_ssim import image_psnr_ssim
from dcae.models import DCAE
from dcae.utils.io import atomic_write_json

# Public-domain / freely licensed photos in scikit-image's wheel (no network needed).
DEMO_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def demo_photos(names: tuple[str, ...] = DEMO_PHOTOS, size: int = 512) -> list[tuple[str, np.ndarray]]:
    """(name, HxWx3 uint8) center crops of scikit-image's sample photos."""
    try:
        import skimage.data  # noqa: F401
    except ImportError as exc:
        raise UserError("the demo needs scikit-image for its photos: pip install scikit-image") from exc

    photos = []
    for name in names:
        arr = skimage_photo(name)
        photos.append((name, center_crop_arr(arr, min(size, *arr.shape[:2]))))
    return photos


def reconstruct_photos(model, photos, out_dir: Path, tag: str) -> dict[str, float]:
    """Reconstruct each photo, write one side-by-side grid, return mean PSNR/SSIM."""

    device = next(model.parameters()).device
    rows, psnrs, ssims = [], [], []
    with torch.inference_mode():
        for name, arr in photos:
            x = uint8_to_tensor(arr)[None].to(device)
            r = model.reconstruct(x).float().cpu()[0]
            psnr, ssim = image_psnr_ssim(arr, tensor_to_uint8(r))
            psnrs.append(psnr)
            ssims.append(ssim)
            print(f"  {name:10s} PSNR {psnr:6.2f} dB  SSIM {ssim:.4f}")
            rows += [x[0].cpu(), r.clamp(-1, 1)]
    grid_path = out_dir / f"side_by_side_{tag}.png"
    save_image(make_grid(rows, nrow=2), grid_path)
    print(f"  left: original, right: reconstruction -> {grid_path}")
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims)), "grid": str(grid_path)}


def run_demo(out_dir: Path, model: str = "dc-ae-f32c32-sana-1.1", minutes: float = 4.0) -> dict:

    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"dcae demo: trying the released weights of {model} ...")
    try:
        ae = DCAE.from_pretrained(model)
    except UserError as exc:
        print(f"  not available: {exc}")
        ae = None
    if ae is not None:
        photos = demo_photos(size=512)
        print(f"reconstructing {len(photos)} photos with the released {model}:")
        result = {"mode": "released", "model": model, **reconstruct_photos(ae, photos, out_dir, "released")}
    else:
        try:
            from dcae.train.demo import train_demo
        except ImportError:
            train_demo = None
        if train_demo is not None:
            print(f"offline: training a small f32 DC-AE on the spot (about {minutes:g} minutes on CPU) ...")
            result = {"mode": "trained-on-the-spot", **train_demo(out_dir, minutes=minutes)}
        else:
            print(
                "offline and no training package: the model below has UNTRAINED (random) weights, so the\n"
                "reconstructions are noise. Get real weights with `huggingface-cli download "
                f"mit-han-lab/{model}` where the Hub is reachable, then `dcae demo --model <folder>`."
            )
            ae = DCAE.from_config(model).eval()
            result = {
                "mode": "untrained",
                "model": model,
                **reconstruct_photos(ae, demo_photos(size=256), out_dir, "untrained"),
            }
    result["seconds"] = round(time.time() - t0, 1)
    atomic_write_json(out_dir / "demo.json", result)
    print(f"done in {result['seconds']} s; numbers in {out_dir / 'demo.json'}")
    return result
