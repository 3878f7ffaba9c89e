"""The latent cache: the contract between the autoencoder and diffusion, for both kinds of data.

A cache folder holds latents already multiplied by the autoencoder's scaling factor, in safetensors shards, and
`index.json`: one typed record (`CacheIndex`) of what they are: the autoencoder (where it loads from, its
config, its scaling factor and compression), the latent size (one shape, or resolution buckets), the
conditioning (class labels, encoded prompts with the text encoder and token count, or none) and the shards.
`dcae latents` (dcae.diffusion.c2i.latents) and `dcae t2i cache` (dcae.diffusion.t2i.cache) write it through
this module, the training loop and the samplers read it through it, and a checkpoint records its summary.

What both kinds share lives here: the record (read, validated, written; the two formats of earlier versions
still read), the shard writer and the resumable plan (a folder of another plan is refused, finished shards of
this one are kept), `decode_scaled` (the one place the scaling factor is divided out) and `CacheDataset`, the
dataset protocol the training loop uses without asking which kind it holds.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dcae.diffusion.conditioning import Condition, Conditioning, TextConditioning, from_spec
from dcae.errors import UserError, brief
from dcae.models import weights
from dcae.models.autoencoder import DCAE
from dcae.utils.io import atomic_save_safetensors, atomic_write_json

INDEX_NAME = "index.json"
FORMAT = "dcae-latent-cache/2"
# Earlier versions wrote one format per kind; both still read (`CacheIndex.from_json`).
LEGACY_FORMATS = {"dcae-latents/1": "dcae latents", "dcae-text-latents/1": "dcae t2i cache"}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


@dataclass(frozen=True)
class Shard:
    file: str  # a file name inside the cache folder
    count: int  # latents in it
    bucket: tuple[int, int] | None = None  # the image size (h, w) of its resolution bucket; None: the cache's one


@dataclass
class CacheIndex:
    """What a latent cache holds. `autoencoder` is what `DCAE.from_pretrained` loads (a zoo name or Hub id, or an
    absolute path); the latents are `encode(x) * scaling_factor`."""

    autoencoder: str
    autoencoder_config: dict[str, Any]
    scaling_factor: float
    spatial_compression: int
    latent_channels: int
    resolution: int  # center-crop size, or the base size of the resolution buckets
    conditioning: Conditioning
    shards: list[Shard] = field(default_factory=list)
    fingerprint: str = ""  # names the plan: a rerun with the same plan resumes, another one is refused
    complete: bool = False
    latent_shape: tuple[int, int, int] | None = None  # (C, h, w) when every latent has it; None with buckets
    patch_size: int = 1  # the network's patch size the buckets were cut for
    flip: bool = False  # shards also hold `latents_flip` (the mirrored crops)
    class_names: list[str] | None = None
    class_ids: list[str] | None = None  # e.g. WordNet ids
    label_source: str | None = None  # file | folders | filenames
    data: str | None = None  # the data the latents come from
    skipped: list[str] = field(default_factory=list)  # inputs left out, with the reason (the first 100)
    num_skipped: int | None = None  # how many were left out in all (None: as many as listed)
    latent_rms: float | None = None  # of all scaled latents, once complete (about 1 when the factor fits)
    # What the latents were computed with, beyond the names: the weights (dcae.models.weights.fingerprint) and
    # the dtypes. Part of the plan: weights replaced at the same path or another dtype make a new plan.
    autoencoder_fingerprint: str | None = None
    text_encoder_fingerprint: str | None = None
    dtype: str | None = None  # the autoencoder's compute dtype (fp32, bf16, fp16)
    text_dtype: str | None = None  # the text encoder's

    @classmethod
    def of_autoencoder(cls, autoencoder, source: str, resolution: int, **fields: Any) -> CacheIndex:
        """The record of a cache of `autoencoder`'s latents (a DCAE loaded from `source`, recorded as an absolute
        path if it is a local one, with the fingerprint of its weights); `fields`: the rest."""
        return cls(
            autoencoder=recorded_source(source),
            autoencoder_config=autoencoder.config.to_dict(),
            scaling_factor=float(autoencoder.scaling_factor),
            spatial_compression=autoencoder.spatial_compression,
            latent_channels=autoencoder.latent_channels,
            resolution=resolution,
            autoencoder_fingerprint=weights.fingerprint(autoencoder),
            **fields,
        )

    @property
    def num_images(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def skipped_count(self) -> int:
        return len(self.skipped) if self.num_skipped is None else max(self.num_skipped, len(self.skipped))

    @property
    def kind(self) -> str:
        return self.conditioning.kind

    @property
    def num_classes(self) -> int:
        return self.conditioning.num_classes

    @property
    def text_encoder(self) -> str | None:
        return getattr(self.conditioning, "text_encoder", None)

    @property
    def buckets(self) -> list[tuple[int, int]]:
        return sorted({s.bucket for s in self.shards if s.bucket is not None})

    # ------------------------------------------------------------------------- JSON
    def summary(self) -> dict[str, Any]:
        """What a checkpoint records of the latents it was trained on: everything but the shards and the
        conditioning, which the checkpoint records once, with the model it builds (`from_summary`)."""
        out = self.to_json()
        del out["shards"], out["conditioning"]
        return out

    @classmethod
    def from_summary(cls, d: Any, conditioning: dict[str, Any], where: str) -> CacheIndex:
        """The record of a checkpoint's latents (`summary()`), with the conditioning spec of its model."""
        d = _from_legacy(d) if isinstance(d, dict) and "model" in d and "autoencoder" not in d else d
        return cls.from_json({**d, "conditioning": conditioning} if isinstance(d, dict) else d, where, shards=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "autoencoder": self.autoencoder,
            "autoencoder_config": self.autoencoder_config,
            "scaling_factor": float(self.scaling_factor),
            "spatial_compression": self.spatial_compression,
            "latent_channels": self.latent_channels,
            "resolution": self.resolution,
            "latent_shape": list(self.latent_shape) if self.latent_shape else None,
            "patch_size": self.patch_size,
            "flip": self.flip,
            "conditioning": self.conditioning.spec(),
            "text_encoder": self.text_encoder,
            "class_names": self.class_names,
            "class_ids": self.class_ids,
            "label_source": self.label_source,
            "data": self.data,
            "num_images": self.num_images,
            "skipped": self.skipped[:100],
            "num_skipped": self.num_skipped,
            "shards": [
                {"file": s.file, "count": s.count, **({"bucket": list(s.bucket)} if s.bucket else {})}
                for s in self.shards
            ],
            "fingerprint": self.fingerprint,
            "complete": self.complete,
            "latent_rms": self.latent_rms,
            "autoencoder_fingerprint": self.autoencoder_fingerprint,
            "text_encoder_fingerprint": self.text_encoder_fingerprint,
            "dtype": self.dtype,
            "text_dtype": self.text_dtype,
        }

    @classmethod
    def from_json(cls, d: Any, where: str, shards: bool = True) -> CacheIndex:
        """The record from its JSON (this format or an earlier one); anything missing or of the wrong type is a
        UserError naming `where` and the field. `shards=False` reads a summary (a checkpoint's)."""
        if not isinstance(d, dict):
            raise UserError(f"{where}: not a latent cache record (a JSON object expected, got {type(d).__name__})")
        fmt = d.get("format", FORMAT if not shards else None)
        if fmt in LEGACY_FORMATS:
            d = _from_legacy(d)
        elif fmt != FORMAT:
            raise UserError(
                f"{where}: unknown format {fmt!r} (expected {FORMAT} or one of {', '.join(LEGACY_FORMATS)})"
            )
        try:
            return cls._checked(d, shards)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{where}: damaged latent cache record: {brief(exc)}") from None

    @classmethod
    def _checked(cls, d: dict, shards: bool) -> CacheIndex:
        sf = d.get("scaling_factor")
        if sf is None:
            raise ValueError("no scaling_factor: the latents cannot be decoded (recreate the cache)")
        if isinstance(sf, bool) or not isinstance(sf, (int, float)) or not math.isfinite(sf) or sf <= 0:
            raise ValueError(f"scaling_factor: not a positive number: {sf!r}")
        if not isinstance(d.get("autoencoder"), str) or not d["autoencoder"]:
            raise ValueError("autoencoder: not a model name or path")
        shape = d.get("latent_shape")
        if shape is not None and (
            not isinstance(shape, list) or len(shape) != 3 or not all(_count(v, 1) for v in shape)
        ):
            raise ValueError(f"latent_shape: not three positive sizes: {shape!r}")
        for key in ("spatial_compression", "latent_channels", "resolution", "patch_size"):
            if d.get(key) is not None and not _count(d[key], 1):
                raise ValueError(f"{key}: not a positive integer: {d[key]!r}")
        for flag in ("flip", "complete"):
            if not isinstance(d.get(flag, False), bool):
                raise ValueError(f"{flag}: not true or false")
        names = d.get("class_names")
        if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
            raise ValueError("class_names: not a list of names")
        listed = [_shard(k, s) for k, s in enumerate(d.get("shards") or [])] if shards else []
        if shards and not listed:
            raise ValueError("shards: not a list of shards")
        config = d.get("autoencoder_config") or {}
        channels = d.get("latent_channels") or (shape[0] if shape else None) or config.get("latent_channels")
        if channels is None:
            raise ValueError("latent_channels: missing")
        rms = d.get("latent_rms")
        return cls(
            autoencoder=d["autoencoder"],
            autoencoder_config=dict(d.get("autoencoder_config") or {}),
            scaling_factor=float(sf),
            spatial_compression=int(d.get("spatial_compression") or 1),
            latent_channels=int(channels),
            resolution=int(d.get("resolution") or 0),
            conditioning=from_spec(d.get("conditioning"), d.get("text_encoder")),
            shards=listed,
            fingerprint=str(d.get("fingerprint") or ""),
            complete=bool(d.get("complete", not shards)),
            latent_shape=tuple(shape) if shape else None,
            patch_size=int(d.get("patch_size") or 1),
            flip=bool(d.get("flip", False)),
            class_names=names,
            class_ids=d.get("class_ids"),
            label_source=d.get("label_source"),
            data=d.get("data"),
            skipped=[str(s) for s in d.get("skipped") or []],
            num_skipped=d["num_skipped"] if _count(d.get("num_skipped")) else None,
            latent_rms=float(rms) if isinstance(rms, (int, float)) and not isinstance(rms, bool) else None,
            autoencoder_fingerprint=_text(d, "autoencoder_fingerprint"),
            text_encoder_fingerprint=_text(d, "text_encoder_fingerprint"),
            dtype=_text(d, "dtype"),
            text_dtype=_text(d, "text_dtype"),
        )


