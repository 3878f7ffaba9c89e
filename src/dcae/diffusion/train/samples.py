"""Periodic sample grids of a diffusion run: fixed-seed EMA samples, decoded by the autoencoder recorded in the
latents index (or saved as latents when it cannot be loaded)."""

from __future__ import annotations

import sys

import torch

from dcae.diffusion.cache import CacheIndex, decode_scaled, load_autoencoder
from dcae.diffusion.conditioning import Condition, Conditioning
from dcae.diffusion.processes.sampling import sample
from dcae.diffusion.train.config import SampleConfig


class AutoencoderCache:
    """Loads the autoencoder the latent cache records (`record`: its CacheIndex; None: no decoding) once, on first
    use; warns (once) if it cannot, or if its weights are not the ones the latents were made with."""

    def __init__(self, record: CacheIndex | None, device: torch.device) -> None:
        self.record, self.device, self.model, self.failed = record, device, None, False

    def get(self):
        if self.model is None and not self.failed and self.record is not None:
            try:
                self.model = load_autoencoder(self.record).to(self.device).eval()
            except Exception as exc:  # sampling grids are a convenience; training goes on
                print(
                    f"dcae: cannot load autoencoder {self.record.autoencoder!r} to decode samples ({exc}); "
                    "samples are saved as latents",
                    file=sys.stderr,
                )
                self.failed = True
        return self.model


def default_solver(process, solver: str) -> str:
    return solver if solver != "auto" else ("heun" if process.prediction == "velocity" else "dpm++")


def grid_condition(conditioning: Conditioning, scfg: SampleConfig, device) -> Condition | None:
    """The conditions of the sample grid, as the conditioning reads them from the sample config (`sample.classes`
    or `sample.prompts` in turn). None and a warning when they cannot be made (a text encoder that does not
    load): the grid is then unconditional, and training goes on."""
    try:
        return conditioning.batch(conditioning.grid_values(scfg, scfg.num), device)
    except Exception as exc:  # sample grids are a convenience; training goes on
        print(f"dcae: cannot make the sample grid's conditions ({exc}); grids are unconditional", file=sys.stderr)
        return None


@torch.no_grad()
def sample_grid(
    model,
    process,
    cond: Condition | None,
    scfg: SampleConfig,
    latent_shape,
    device,
    autoencoder=None,
    scaling_factor: float = 1.0,
) -> torch.Tensor:
    """scfg.num samples with fixed seeds for the conditions `cond`: decoded images in [-1, 1], or latents when
    no autoencoder."""
    g = torch.Generator().manual_seed(scfg.seed)
    noise = torch.randn(scfg.num, *latent_shape, generator=g).to(device)
    z = sample(
        model,
        process,
        noise,
        cond,
        steps=scfg.steps,
        solver=default_solver(process, scfg.solver),
        cfg_scale=scfg.cfg_scale,
        generator=torch.Generator(device).manual_seed(scfg.seed),
    )
    if autoencoder is None:
        return z
    return decode_scaled(autoencoder, z, scaling_factor).clamp(-1, 1)
