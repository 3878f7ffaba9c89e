"""Precomputed DC-AE latents and text embeddings for text-to-image training (`dcae t2i cache`), and a Dataset.

Training never runs the text encoder or the autoencoder: both run once here. Images are sorted into
resolution buckets (several aspect ratios at about `resolution`^2 pixels, dcae.data.buckets), each shard
holds one bucket. Layout of an output folder:

    index.json                  the cache record (dcae.diffusion.cache): autoencoder, scaling factor, text
                                encoder, token count, buckets, shards
    captions.jsonl              {"image": name, "caption": ..., "bucket": [h, w]} per item, in shard order
    null_text.safetensors       the empty prompt's encoding (null_emb (L, D), null_mask (L,)): the null condition
    shard-00000.safetensors     latents (N, C, h, w) float32 (times the scaling factor), text_emb (N, L, D),
                                text_mask (N, L) uint8

Like `dcae latents`, extraction is resumable (shards written atomically, a restarted run skips those on disk
that belong to the same plan) and a folder of another plan is refused unless overwritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from dcae.data.buckets import assign_buckets, bucket_table
from dcae.data.captions import Captioned, CaptionList, list_captioned, read_captioned
from dcae.data.sources import Skipped, nothing_readable, read_image, record_skip
from dcae.diffusion import cache
from dcae.diffusion.cache import CacheDataset, CacheIndex, Shard, shard_name
from dcae.diffusion.conditioning import Text, TextConditioning
from dcae.diffusion.t2i.encoders import encoder_for
from dcae.errors import ImageReadError, NonFiniteError, UserError, brief
from dcae.models import weights
from dcae.utils.devices import dtype_name
from dcae.utils.io import atomic_save_safetensors, atomic_write_text

NULL_NAME, CAPTIONS_NAME = "null_text.safetensors", "captions.jsonl"
ALSO = ("text_emb",)  # what a finished shard holds besides the latents


# ----------------------------------------------------------------------------- the plan
def _plan(items: list[Captioned], buckets: list, shard_size: int) -> list[dict]:
    """Shards of one bucket each, buckets in table order, items in listing order within a bucket."""
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, b in enumerate(buckets):
        if b is not None:
            by_bucket.setdefault(tuple(b), []).append(i)
    shards = []
    for bucket in sorted(by_bucket, key=lambda s: s[0] / s[1]):
        idx = by_bucket[bucket]
        for lo in range(0, len(idx), shard_size):
            shards.append({"file": shard_name(len(shards)), "bucket": list(bucket), "items": idx[lo : lo + shard_size]})
    return shards


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def extract_text_latents(
    autoencoder,
    encoder,
    data,
    out: str | os.PathLike,
    model_name: str | None = None,
    resolution: int = 512,
    patch_size: int = 1,
    batch_size: int = 16,
    shard_size: int = 1024,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    text_dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
    progress: bool = True,
) -> CacheIndex:
    """Encode every captioned image of `data` (folders with sidecar captions, JSONL / CSV manifests, webdataset
    shards: dcae.data.captions) with the DC-AE `autoencoder` and its caption with the text `encoder`
    (dcae.diffusion.t2i.encoders.TextEncoder) into shards in `out`; returns the index."""

    out = Path(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    f = autoencoder.spatial_compression
    try:  # before any image is read: a resolution no bucket fits is the user's to change
        bucket_table(resolution, f * patch_size)
    except ValueError:
        raise UserError(f"--resolution {resolution}: no resolution bucket of about {resolution}^2 pixels has sides "
                        f"that are multiples of {f * patch_size} (the autoencoder's f{f} times the patch size "
                        f"{patch_size}); use a resolution of at least {f * patch_size}") from None  # fmt: skip
    items = list_captioned(data)
    buckets = assign_buckets(_read_sizes(items, progress), resolution, f * patch_size)
    shards = _plan(items, buckets, shard_size)
    if not shards:
        raise nothing_readable(items.sources, items.skipped)
    index = CacheIndex.of_autoencoder(
        autoencoder,
        model_name or autoencoder.config.name,
        resolution,
        conditioning=TextConditioning(encoder.width, encoder.max_tokens, cache.recorded_source(encoder.name)),
        shards=[Shard(s["file"], len(s["items"]), tuple(s["bucket"])) for s in shards],
        text_encoder_fingerprint=weights.fingerprint(encoder.model),
        dtype=dtype_name(dtype),
        text_dtype=dtype_name(text_dtype),
        patch_size=patch_size,
        data=" ".join(str(d) for d in data) if isinstance(data, (list, tuple)) else str(data),
        skipped=[s.error for s in getattr(items, "skipped", [])][:100],
        num_skipped=len(getattr(items, "skipped", [])),
    )
    # The plan: both models (where they load from, their weights and dtypes), the settings and every item.
    index.fingerprint = fingerprint = _fingerprint(
        index.autoencoder, index.autoencoder_fingerprint, index.dtype, index.text_encoder,
        index.text_encoder_fingerprint, index.text_dtype, encoder.max_tokens, resolution, patch_size, shard_size,
        [(items[i].name, items[i].caption) for s in shards for i in s["items"]],
    )  # fmt: skip
    cache.start_plan(out, index, overwrite)
    _write_captions_and_null(out, items, shards, encoder, fingerprint)
    autoencoder = autoencoder.to(device=device, dtype=dtype).eval()
    total = index.num_images
    todo = cache.pending_shards(out, index, ALSO)
    bar = tqdm(total=total, initial=total - sum(index.shards[k].count for k in todo), unit="img",
               desc=f"t2i cache {out.name}", disable=not progress)  # fmt: skip
    for k in todo:
        s = shards[k]
        tensors = _encode_shard(autoencoder, encoder, [items[i] for i in s["items"]], tuple(s["bucket"]),
                                batch_size, device, dtype, text_dtype, bar)  # fmt: skip
        cache.write_shard(out, index, k, tensors, bucket=json.dumps(s["bucket"]))
    bar.close()
    return cache.finish_plan(out, index, ALSO)


def _read_sizes(items: CaptionList, progress: bool = True, threads: int = 8) -> list[tuple[int, int] | None]:
    """The upright (height, width) of each item's image, read whole, as encoding will read it: an image cut
    short after a good header is named, skipped and counted here (`items.skipped`, in listing order), not
    found halfway through encoding a plan that counts it. Images are read in threads; a tar shard's members
    in one thread (a compressed shard's reader is shared)."""
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.ref.path if item.ref.kind == "tar" else str(i), []).append(i)

    def read(idx: list[int]) -> list[tuple[int, tuple[int, int] | None, str | None]]:
        found = []
        for i in idx:
            try:
                found.append((i, tuple(read_image(items[i].ref).shape[:2]), None))
            except ImageReadError as exc:
                found.append((i, None, str(exc)))
        return found

    sizes: list[tuple[int, int] | None] = [None] * len(items)
    errors: dict[int, str] = {}
    work = list(groups.values())
    bar = tqdm(total=len(items), unit="img", desc="reading images", disable=not progress or len(items) < 1000)
    with ThreadPoolExecutor(max(1, min(threads, os.cpu_count() or 1))) as pool:
        for lo in range(0, len(work), 4096):  # a bounded number of pending reads
            for found in pool.map(read, work[lo : lo + 4096]):
                for i, size, error in found:
                    sizes[i] = size
                    if error is not None:
                        errors[i] = error
                bar.update(len(found))
    bar.close()
    for i in sorted(errors):
        record_skip(items.skipped, Skipped(items[i].name, errors[i]))
    return sizes