def _text(d: dict, key: str) -> str | None:
    v = d.get(key)
    if v is not None and not isinstance(v, str):
        raise ValueError(f"{key}: not a string: {v!r}")
    return v


def _count(v: Any, low: int = 0) -> bool:
    return type(v) is int and v >= low


def _sizes(v: Any, n: int) -> bool:
    """A list of n positive integers."""
    return isinstance(v, list) and len(v) == n and all(_count(x, 1) for x in v)


def _shard(k: int, s: Any) -> Shard:
    name = s.get("file") if isinstance(s, dict) else None
    if not isinstance(name, str) or not name or Path(name).name != name or not _count(s.get("count")):
        raise ValueError(f"shards[{k}]: not a file name and a count")
    bucket = s.get("bucket")
    if bucket is not None and (
        not isinstance(bucket, list) or len(bucket) != 2 or not all(_count(v, 1) for v in bucket)
    ):
        raise ValueError(f"shards[{k}].bucket: not a height and a width: {bucket!r}")
    return Shard(name, s["count"], tuple(bucket) if bucket else None)


def _from_legacy(d: dict) -> dict:
    """An index of `dcae-latents/1` or `dcae-text-latents/1` (or a checkpoint's summary of one) in this format:
    the autoencoder was `model` / `model_config`, the conditioning was implied by the format."""
    out = {k: v for k, v in d.items() if k not in ("model", "model_config", "format")}
    out["autoencoder"], out["autoencoder_config"] = d.get("model"), d.get("model_config")
    text = d.get("format") == "dcae-text-latents/1" or d.get("text_encoder") is not None
    if text:
        spec = {"kind": "text", "caption_channels": d.get("caption_channels"), "max_tokens": d.get("max_tokens")}
    elif d.get("num_classes"):
        spec = {"kind": "class", "num_classes": d["num_classes"]}
    else:
        spec = {"kind": "none"}
    out["conditioning"] = spec
    if out.get("latent_channels") is None and isinstance(d.get("latent_shape"), list) and d["latent_shape"]:
        out["latent_channels"] = d["latent_shape"][0]
    return out


