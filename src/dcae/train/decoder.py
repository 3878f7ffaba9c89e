"""Decoder recipe: train a new (smaller / faster) decoder against a frozen DC-AE encoder.

    dcae train decoder_tiny --init SRC data.train=[photos]   # SRC: zoo name, Hub id, folder or file

The teacher (--init) gives the encoder, copied bit for bit and frozen in every phase, so the latent space
and its scaling factor stay the same: diffusion models trained on the teacher's latents keep working with
the student. `decoder.student` gives the student's decoder: `base: <zoo name>` (its decoder fields, e.g.
the Lite decoder) and/or DCAEConfig `decoder_*` fields. With `decoder.distill_weight > 0` each step adds
distill_weight * L1(student reconstruction, teacher decoder of the same latent) (teacher decoder frozen).
"""

from __future__ import annotations

import dataclasses
from itertools import dropwhile

import torch
from torch import nn

from dcae.models import DCAE, DCAEConfig
from dcae.models.config import get_config
from dcae.train.config import ConfigError, TrainConfig

# Fields the latent space is defined by: a student's base or explicit value must equal the teacher's.
LATENT_FIELDS = ("latent_channels", "scaling_factor")


def student_config(teacher: DCAEConfig, student: dict) -> DCAEConfig:
    """The teacher's config with the student's decoder fields; refuses a student whose latent differs."""
    fields = dict(student)
    name = fields.pop("name", None) or f"{teacher.name}-student"
    base = fields.pop("base", None)
    decoder = {}
    if base is not None:
        ref = get_config(base)
        _check_latent(teacher, {k: getattr(ref, k) for k in LATENT_FIELDS}, f"decoder.student.base {base}")
        decoder = {k: v for k, v in dataclasses.asdict(ref).items() if k.startswith("decoder_")}
    _check_latent(teacher, {k: fields.pop(k) for k in LATENT_FIELDS if k in fields}, "decoder.student")
    unknown = sorted(k for k in fields if not k.startswith("decoder_"))
    if unknown:
        raise ConfigError(
            f"decoder.student: {', '.join(unknown)} are not decoder fields (only base, name and decoder_* fields; "
            "the encoder and the latent come from --init)"
        )
    decoder.update(fields)
    try:
        cfg = dataclasses.replace(teacher, **decoder, name=name, hub_id=None, hub_id_diffusers=None)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"decoder.student: {exc}") from exc
    depths = list(cfg.decoder_depths)
    lead = len(depths) - len(list(dropwhile(lambda d: d == 0, depths)))
    if 0 in depths[lead:]:
        raise ConfigError(
            f"decoder.student: decoder_depths {depths}: a stage of depth 0 after the first non-empty one "
            "does not upsample (only leading stages may be empty)"
        )
    return cfg


def _check_latent(teacher: DCAEConfig, values: dict, where: str) -> None:
    for key, value in values.items():
        if value != getattr(teacher, key):
            raise ConfigError(
                f"{where}: {key} {value} does not match the encoder's {key} {getattr(teacher, key)} "
                f"({teacher.name}): a student decoder must read the teacher's latent unchanged"
            )


def load_teacher(init: str | None) -> DCAE:
    if init is None:
        raise ConfigError("the decoder recipe needs the teacher: pass --init SRC (a zoo name, Hub id, folder or file)")
    return DCAE.from_pretrained(init)


def student_model(cfg: TrainConfig, init: str | None) -> DCAE:
    """A seeded random student decoder behind the teacher's encoder (weights copied exactly)."""
    teacher = load_teacher(init)
    config = student_config(teacher.config, cfg.decoder.student or {})
    torch.manual_seed(cfg.seed)
    model = DCAE(config)
    model.encoder.load_state_dict(teacher.encoder.state_dict())
    return model


def check_encoder_frozen(model: nn.Module) -> None:
    """Raises when a phase would train an encoder tensor (a trainable pattern outside decoder.*)."""
    trained = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("decoder.")]
    if trained:
        raise ConfigError(
            f"the decoder recipe keeps the encoder frozen, but the phase's trainable patterns select {trained[:3]}"
        )


class Distiller(nn.Module):
    """weight * L1(student reconstruction, teacher decoder of the student's (= teacher's) latent)."""

    def __init__(self, teacher_decoder: nn.Module, weight: float) -> None:
        super().__init__()
        self.teacher = teacher_decoder.eval().requires_grad_(False)
        self.weight = weight

    def forward(self, x: torch.Tensor, rec: torch.Tensor, encoder: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            target = self.teacher(encoder(x))
        return self.weight * (rec.float() - target.float()).abs().mean()


def distiller(cfg: TrainConfig, init: str | None, device: torch.device) -> Distiller | None:
    """The distillation term, or None (no teacher decoder held) when decoder.distill_weight is 0."""
    if cfg.decoder.student is None or cfg.decoder.distill_weight <= 0:
        return None
    return Distiller(load_teacher(init).decoder, cfg.decoder.distill_weight).to(device)
