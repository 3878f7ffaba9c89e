"""`dcae t2i train` from a pretrained model (`finetune.pretrained`): a SANA pipeline folder or Hub id, a
transformer folder (diffusers' SanaTransformer2DModel), or one of our text-to-image runs / checkpoints (its EMA
weights). The network is built with the pretrained model's own config and weights, then trained fully or, with
`finetune.lora.rank` > 0, through LoRA adapters only (dcae.diffusion.train.lora).

The cache must hold what the model was trained on: latents of the same autoencoder weights and embeddings of the
same text encoder weights (compared by `dcae.models.weights.fingerprint`, which every cache records), the same
latent channels and caption width; otherwise one line naming both. A transformer folder records no encoders: only
the widths are compared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dcae.diffusion.cache import CacheIndex
from dcae.diffusion.nets.sana import SanaTransformer, config_kwargs, from_diffusers
from dcae.diffusion.t2i.encoders import TextEncoder
from dcae.diffusion.t2i.pipeline import load_pipeline
from dcae.diffusion.train import lora as lora_mod
from dcae.diffusion.train.checkpoint import build_model, latest_checkpoint, load_checkpoint
from dcae.errors import UserError
from dcae.models import weights
from dcae.utils.devices import resolve_dtype


@dataclass
class Pretrained:
    """A pretrained SANA transformer and what it was trained on (None: not recorded)."""

    model: SanaTransformer
    source: str
    autoencoder: str | None = None
    autoencoder_fingerprint: str | None = None
    scaling_factor: float | None = None
    text_encoder: str | None = None
    text_encoder_fingerprint: str | set[str] | None = None  # a set: any of these


def _is_checkpoint(path: Path) -> bool:
    return path.suffix == ".pt" or (path / "checkpoints").is_dir()


def load_pretrained(source: str, text_dtype: str = "fp32") -> Pretrained:
    """The transformer of `source` and the fingerprints of its autoencoder and text encoder weights."""
    path = Path(source).expanduser()
    if path.exists() and _is_checkpoint(path):
        model, _, meta = load_checkpoint(latest_checkpoint(path))
        if not isinstance(model, SanaTransformer):
            raise UserError(f"finetune.pretrained={source}: a {meta['model_args']['name']} checkpoint, not SANA")
        if lora_mod.has_lora(model):
            model = lora_mod.merge_lora(model)
        lat = meta["latents"]
        return Pretrained(model, meta["path"], lat.autoencoder, lat.autoencoder_fingerprint, lat.scaling_factor,
                          lat.text_encoder, lat.text_encoder_fingerprint)  # fmt: skip
    if path.is_dir() and (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        return Pretrained(from_diffusers(path, dtype=torch.float32), str(path))  # a transformer folder
    p = load_pipeline(source, instruction=False)
    p.transformer.float()
    folder = Path(p.scheduler_path).parent.parent  # the pipeline's folder (a Hub id: its snapshot)
    encoder = TextEncoder.from_pretrained(folder).model
    # the cache fingerprints its encoder as loaded: fp32, or in the dtype it records
    prints = {weights.fingerprint(encoder), weights.fingerprint(encoder.to(resolve_dtype(text_dtype)))}
    return Pretrained(p.transformer, str(source), str(folder / "vae"), weights.fingerprint(p.autoencoder),
                      p.scaling_factor, str(folder / "text_encoder"), prints)  # fmt: skip


def check_matches(pre: Pretrained, index: CacheIndex, data: str, what: str = "finetune.pretrained") -> None:
    """One line naming what differs between the model's training latents / text and the cache's."""
    m, c = pre.model, index.conditioning
    where = f"{what}={pre.source}"
    if m.in_channels != index.latent_channels:
        raise UserError(f"{where} takes {m.in_channels}-channel latents, the cache {data} holds "
                        f"{index.latent_channels}-channel ones ({index.autoencoder})")  # fmt: skip
    if index.kind != "text" or m.config["caption_channels"] != c.caption_channels:
        width = getattr(c, "caption_channels", None)
        raise UserError(f"{where} takes {m.config['caption_channels']}-wide text embeddings, the cache {data} "
                        f"holds {width or 'no text'} ({getattr(index, 'text_encoder', None)})")  # fmt: skip
    if index.latent_shape and any(s % m.patch_size for s in index.latent_shape[1:]):
        raise UserError(f"{where} has patch size {m.patch_size}, which does not divide the cache's latents "
                        f"{index.latent_shape}")  # fmt: skip
    if pre.autoencoder_fingerprint and index.autoencoder_fingerprint and (
            pre.autoencoder_fingerprint != index.autoencoder_fingerprint):  # fmt: skip
        raise UserError(f"{where} was trained on latents of autoencoder {pre.autoencoder}, the cache {data} holds "
                        f"latents of another one, {index.autoencoder} (weights differ)")  # fmt: skip
    if pre.scaling_factor and abs(pre.scaling_factor - index.scaling_factor) > 1e-6 * index.scaling_factor:
        raise UserError(f"{where} was trained on latents scaled by {pre.scaling_factor:g}, the cache {data} "
                        f"scales them by {index.scaling_factor:g}")  # fmt: skip
    prints = pre.text_encoder_fingerprint
    prints = {prints} if isinstance(prints, str) else prints
    if prints and index.text_encoder_fingerprint and index.text_encoder_fingerprint not in prints:
        raise UserError(f"{where} was trained with text encoder {pre.text_encoder}, the cache {data} with another "
                        f"one, {index.text_encoder} (weights differ)")  # fmt: skip


def model_args_of(model: SanaTransformer, conditioning: dict) -> dict:
    """The model_args (dcae.diffusion.train.checkpoint.build_model) that build `model`'s network: its whole
    diffusers config as overrides of SANA-tiny."""
    return _model_args_of_config(model.config, conditioning)


def planned_model_args(source: str, conditioning: dict) -> dict:
    """`--plan` of a fine-tuning run: the model_args of `source`'s network from its config alone (a pipeline's
    transformer/config.json, a transformer folder's config.json, a Hub id's, fetched without the weights), so
    that planning a 4.8B model loads no weights. One of our runs: its recorded model_args."""
    path = Path(source).expanduser()
    if path.exists() and _is_checkpoint(path):
        args = dict(load_checkpoint(latest_checkpoint(path))[2]["model_args"])
        args.pop("lora", None)  # a LoRA run's adapters are merged when it is the start of another run
        return args
    if not path.exists():  # a Hub id: its transformer's config only
        path = weights.hub_snapshot(source, allow_patterns=["transformer/config.json", "model_index.json"])
    config = path / "transformer" / "config.json" if (path / "model_index.json").is_file() else path / "config.json"
    if not config.is_file():
        raise UserError(f"finetune.pretrained={source}: no transformer config.json ({config})")
    return _model_args_of_config(json.loads(config.read_text()), conditioning)


def _model_args_of_config(config: dict, conditioning: dict) -> dict:
    cfg = config_kwargs(config)
    # caption width and tokens come from the conditioning (normalized_model_args keeps them there only)
    overrides = {
        k: v for k, v in cfg.items() if k not in ("in_channels", "out_channels", "sample_size", "caption_channels")
    }
    return {"name": "SANA-tiny", "in_channels": cfg["in_channels"], "input_size": cfg["sample_size"],
            "learn_sigma": False, "overrides": overrides, "conditioning": conditioning}  # fmt: skip


def pretrained_model(cfg, ds, model_args: dict) -> tuple[dict, torch.nn.Module]:
    """The training loop's hook: (model_args, network) for `cfg.finetune`: the pretrained network with its
    weights (else the config's, randomly initialised), with LoRA adapters when finetune.lora.rank > 0."""
    f = cfg.finetune
    if f.pretrained:
        pre = load_pretrained(f.pretrained, ds.index.text_dtype or "fp32")
        check_matches(pre, ds.index, cfg.data)
        model_args = model_args_of(pre.model, model_args["conditioning"])
        if pre.model.config.get("out_channels") != pre.model.in_channels:
            raise UserError(f"finetune.pretrained={pre.source}: out_channels != in_channels (learned sigma) is "
                            "not a flow-matching SANA")  # fmt: skip
        model = build_model(model_args)
        model.load_state_dict(pre.model.state_dict())
    else:
        model = build_model(model_args)
    if f.lora.rank:
        model_args = {**model_args, "lora": lora_mod.spec_of(f)}
        lora_mod.add_lora(model, model_args["lora"])
    if f.trainable:
        lora_mod.train_only(model, f.trainable)
    return model_args, model