# ----------------------------------------------------------------------------- reading and writing the index
def read_index(root: str | os.PathLike, complete: bool = True) -> CacheIndex:
    """The record of a cache folder; with `complete`, an unfinished cache is an error that says how to finish it."""
    path = Path(root) / INDEX_NAME
    if not path.exists():
        raise UserError(f"{root} is not a latent folder (no {INDEX_NAME}); create one with `dcae latents` "
                        "(class labels or none) or `dcae t2i cache` (captions)")  # fmt: skip
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the index ({type(exc).__name__}: {exc})") from None
    index = CacheIndex.from_json(data, str(path))
    if complete and not index.complete:
        raise UserError(f"{root}: the cache has not finished; rerun `{writer_command(index)}` to complete it")
    return index


def writer_command(index: CacheIndex) -> str:
    return "dcae t2i cache" if isinstance(index.conditioning, TextConditioning) else "dcae latents"


def write_index(root: str | os.PathLike, index: CacheIndex) -> None:
    atomic_write_json(Path(root) / INDEX_NAME, index.to_json())


# ----------------------------------------------------------------------------- the resumable plan and its shards
def start_plan(out: Path, index: CacheIndex, overwrite: bool, rank: int = 0) -> None:
    """Refuse a folder that holds a cache of another plan (with `overwrite`, clear its shards), then write the
    index (not complete). Shards of this plan already on disk are kept: a rerun resumes."""
    path = out / INDEX_NAME
    old = None
    if path.exists():
        try:
            old = json.loads(path.read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            old = None  # a damaged index: its shards are not trusted
        if old != index.fingerprint:
            if not overwrite:
                raise UserError(f"{out} holds latents of a different run (data, models or settings differ); "
                                "choose another output folder or pass --overwrite")  # fmt: skip
            if rank == 0:
                for p in out.glob("shard-*.safetensors"):
                    p.unlink()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_index(out, index)


def shard_is_complete(path: Path, count: int, fingerprint: str, also: tuple[str, ...] = ()) -> bool:
    """A shard counts as done when it opens, was written for this plan and holds `count` latents and the tensors
    `also` (flipped latents, text embeddings)."""
    if not path.exists():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return False  # from another run: recompute it
            keys = set(f.keys())
            ok = "latents" in keys and f.get_slice("latents").get_shape()[0] == count
            return ok and all(k in keys for k in also)
    except Exception:
        return False  # unreadable: recompute it


def pending_shards(out: Path, index: CacheIndex, also: tuple[str, ...] = (), mine=None) -> list[int]:
    """The shards of the plan (of `mine`, default all) that are not on disk yet."""
    ks = range(len(index.shards)) if mine is None else mine
    return [k for k in ks if not shard_is_complete(out / index.shards[k].file, index.shards[k].count,
                                                   index.fingerprint, also)]  # fmt: skip


def write_shard(out: Path, index: CacheIndex, k: int, tensors: dict[str, torch.Tensor], **meta: str) -> None:
    """Shard k, atomically, stamped with the plan's fingerprint and the sum of squares of its latents (for the
    cache's latent RMS)."""
    z = tensors["latents"].double()
    stats = {"sumsq": repr(float(z.square().sum())), "numel": str(z.numel())}
    meta = {"autoencoder": index.autoencoder, "fingerprint": index.fingerprint, **stats, **meta}
    atomic_save_safetensors(tensors, out / index.shards[k].file, metadata=meta)


def finish_plan(out: Path, index: CacheIndex, also: tuple[str, ...] = ()) -> CacheIndex:
    """Mark the cache complete (with its latent RMS) when every shard of the plan is on disk; write the index."""
    index = replace(index, complete=not pending_shards(out, index, also))
    if index.complete:
        index.latent_rms = latent_rms(out, index)
    write_index(out, index)
    return index


def latent_rms(out: Path, index: CacheIndex) -> float | None:
    """RMS of the scaled latents over all shards (from their metadata). A diffusion model expects about 1: far
    from it, the autoencoder's scaling factor does not fit (set it to scaling_factor / rms)."""

    sumsq, numel = 0.0, 0
    for s in index.shards:
        with safe_open(str(out / s.file), framework="pt") as f:
            meta = f.metadata() or {}
        if "sumsq" not in meta:
            return None
        sumsq, numel = sumsq + float(meta["sumsq"]), numel + int(meta["numel"])
    return (sumsq / max(numel, 1)) ** 0.5


def recorded_source(source: str | os.PathLike | None) -> str | None:
    """How a cache, a checkpoint's summary or a sample folder's plan records a model (the autoencoder, the text
    encoder, a checkpoint, a pipeline): a local folder or file as an absolute path (so that the record means the
    same thing from any working directory), a zoo name or Hub id as given; None stays None."""
    if source is None:
        return None
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


# ----------------------------------------------------------------------------- reading back
def load_autoencoder(record: CacheIndex, override: str | None = None):
    """The autoencoder that decodes latents of `record` (a cache's, or a checkpoint's summary of it): the one it
    records, whose weights must still be the ones the latents were made with, or `override` (--autoencoder),
    taken as given."""
    source = override or record.autoencoder
    ae = DCAE.from_pretrained(source)
    if override is None and record.autoencoder_fingerprint:
        found = weights.fingerprint(ae)
        if found != record.autoencoder_fingerprint:
            raise UserError(
                f"{source}: not the autoencoder weights the latents were made with (fingerprint {found}, the record "
                f"says {record.autoencoder_fingerprint}): they were replaced since; pass --autoencoder {source} to "
                "decode with them anyway"
            )
    return ae


def decode_scaled(autoencoder, z: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Images in [-1, 1] (float32) from latents stored scaled, z * scaling_factor, as the caches hold them and
    diffusion models generate them. The one place the diffusion side divides the scaling factor out."""
    return autoencoder.decode(z.float() / scaling_factor).float()


class CacheDataset(torch.utils.data.Dataset):
    """What the training loop asks of a latent cache, whatever it holds. Items are (latent C x h x w float32,
    *condition fields); `condition(fields, device)` turns a batch's fields into the condition the network takes;
    `epoch_batches` plans each epoch's global batches (seeded, so a resumed run repeats it)."""

    index: CacheIndex
    epoch: int = 0

    @property
    def conditioning(self) -> Conditioning:
        return self.index.conditioning

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the network's input: the cache's one shape (for sample grids and the network's size)."""
        return tuple(self.index.latent_shape)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def condition(self, fields: list[torch.Tensor], device) -> Condition | None:
        raise NotImplementedError

    def untrained(self, batch_size: int) -> dict[tuple[int, int], tuple[int, int]]:
        """Per resolution bucket: (its items, how many no batch of an epoch holds). A cache of one latent size has
        no buckets: its remainder after full batches changes every epoch, and no image is left out for good."""
        return {}

    def epoch_batches(self, epoch: int, seed: int, batch_size: int) -> list[list[int]]:
        """The global batches of an epoch: perm[b*B:(b+1)*B] of a permutation seeded by (seed, epoch); the
        remainder that does not fill a batch waits for the next epoch's permutation."""
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        return [perm[b * batch_size : (b + 1) * batch_size] for b in range(len(self) // batch_size)]
