"""Precomputed DC-AE latents for diffusion training: extraction to safetensors shards, and a Dataset.

Layout of an output folder (a latent cache, dcae.diffusion.cache):
    index.json                  the cache record: autoencoder, scaling factor, latent shape, labels, shards
    files.txt                   the source image of every latent, in order (one relative path per line)
    shard-00000.safetensors     latents (N, C, h, w) float32 already multiplied by the scaling factor,
                                latents_flip (with --flip: the horizontally flipped image), labels (N,) int64

Extraction is resumable: shards are written atomically, a restarted run re-checks the plan in index.json
and skips every shard already on disk. Several processes (accelerate / torchrun) split the shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from dcae.data.images import ImageReadError, center_crop_arr
from dcae.data.sources import ImageRef, list_images, read_image
from dcae.diffusion import cache
from dcae.diffusion.cache import CacheDataset, CacheIndex, Shard, shard_name
from dcae.diffusion.conditioning import ClassConditioning, Condition, Unconditional
from dcae.errors import NonFiniteError, UserError
from dcae.utils.devices import dtype_name
from dcae.utils.io import atomic_write_text

FILES_NAME = "files.txt"
_WNID = re.compile(r"^(n\d{8})_(.+)$")  # ImageNet-style file names: n01440764_tench.JPEG


# ----------------------------------------------------------------------------- labels
@dataclass
class LabelTable:
    labels: list[int] | None  # one per image, or None: unconditional
    class_names: list[str] | None
    source: str | None  # "file", "folders", "filenames" or None
    class_ids: list[str] | None = None  # e.g. WordNet ids for ImageNet file names


def _class_indices(keys: list[str]) -> tuple[list[int], list[str]]:
    names = sorted(set(keys))  # sorted WordNet ids give the standard ImageNet class order
    lookup = {n: i for i, n in enumerate(names)}
    return [lookup[k] for k in keys], names


def read_labels_file(path: Path, rel_paths: list[str]) -> LabelTable:
    """Labels from a JSON object {file: label} or lines '<file> <label>' (space, tab or comma separated). A
    file may be given by its path relative to the data folder or by its name; a label by index or class name."""
    text = Path(path).read_text()
    table: dict[str, str] = {}
    if path.suffix == ".json":
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise UserError(f"{path}: expected a JSON object mapping file names to labels")
        table = {str(k): str(v) for k, v in obj.items()}
    else:
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = re.split(r"[\t,]|\s+", line, maxsplit=1)
            if len(parts) != 2:
                raise UserError(f"{path}:{n}: expected '<file> <label>', got {line!r}")
            table[parts[0].strip()] = parts[1].strip()
    raw, missing = [], []
    for rel in rel_paths:
        value = table.get(rel, table.get(Path(rel).name))
        if value is None:
            missing.append(rel)
        raw.append(value)
    if missing:
        raise UserError(f"{path} has no label for {len(missing)} image(s), e.g. {missing[:3]}")
    if all(re.fullmatch(r"\d+", v) for v in raw):
        labels = [int(v) for v in raw]
        return LabelTable(labels, [str(i) for i in range(max(labels) + 1)], "file")
    labels, names = _class_indices(raw)
    return LabelTable(labels, names, "file")


def infer_labels(rel_paths: list[str], labels_file: str | os.PathLike | None = None) -> LabelTable:
    """Class labels, in order of preference: a labels file; the first folder level (ImageFolder layout);
    ImageNet-style `nXXXXXXXX_<name>` file names; otherwise none (unconditional)."""
    if labels_file is not None:
        return read_labels_file(Path(labels_file), rel_paths)
    parts = [Path(p).parts for p in rel_paths]
    if all(len(p) >= 2 for p in parts) and len({p[0] for p in parts}) > 1:
        labels, names = _class_indices([p[0] for p in parts])
        return LabelTable(labels, names, "folders")
    matches = [_WNID.match(Path(p).stem) for p in rel_paths]
    if all(matches):
        labels, wnids = _class_indices([m.group(1) for m in matches])
        readable: dict[str, str] = {}
        for m in matches:  # the first file of a class names it
            readable.setdefault(m.group(1), m.group(2).replace("_", " "))
        return LabelTable(labels, [readable[w] for w in wnids], "filenames", class_ids=wnids)
    return LabelTable(None, None, None)


# ----------------------------------------------------------------------------- extraction
class _CropDataset(torch.utils.data.Dataset):
    """Decodes and ADM-center-crops images in DataLoader workers; errors come back as messages so that
    the main process can name the file."""

    def __init__(self, files: list[ImageRef], resolution: int) -> None:
        self.files, self.resolution = files, resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            arr = center_crop_arr(read_image(self.files[i]), self.resolution)
            return torch.from_numpy(np.array(arr)), ""  # a writable copy of PIL's read-only buffer
        except (ImageReadError, OSError) as exc:
            return torch.zeros(self.resolution, self.resolution, 3, dtype=torch.uint8), str(exc) or repr(exc)


def _plan_fingerprint(index: CacheIndex, shard_size: int, rel_paths: list[str]) -> str:
    """Names the plan: the autoencoder (where it loads from, its weights, its dtype), the crop, flip, shard size and
    the image list. Weights replaced at the same path make another plan, not a cache of two autoencoders."""
    what = [index.autoencoder, index.autoencoder_fingerprint, index.dtype, index.resolution, index.flip, shard_size]
    h = hashlib.sha256(json.dumps(what).encode())
    for p in rel_paths:
        h.update(p.encode() + b"\n")
    return h.hexdigest()[:16]


def _to_model_input(batch_uint8: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    x = batch_uint8.to(device, non_blocking=True).permute(0, 3, 1, 2).to(dtype)
    return x / 127.5 - 1.0


@torch.no_grad()
def extract_latents(
    autoencoder,
    data: str | os.PathLike,
    out: str | os.PathLike,
    model_name: str | None = None,
    resolution: int = 512,
    flip: bool = False,
    batch_size: int = 32,
    shard_size: int = 1024,
    labels_file: str | os.PathLike | None = None,
    unconditional: bool = False,
    num_workers: int = 2,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> CacheIndex:
    """Encode every image under `data` into latent shards in `out`; returns the cache's record. `autoencoder` is
    a DCAE; `model_name` is what `DCAE.from_pretrained` can load it from later (recorded for decoding)."""

    data, out = Path(data), Path(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    files, rel_paths, labels, index = _plan(
        autoencoder, data, model_name or autoencoder.config.name, resolution, flip, shard_size, labels_file,
        unconditional, dtype_name(dtype),
    )  # fmt: skip
    cache.start_plan(out, index, overwrite, rank)
    if rank == 0:
        atomic_write_text(out / FILES_NAME, "\n".join(rel_paths) + "\n")
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()  # the first process clears a replaced plan's shards before any is written

    counts = [s.count for s in index.shards]
    mine = [k for k in range(len(counts)) if k % world_size == rank]
    also = _also(index)
    todo = cache.pending_shards(out, index, also, mine)
    bar = tqdm(total=sum(counts[k] for k in mine), initial=sum(counts[k] for k in mine if k not in todo),
               unit="img", desc=f"latents {out.name}", disable=not progress or rank != 0)  # fmt: skip
    autoencoder = autoencoder.to(device=device, dtype=dtype).eval()
    for k in todo:
        lo, hi = k * shard_size, min((k + 1) * shard_size, len(files))
        tensors = _encode_images(autoencoder, files[lo:hi], resolution, flip, batch_size, num_workers, dtype, bar)
        if labels.labels is not None:
            tensors["labels"] = torch.tensor(labels.labels[lo:hi], dtype=torch.int64)
        cache.write_shard(out, index, k, tensors, first=str(lo))
    bar.close()

    # With several processes, the caller finalizes after all of them are done (see `finalize_latents`).
    return finalize_latents(out) if world_size == 1 else index


def _also(index: CacheIndex) -> tuple[str, ...]:
    """The tensors a shard holds besides `latents` (its completeness check)."""
    return ("latents_flip",) if index.flip else ()


def _plan(autoencoder, data: Path, model_name: str, resolution: int, flip: bool, shard_size: int, labels_file,
          unconditional: bool, dtype: str) -> tuple[list[ImageRef], list[str], LabelTable, CacheIndex]:  # fmt: skip
    """The images, their labels and the record of the cache to write (its fingerprint names the plan)."""
    f = autoencoder.spatial_compression
    if resolution % f:
        raise UserError(f"resolution {resolution} is not a multiple of the autoencoder's compression f{f}")
    if not data.exists():
        raise UserError(f"data folder {data} does not exist")
    # The one image source: a broken tar shard is named and left out of the plan; nothing readable is an error.
    files = list_images(data, naming="relative")
    rel_paths = [r.name for r in files]
    labels = LabelTable(None, None, None) if unconditional else infer_labels(rel_paths, labels_file)
    n_shards = (len(files) + shard_size - 1) // shard_size
    conditioning = ClassConditioning(len(labels.class_names)) if labels.labels is not None else Unconditional()
    index = CacheIndex.of_autoencoder(
        autoencoder,
        model_name,
        resolution,
        conditioning=conditioning,
        shards=[Shard(shard_name(k), min(shard_size, len(files) - k * shard_size)) for k in range(n_shards)],
        dtype=dtype,
        latent_shape=(autoencoder.latent_channels, resolution // f, resolution // f),
        flip=flip,
        class_names=labels.class_names,
        class_ids=labels.class_ids,
        label_source=labels.source,
        data=str(data.resolve()),
    )
    index.fingerprint = _plan_fingerprint(index, shard_size, rel_paths)
    return files, rel_paths, labels, index


def _encode_images(autoencoder, files: list[ImageRef], resolution: int, flip: bool, batch_size: int,
                   num_workers: int, dtype: torch.dtype, bar) -> dict[str, torch.Tensor]:  # fmt: skip
    """Scaled fp32 latents of `files` (and of their mirror images with flip); unreadable images and
    non-finite latents are errors that name the files."""
    device = next(autoencoder.parameters()).device
    loader = torch.utils.data.DataLoader(_CropDataset(files, resolution), batch_size=batch_size,
                                         num_workers=num_workers, pin_memory=device.type == "cuda")  # fmt: skip
    chunks, flip_chunks, start = [], [], 0
    for batch, errors in loader:
        for err in errors:
            if err:
                raise ImageReadError(err)  # the reader's message names the image
        x = _to_model_input(batch, device, dtype)
        for dest, inp in ((chunks, x), (flip_chunks, x.flip(-1) if flip else None)):
            if inp is None:
                continue
            z = autoencoder.scale_latents(autoencoder.encode(inp)).float()
            bad = ~torch.isfinite(z.flatten(1)).all(dim=1)
            if bad.any():
                names = [files[start + j].location for j in bad.nonzero().flatten().tolist()]
                raise NonFiniteError(
                    f"the autoencoder produced NaN/Inf latents for {len(names)} image(s), e.g. {names[:3]}; "
                    "check the weights, or use --dtype float32 if you ran in half precision"
                )
            dest.append(z.cpu())
        start += len(batch)
        bar.update(len(batch))
    tensors = {"latents": torch.cat(chunks)}
    if flip:
        tensors["latents_flip"] = torch.cat(flip_chunks)
    return tensors


def finalize_latents(out: str | os.PathLike) -> CacheIndex:
    """Mark the folder complete (and record the latent RMS) when every shard of the plan is on disk."""
    index = cache.read_index(out, complete=False)
    return cache.finish_plan(Path(out), index, _also(index))


# ----------------------------------------------------------------------------- reading back
class LatentDataset(CacheDataset):
    """Latents from `dcae latents`: items are (latent C x h x w float32, label int64; -1 when unconditional).

    With flipped copies on disk, each item is the flipped latent with probability 1/2, decided by
    (seed, epoch, index) so that training is reproducible and resumable; call `set_epoch` every epoch.
    Small folders are loaded into memory; large ones are read lazily (memory-mapped safetensors).
    """

    def __init__(
        self, root: str | os.PathLike, use_flip: bool = True, in_memory: bool | None = None, seed: int = 0,
        index: CacheIndex | None = None,
    ) -> None:  # fmt: skip
        self.root = Path(root)
        self.index = index or cache.read_index(root)
        if self.index.latent_shape is None:
            raise UserError(f"{root}: a cache of resolution buckets; this dataset reads one latent size")
        self.counts = [s.count for s in self.index.shards]
        self.offsets = np.cumsum([0, *self.counts]).tolist()
        self.use_flip = use_flip and self.index.flip
        self.conditional = self.index.num_classes > 0
        self.seed, self.epoch = seed, 0
        if in_memory is None:
            nbytes = self.offsets[-1] * int(np.prod(self.index.latent_shape)) * 4 * (2 if self.use_flip else 1)
            in_memory = nbytes <= 2 * 1024**3
        self._memory: dict[str, torch.Tensor] | None = self._load_all() if in_memory else None
        self._handles: dict[int, object] = {}

    def _load_all(self) -> dict[str, torch.Tensor]:
        parts = [self._checked(self._open(k), k, load=True) for k in range(len(self.counts))]
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def _keys(self) -> list[str]:
        return ["latents"] + (["latents_flip"] if self.use_flip else []) + (["labels"] if self.conditional else [])

    def _open(self, k: int):

        path = self.root / self.index.shards[k].file
        try:
            return safe_open(str(path), framework="pt")
        except Exception as exc:  # missing, truncated, a header that lies: the file is named, not the reader
            raise UserError(f"cannot read latent shard {path}: {type(exc).__name__}: {exc}") from None

    def _checked(self, handle, k: int, load: bool = False):
        """The shard's tensors (load) or its handle, after checking that it holds what the index says."""
        path = self.root / self.index.shards[k].file
        n, shape = self.counts[k], list(self.index.latent_shape)
        try:
            out = {}
            for key in self._keys():
                if key not in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    raise ValueError(f"no {key!r} tensor")
                sl = handle.get_slice(key)
                want = [n] if key == "labels" else [n, *shape]
                if list(sl.get_shape()) != want:
                    raise ValueError(f"{key} has shape {sl.get_shape()}, the index says {want}")
                if load:
                    out[key] = handle.get_tensor(key)
            labels = handle.get_tensor("labels") if self.conditional else None
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"latent shard {path} does not match its index ({type(exc).__name__}: {exc})") from None
        if (
            labels is not None
            and labels.numel()
            and not (int(labels.min()) >= 0 and int(labels.max()) < self.num_classes)
        ):
            raise UserError(f"latent shard {path}: labels outside 0..{self.num_classes - 1}")
        return out if load else handle

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def num_classes(self) -> int:
        return self.index.num_classes

    def condition(self, fields: list[torch.Tensor], device) -> Condition | None:
        """The condition of a batch from the items' other fields (here: the labels)."""
        return self.conditioning.batch(fields[0], device)

    def _flip(self, i: int) -> bool:
        return self.use_flip and random.Random((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i).random() < 0.5

    def _read(self, key: str, i: int) -> torch.Tensor:
        if self._memory is not None:
            return self._memory[key][i]
        k = bisect_right(self.offsets, i) - 1
        if k not in self._handles:
            self._handles[k] = self._checked(self._open(k), k)
        j = i - self.offsets[k]
        return self._handles[k].get_slice(key)[j : j + 1][0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        z = self._read("latents_flip" if self._flip(i) else "latents", i)
        y = self._read("labels", i) if self.conditional else torch.tensor(-1)
        return z.float(), y.long()

    def __getstate__(self) -> dict:  # file handles do not cross process boundaries
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state