def _write_captions_and_null(out: Path, items, shards, encoder, fingerprint: str) -> None:
    """captions.jsonl (what each latent shows) and the empty prompt's encoding (the null condition)."""
    lines = [json.dumps({"image": items[i].name, "caption": items[i].caption, "bucket": s["bucket"]})
             for s in shards for i in s["items"]]  # fmt: skip
    atomic_write_text(out / CAPTIONS_NAME, "\n".join(lines) + "\n")
    null_emb, null_mask = encoder.null()
    atomic_save_safetensors({"null_emb": null_emb.float(), "null_mask": null_mask.to(torch.uint8)},
                            out / NULL_NAME, metadata={"fingerprint": fingerprint})  # fmt: skip


def _encode_shard(autoencoder, encoder, items: list[Captioned], bucket, batch_size, device, dtype, text_dtype, bar):
    zs, embs, masks = [], [], []
    for lo in range(0, len(items), batch_size):
        batch = items[lo : lo + batch_size]
        arrays, captions = zip(*(read_captioned(it, bucket) for it in batch))
        x = torch.from_numpy(np.stack(arrays)).to(device).permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0
        z = autoencoder.scale_latents(autoencoder.encode(x)).float()
        if not torch.isfinite(z).all():
            raise NonFiniteError(f"the autoencoder produced NaN/Inf latents for one of {[it.name for it in batch]}")
        text = encoder.encode(list(captions))
        zs.append(z.cpu())
        embs.append(text.emb.to(text_dtype).cpu())
        masks.append(text.mask.to(torch.uint8).cpu())
        bar.update(len(batch))
    return {"latents": torch.cat(zs), "text_emb": torch.cat(embs), "text_mask": torch.cat(masks)}


