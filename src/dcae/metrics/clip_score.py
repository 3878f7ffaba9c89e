"""CLIP score for text-to-image evaluation (SANA / DC-Gen / MJHQ protocol), computed as torchmetrics does.

score = 100 * cos(CLIP image embedding, CLIP text embedding) with OpenAI CLIP ViT-L/14, averaged over the
prompts and clipped at 0. As torchmetrics' `CLIPScore`, the clipping applies to the mean (`compute` is
max(sum / n, 0)); the per-image values of `ClipScorer.score` are not clipped. Images go through the model's
own CLIPProcessor as 3xHxW uint8 tensors (what torchmetrics hands it); prompts are tokenized without
truncation, then cut to the text model's 77 positions, ids and mask alike, exactly as torchmetrics does
(so a cut prompt keeps no end-of-text token: CLIP then pools the largest token id of the 77, as torchmetrics).
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dcae.errors import MissingInputError, UserError
from dcae.metrics.accumulate import Accumulator, all_reduce_sum
from dcae.models.weights import hub_snapshot

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
_HUB_PATTERNS = ["*.json", "merges.txt", "vocab.txt", "model.safetensors"]


def _folder(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a CLIP model folder (no config.json)")
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) and not str(source).startswith("."):
        return hub_snapshot(str(source), allow_patterns=_HUB_PATTERNS)
    raise MissingInputError(f"{source}: no such CLIP model folder (nor a Hugging Face Hub id: owner/name)")


def _to_uint8_chw(image) -> torch.Tensor:
    """One image -> 3xHxW uint8 CPU tensor: uint8 HxWx3 (or 3xHxW) as it is, float in [-1, 1] quantized."""
    t = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    if not isinstance(t, torch.Tensor) or t.ndim != 3:
        raise ValueError(f"expected an HxWx3 / 3xHxW image, got {getattr(t, 'shape', type(t).__name__)}")
    if t.dtype == torch.uint8:
        return (t.permute(2, 0, 1) if t.shape[0] != 3 and t.shape[-1] == 3 else t).cpu().contiguous()
    if not t.is_floating_point():
        raise TypeError(f"expected uint8 images or float images in [-1, 1], got {t.dtype}")
    if t.shape[0] != 3:
        raise ValueError(f"float images are 3xHxW in [-1, 1], got shape {tuple(t.shape)}")
    x = t.detach().to("cpu", torch.float32, copy=True).clamp_(-1, 1).add_(1.0).mul_(127.5).round_()
    return x.to(torch.uint8)  # the same rounding as writing the PNG (dcae.data.images.tensor_to_uint8)


def _image_list(images) -> list[torch.Tensor]:
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return [_to_uint8_chw(i) for i in images]
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return [_to_uint8_chw(images)]
    return [_to_uint8_chw(i) for i in images]


class ClipScorer:
    """A frozen CLIP model and its processor; `score(images, prompts)` -> per-image 100 * cosine."""

    def __init__(self, model, processor, source: str) -> None:
        self.model, self.processor, self.source = model.eval().requires_grad_(False), processor, source
        self.max_tokens = int(model.config.text_config.max_position_embeddings)
        self._warned = False

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained(
        cls, source: str | Path = DEFAULT_CLIP, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> ClipScorer:
        """A Hub id (from the cache, or downloaded) or a local folder with config, weights, tokenizer, processor."""
        try:
            import transformers
        except ImportError:
            raise UserError("CLIP score needs the transformers package: pip install 'dcae[text]'") from None
        folder = _folder(source)
        logging = transformers.utils.logging
        verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
        logging.set_verbosity_error()  # no progress bar, no notice of the image processor's backend
        logging.disable_progress_bar()
        try:
            model = transformers.CLIPModel.from_pretrained(folder, dtype=dtype)
            processor = transformers.CLIPProcessor.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise UserError(f"{source}: cannot load a CLIP model and processor ({str(exc).splitlines()[0]})") from exc
        finally:
            logging.set_verbosity(verbosity)
            if bar:
                logging.enable_progress_bar()
        return cls(model.to(device), processor, str(source))

    def _features(self, out) -> torch.Tensor:
        f = out.pooler_output if hasattr(out, "pooler_output") else out  # transformers 5: a ModelOutput
        return f.float() / f.float().norm(p=2, dim=-1, keepdim=True)

    @torch.no_grad()
    def score(self, images, prompts: list[str]) -> torch.Tensor:
        """Per-image 100 * cos(image, prompt), float32 on CPU (not clipped: the means are).

        images: uint8 HxWx3 arrays (a list, or one NxHxWx3 array), uint8 3xHxW tensors, or float tensors in
        [-1, 1] (Nx3xHxW or a list of 3xHxW), quantized to uint8 first as a saved PNG would be."""
        images, prompts = _image_list(images), [prompts] if isinstance(prompts, str) else list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not images:
            return torch.zeros(0)
        pixels = self.processor(images=images, return_tensors="pt", input_data_format="channels_first")["pixel_values"]
        verbosity = _tokenizer_quiet()
        try:
            text = self.processor(text=prompts, return_tensors="pt", padding=True)
        finally:
            _tokenizer_quiet(verbosity)
        ids, mask = text["input_ids"], text["attention_mask"]
        if ids.shape[-1] > self.max_tokens:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"a prompt is longer than CLIP's {self.max_tokens} tokens: cut to {self.max_tokens} "
                    "(as torchmetrics)", UserWarning, stacklevel=2)  # fmt: skip
            ids, mask = ids[..., : self.max_tokens], mask[..., : self.max_tokens]
        dtype = next(self.model.parameters()).dtype
        img = self._features(self.model.get_image_features(pixel_values=pixels.to(self.device, dtype)))
        ids, mask = ids.to(self.device), mask.to(self.device)
        txt = self._features(self.model.get_text_features(input_ids=ids, attention_mask=mask))
        return (100 * (img * txt).sum(-1)).cpu()


def _tokenizer_quiet(restore: int | None = None) -> int:
    """Silence transformers' 'sequence longer than the model's maximum' notice (we warn once ourselves)."""
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR if restore is None else restore)
    return previous


class ClipScoreAccumulator(Accumulator):
    """Sum and count of per-image CLIP scores over batches, overall and per category (float64).

    `update(scorer, images, prompts, categories=None)` or `add(scores, categories=None)`; `compute()` is the
    mean clipped at 0 (torchmetrics' CLIPScore.compute), `per_category()` the same per category."""

    _state_names = ("count", "total")

    def __init__(self) -> None:
        self.count = torch.zeros((), dtype=torch.float64)
        self.total = torch.zeros((), dtype=torch.float64)
        self.categories: dict[str, list[float]] = {}  # name -> [sum, count]

    def add(self, scores: torch.Tensor, categories: list[str] | None = None) -> torch.Tensor:
        values = scores.detach().to("cpu", torch.float64).reshape(-1)
        if categories is not None:
            if len(categories) != values.numel():
                raise ValueError(f"{values.numel()} scores but {len(categories)} categories")
            for name, v in zip(categories, values.tolist(), strict=True):
                entry = self.categories.setdefault(str(name), [0.0, 0.0])
                entry[0] += v
                entry[1] += 1
        self.count += values.numel()
        self.total += values.sum()
        return values

    def update(self, scorer: ClipScorer, images, prompts: list[str], categories: list[str] | None = None):
        return self.add(scorer.score(images, prompts), categories)

    def merge(self, other: Accumulator) -> Accumulator:
        super().merge(other)
        for name, (s, n) in other.categories.items():  # type: ignore[attr-defined]
            entry = self.categories.setdefault(name, [0.0, 0.0])
            entry[0] += s
            entry[1] += n
        return self

    def all_reduce(self, group=None) -> Accumulator:

        super().all_reduce(group)
        if not (dist.is_available() and dist.is_initialized()):
            return self
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, sorted(self.categories), group=group)
        names = sorted({n for g in gathered for n in g})
        sums = torch.tensor([self.categories.get(n, [0.0, 0.0]) for n in names], dtype=torch.float64)
        all_reduce_sum([sums], group)
        self.categories = {n: [float(s), float(c)] for n, (s, c) in zip(names, sums.tolist(), strict=True)}
        return self

    @staticmethod
    def _mean(total: float, count: float) -> float:
        return max(total / count, 0.0) if count > 0 else math.nan

    def compute(self) -> float:
        """Mean CLIP score clipped at 0 (NaN with no image)."""
        return self._mean(float(self.total), float(self.count))

    def per_category(self) -> dict[str, float]:
        return {n: self._mean(s, c) for n, (s, c) in sorted(self.categories.items())}
