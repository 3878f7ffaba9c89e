"""Losses: L1/L2 + LPIPS reconstruction, PatchGAN discriminator with hinge loss, adaptive GAN weight.

The DC-AE authors did not release their loss code; the GAN part follows taming-transformers
(Esser et al. 2021, `VQLPIPSWithDiscriminator`), which latent-diffusion autoencoders also use:
3-layer PatchGAN (pix2pix), hinge loss, and a generator GAN weight of
    0.5 * clamp(|grad_L rec| / (|grad_L gan| + 1e-4), 0, 1e4)
with L the last decoder layer, so that the GAN term never dominates the reconstruction term.
From `disc_start` on, the discriminator trains and the generator gets the GAN term; with `gan_warmup` > 0
the generator's weight ramps linearly from 1/gan_warmup of it to all of it over that many steps (ours).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dcae.metrics.lpips import LPIPS
from dcae.train.config import LossConfig


class PatchDiscriminator(nn.Module):
    """pix2pix NLayerDiscriminator: conv4x4/s2 + LeakyReLU, (n-1) x [conv4x4/s2 + norm + LReLU],
    conv4x4/s1 + norm + LReLU, conv4x4/s1 -> one logit per ~70x70 patch (for n=3)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3, norm: str = "bn") -> None:
        super().__init__()
        use_bias = norm == "none"  # a norm right after the conv makes the bias redundant

        def norm_layer(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm == "bn" else nn.Identity()

        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            seq += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=use_bias),
                norm_layer(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        seq.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    # DCGAN / taming initialisation.
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def build_perceptual(name: str) -> nn.Module:
    """The LPIPS network with its real pretrained weights (never random): see dcae.metrics.lpips."""

    return LPIPS.from_name(name)


def adaptive_gan_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_ratio: float
) -> torch.Tensor:
    """|d rec / d W| / |d gan / d W| at the last decoder layer W, clamped and detached (taming)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    ratio = (rec_grad.float().norm() / (g_grad.float().norm() + 1e-4)).detach()
    # fp16 overflow in either gradient gives inf/nan: skip the GAN term for this step rather than poison it
    # (checked before the clamp, which would turn an infinite ratio into the largest weight).
    ratio = torch.where(torch.isfinite(ratio), ratio, torch.zeros_like(ratio))
    return torch.clamp(ratio, 0.0, max_ratio)


class AutoencoderLoss(nn.Module):
    """Reconstruction (+ GAN) loss of one phase. `generator(...)` and `discriminator(...)` return
    (loss to backpropagate, dict of detached
    scalar tensors to log: converting them to floats only on log steps avoids a GPU sync per step)."""

    def __init__(self, cfg: LossConfig, disc: nn.Module | None, perceptual: nn.Module | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.disc = disc
        self.perceptual = perceptual

    def gan_active(self, step: int) -> bool:
        return self.disc is not None and self.cfg.gan_weight > 0 and step >= self.cfg.disc_start

    def warmup_factor(self, step: int) -> float:
        """Fraction of the generator's GAN weight at an active `step`: min(1, (step - disc_start + 1) / gan_warmup)."""
        w = self.cfg.gan_warmup
        return min(1.0, (step - self.cfg.disc_start + 1) / w) if w > 0 else 1.0

    def reconstruction(self, x: torch.Tensor, rec: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.cfg
        parts: dict[str, torch.Tensor] = {}
        total = x.new_zeros((), dtype=torch.float32)
        diff = rec.float() - x.float()
        if c.l1_weight:
            parts["l1"] = diff.abs().mean()
            total = total + c.l1_weight * parts["l1"]
        if c.l2_weight:
            parts["l2"] = diff.pow(2).mean()
            total = total + c.l2_weight * parts["l2"]
        if c.perceptual_weight and self.perceptual is not None:
            parts["lpips"] = self.perceptual(rec, x).mean()
            total = total + c.perceptual_weight * parts["lpips"]
        return total, parts

    def generator(
        self,
        x: torch.Tensor,
        rec: torch.Tensor,
        step: int,
        last_layer: torch.Tensor | None,
        disc: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`disc` is the discriminator to call (the unwrapped one: it is frozen during this step)."""
        rec_loss, parts = self.reconstruction(x, rec)
        total = rec_loss
        logs = {k: v.detach() for k, v in parts.items()}
        logs["rec"] = rec_loss.detach()
        if self.gan_active(step):
            g_loss = -(disc or self.disc)(rec).float().mean()
            if self.cfg.gan_adaptive and last_layer is not None and last_layer.requires_grad:
                weight = adaptive_gan_weight(rec_loss, g_loss, last_layer, self.cfg.gan_adaptive_max)
            else:  # the head is frozen in this phase: no layer to balance at, use the plain weight
                weight = torch.ones((), device=x.device)
            weight = weight * (self.cfg.gan_weight * self.warmup_factor(step))
            total = total + weight * g_loss
            logs.update(g_loss=g_loss.detach(), gan_weight=weight.detach())
        logs["loss"] = total.detach()
        return total, logs

    def discriminator(self, disc: nn.Module, x: torch.Tensor, rec: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits_real = disc(x.detach())
        logits_fake = disc(rec.detach())
        loss = hinge_d_loss(logits_real.float(), logits_fake.float())
        logs = {
            "d_loss": loss.detach(),
            "logits_real": logits_real.detach().float().mean(),
            "logits_fake": logits_fake.detach().float().mean(),
        }
        return loss, logs