# ----------------------------------------------------------------------------- reading back
class TextLatentDataset(CacheDataset):
    """Items (latent C x h x w float32, text embeddings L x D, mask L) of a `dcae t2i cache` folder. Batches
    come from one bucket each (`epoch_batches`); `condition` turns a batch's text into a `Text`. A cache of up
    to 2 GB is held in memory; a larger one (or in_memory=False) is read item by item from the shards
    (safetensors slices), so that each training process reads only the items of its share of the batches
    instead of holding the whole cache once per process."""

    def __init__(
        self, root: str | os.PathLike, use_flip: bool = False, seed: int = 0, index: CacheIndex | None = None,
        in_memory: bool | None = None,
    ) -> None:  # fmt: skip
        # use_flip: text caches hold no mirrored latents (a caption may say left or right)

        self.root, self.seed, self.epoch = Path(root), seed, 0
        self.index = index or cache.read_index(self.root)
        if not isinstance(self.index.conditioning, TextConditioning):
            raise UserError(f"{root} is a cache of class labels or no condition, not of captions")
        null = _load(self.root / NULL_NAME, load_file)
        self.null_emb, self.null_mask = null["null_emb"], null["null_mask"].long()
        self._handles: dict[int, object] = {}
        self.shapes = [_shapes(self.root / s.file) for s in self.index.shards]  # key -> shape, from the headers
        self.counts = [sh["latents"][0] for sh in self.shapes]
        self.offsets = np.cumsum([0, *self.counts]).tolist()
        for s, sh, n in zip(self.index.shards, self.shapes, self.counts):
            if n != s.count or tuple(sh["text_emb"][1:]) != tuple(self.null_emb.shape):
                raise UserError(f"{self.root / s.file} does not match its index (count or text shape)")
        if in_memory is None:
            in_memory = sum((self.root / s.file).stat().st_size for s in self.index.shards) <= 2 * 1024**3
        self.parts = [_load(self.root / s.file, load_file) for s in self.index.shards] if in_memory else None

    @property
    def conditioning(self) -> TextConditioning:
        """The cache's text conditioning, able to encode prompts with the encoder it was made with (loaded on
        first use; sample grids encode their prompts through it)."""

        c = self.index.conditioning
        return dataclasses.replace(c, encode=encoder_for(c))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The channels and the size of the most common bucket (for sample grids)."""
        k = int(np.argmax(self.counts))
        return tuple(self.shapes[k]["latents"][1:])

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int):
        k = bisect_right(self.offsets, i) - 1
        j = i - self.offsets[k]
        if self.parts is not None:
            p = self.parts[k]
            return p["latents"][j].float(), p["text_emb"][j], p["text_mask"][j].long()
        if k not in self._handles:
            self._handles[k] = _open(self.root / self.index.shards[k].file)
        h = self._handles[k]
        row = [h.get_slice(key)[j : j + 1][0] for key in ("latents", "text_emb", "text_mask")]
        return row[0].float(), row[1], row[2].long()

    def __getstate__(self) -> dict:  # file handles do not cross process boundaries (DataLoader workers)
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def condition(self, fields: list[torch.Tensor], device) -> Text:
        emb, mask = fields  # stored in half precision: the network takes fp32 (autocast casts where it runs)
        return Text(
            emb.to(device).float(), mask.to(device), self.null_emb.to(device).float(), self.null_mask.to(device)
        )

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """How many items each resolution bucket (height, width in pixels) holds, in bucket order."""
        counts: dict[tuple[int, int], int] = {}
        for s, n in zip(self.index.shards, self.counts):  # a bucket may span several shards
            counts[tuple(s.bucket)] = counts.get(tuple(s.bucket), 0) + n
        return dict(sorted(counts.items()))

    def untrained(self, batch_size: int) -> dict[tuple[int, int], tuple[int, int]]:
        """Per bucket: (its items, how many of them no batch of an epoch holds). A batch is one bucket's, so
        a bucket smaller than the batch is never trained; of a larger one, the remainder after its full
        batches is left out (another remainder each epoch: each epoch shuffles the bucket)."""
        return {bucket: (n, n % batch_size) for bucket, n in self.bucket_counts().items()}

    def epoch_batches(self, epoch: int, seed: int, batch_size: int) -> list[list[int]]:
        """The global batches of an epoch: each bucket's items shuffled and cut into full batches, the
        batches of all buckets in a shuffled order, all seeded by (seed, epoch). What is left out:
        `untrained`."""
        rng = random.Random(seed * 100_003 + epoch)
        batches = []
        by_bucket: dict[tuple, list[int]] = {}  # a bucket may span several shards
        for k, s in enumerate(self.index.shards):
            by_bucket.setdefault(s.bucket, []).extend(range(self.offsets[k], self.offsets[k + 1]))
        for bucket in sorted(by_bucket):
            idx = by_bucket[bucket]
            rng.shuffle(idx)
            batches += [idx[b : b + batch_size] for b in range(0, len(idx) - batch_size + 1, batch_size)]
        rng.shuffle(batches)
        return batches


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:
        raise UserError(f"cannot read {path}: {type(exc).__name__}: {brief(exc)}") from None


def _shapes(path: Path) -> dict[str, list[int]]:
    """The tensors' shapes of a shard, from its header (nothing else is read)."""
    h = _open(path)
    try:
        return {key: list(h.get_slice(key).get_shape()) for key in ("latents", "text_emb", "text_mask")}
    except Exception as exc:
        raise UserError(f"{path} does not match its index ({type(exc).__name__}: {brief(exc)})") from None


def _load(path: Path, load_file) -> dict:
    try:
        return load_file(str(path))
    except Exception as exc:
        raise UserError(f"cannot read {path}: {type(exc).__name__}: {brief(exc)}") from None
