"""What a diffusion model is conditioned on: the one place that knows.

Two objects:
- a *conditioning* (`ClassConditioning`, `Unconditional`, `TextConditioning`) is part of a model's definition: it
  builds the network's embedding table, says what a latents index or a checkpoint records about it, and turns
  what a user or a data set gives (class names, label tensors) into conditions;
- a *condition* (`Labels`) is one batch of it, as networks, processes and samplers pass it around: it knows
  its null value (classifier-free guidance), drops to it in training, and splits and joins with the batch.

An unconditional model takes the condition None everywhere; a class-conditional network given None uses the
null class for every sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dcae.errors import UserError

# Prompts of sample grids of a text model when none are given.
DEFAULT_PROMPTS = (
    "a photo of a cat",
    "a red car on a street",
    "a bowl of fruit on a table",
    "a mountain lake at sunset",
)


# ----------------------------------------------------------------------------- conditions (batches)
@dataclass
class Labels:
    """A batch of class labels; label `num_classes` is the null class (the last row of the embedding table)."""

    y: torch.Tensor  # (B,) int64
    num_classes: int

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"class labels need num_classes >= 1 (the null class index), got {self.num_classes}")

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> Labels:
        return Labels(self.y.to(device, non_blocking=True), self.num_classes)

    def chunk(self, k: int) -> list[Labels]:
        return [Labels(y, self.num_classes) for y in self.y.chunk(k)]

    def cat(self, other: Labels) -> Labels:
        return Labels(torch.cat([self.y, other.y]), self.num_classes)

    def null(self) -> Labels:
        """The same batch with every label replaced by the null class."""
        return Labels(torch.full_like(self.y, self.num_classes), self.num_classes)

    def drop(self, p: float, generator: torch.Generator | None = None) -> Labels:
        """Each label replaced by the null class with probability `p`, so that one network learns both the
        conditional and the unconditional model that classifier-free guidance mixes (Ho & Salimans 2022)."""
        if p <= 0:
            return self
        drop = torch.rand(self.y.shape, generator=generator, device=self.y.device) < p
        return Labels(torch.where(drop, torch.full_like(self.y, self.num_classes), self.y), self.num_classes)


@dataclass
class Text:
    """A batch of encoded prompts: token embeddings (B, L, D) and their padding mask (B, L; 1 = a real token),
    all padded to the same token count L. The null condition of classifier-free guidance is the encoding of
    the empty prompt (`null_emb` (L, D), `null_mask` (L,)), what diffusers' SANA pipeline uses as its negative
    prompt, so that a model trained here samples the same way there."""

    emb: torch.Tensor
    mask: torch.Tensor
    null_emb: torch.Tensor
    null_mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.emb.ndim != 3 or self.mask.shape != self.emb.shape[:2]:
            raise ValueError(f"text embeddings (B, L, D) with a (B, L) mask expected, got {tuple(self.emb.shape)} "
                             f"and {tuple(self.mask.shape)}")  # fmt: skip
        if self.null_emb.shape != self.emb.shape[1:] or self.null_mask.shape != self.mask.shape[1:]:
            raise ValueError("the empty prompt's encoding has another token count or width than the prompts'")

    def __len__(self) -> int:
        return len(self.emb)

    def _with(self, emb: torch.Tensor, mask: torch.Tensor) -> Text:
        return Text(emb, mask, self.null_emb, self.null_mask)

    def to(self, device: torch.device | str) -> Text:
        return Text(*(t.to(device, non_blocking=True) for t in (self.emb, self.mask, self.null_emb, self.null_mask)))

    def float(self) -> Text:
        """Embeddings in fp32, as the network takes them (an encoder may give bf16 / fp16)."""
        return Text(self.emb.float(), self.mask, self.null_emb.float(), self.null_mask)

    def chunk(self, k: int) -> list[Text]:
        return [self._with(e, m) for e, m in zip(self.emb.chunk(k), self.mask.chunk(k))]

    def cat(self, other: Text) -> Text:
        return self._with(torch.cat([self.emb, other.emb]), torch.cat([self.mask, other.mask]))

    def null(self) -> Text:
        n = len(self)
        return self._with(self.null_emb.expand(n, *self.null_emb.shape).to(self.emb.dtype),
                          self.null_mask.expand(n, *self.null_mask.shape).to(self.mask.dtype))  # fmt: skip

    def drop(self, p: float, generator: torch.Generator | None = None) -> Text:
        """Each prompt replaced by the empty prompt with probability `p` (caption dropout)."""
        if p <= 0:
            return self
        drop = torch.rand(len(self), generator=generator, device=self.emb.device) < p
        null = self.null()
        emb = torch.where(drop[:, None, None], null.emb, self.emb)
        return self._with(emb, torch.where(drop[:, None], null.mask, self.mask))


Condition = Labels | Text


def drop(cond: Condition | None, p: float, generator: torch.Generator | None = None) -> Condition | None:
    return None if cond is None else cond.drop(p, generator)


def with_null(cond: Condition) -> Condition:
    """[cond; null]: both halves of classifier-free guidance in one batch."""
    return cond.cat(cond.null())


def chunk(cond: Condition | None, k: int) -> list[Condition | None]:
    return [None] * k if cond is None else cond.chunk(k)


def class_labels(c: Condition | torch.Tensor | None, n: int, num_classes: int, device) -> torch.Tensor:
    """The label tensor a class table embeds: from Labels, a plain label tensor (the Python API), or None
    (every sample the null class)."""
    if c is None:
        return torch.full((n,), num_classes, dtype=torch.long, device=device)
    return c.y if isinstance(c, Labels) else c


# ----------------------------------------------------------------------------- conditionings (kinds)
def _table(meta, key: str) -> list[str]:
    """Class names or ids from a latent cache's record (dcae.diffusion.cache.CacheIndex) or a plain mapping."""
    value = meta.get(key) if isinstance(meta, dict) else getattr(meta, key, None)
    return value or []


class LabelEmbedder(nn.Module):
    """The class table under the name the released DC-Gen checkpoints use (`<owner>.embedding_table.weight`)."""

    def __init__(self, num_rows: int, dim: int) -> None:
        super().__init__()
        # nn.Embedding's own N(0, 1) init, skipped on the meta device (where it is slow and holds no values)
        self.embedding_table = nn.Embedding(num_rows, dim, _weight=torch.empty(num_rows, dim))
        if self.embedding_table.weight.device.type != "meta":
            nn.init.normal_(self.embedding_table.weight)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


@dataclass(frozen=True)
class ClassConditioning:
    """Class labels 0..num_classes-1 and the null class num_classes."""

    num_classes: int
    kind = "class"

    def embedder(self, dim: int, released_layout: bool = False) -> nn.Module:
        """num_classes + 1 rows (the last is the null class); key layout of ours or of the released models."""
        rows = self.num_classes + 1
        return LabelEmbedder(rows, dim) if released_layout else nn.Embedding(rows, dim)

    def batch(self, labels: torch.Tensor | list, device=None) -> Labels:
        """Labels from a data set's or a user's label values."""
        y = labels if isinstance(labels, torch.Tensor) else torch.tensor([int(v) for v in labels])
        return Labels(y.to(device=device, dtype=torch.long), self.num_classes)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_classes": self.num_classes}

    def network_args(self) -> dict[str, Any]:
        """The arguments a network takes for this conditioning."""
        return {"num_classes": self.num_classes}

    def random(self, n: int, device=None, generator: torch.Generator | None = None) -> Labels:
        """A random condition of this kind for n samples (benchmarks, tests)."""
        return self.batch(torch.randint(0, self.num_classes, (n,), generator=generator), device)

    def parse(self, text: str | None, meta: dict) -> list[int] | None:
        """'1,2,3' or class names / WordNet ids from the latent index ('tench,goldfish'); None if no text."""
        if not text:
            return None
        names, ids = _table(meta, "class_names"), _table(meta, "class_ids")
        out = []
        for item in (s.strip() for s in text.split(",") if s.strip()):
            if item.lstrip("-").isdigit():
                k = int(item)
            elif item in ids:
                k = ids.index(item)
            elif item in names:
                k = names.index(item)
            else:
                by_name = " or names from the latent index" if names or ids else ""
                raise UserError(f"unknown class {item!r}: use indices 0..{self.num_classes - 1}{by_name}")
            if not 0 <= k < self.num_classes:
                raise UserError(
                    f"class {k} is out of range: the model has {self.num_classes} classes (0..{self.num_classes - 1})"
                )
            out.append(k)
        return out

    def values(self, text: str | None, n: int, meta: dict) -> list[int]:
        """The class of each of n images: the given classes in turn, else all classes evenly (as FID protocols
        sample)."""
        classes = self.parse(text, meta)
        return [classes[i % len(classes)] if classes else i % self.num_classes for i in range(n)]

    def grid_values(self, scfg, n: int) -> list[int]:
        """The classes of a training run's sample grid: `sample.classes` in turn (default 0, 1, 2, ...)."""
        classes = scfg.classes or list(range(n))
        return [int(classes[i % len(classes)]) % self.num_classes for i in range(n)]


@dataclass(frozen=True)
class Unconditional:
    """No condition: networks take None and build no table."""

    kind = "none"
    num_classes = 0

    def embedder(self, dim: int, released_layout: bool = False) -> None:
        return None

    def batch(self, labels=None, device=None) -> None:
        return None

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def network_args(self) -> dict[str, Any]:
        return {"num_classes": 0}

    def random(self, n: int, device=None, generator: torch.Generator | None = None) -> None:
        return None

    def parse(self, text: str | None, meta: dict) -> None:
        if text:
            raise UserError("this model is unconditional: drop --classes")
        return None

    def values(self, text: str | None, n: int, meta: dict) -> list[None]:
        self.parse(text, meta)
        return [None] * n

    def grid_values(self, scfg, n: int) -> list[None]:
        return [None] * n


@dataclass(frozen=True)
class TextConditioning:
    """Encoded prompts (`Text`): `max_tokens` token embeddings of width `caption_channels` per prompt (SANA:
    Gemma-2-2B's 2304 channels, 300 tokens). The network projects them itself and builds no table.
    `text_encoder` names the encoder a cache was made with; `encode` (prompts -> Text), attached by the
    text-to-image side that can load that encoder, lets callers turn prompts into a batch like any condition."""

    caption_channels: int
    max_tokens: int
    text_encoder: str | None = field(default=None, compare=False)
    encode: Callable[[list[str]], Text] | None = field(default=None, compare=False, repr=False)
    kind = "text"
    num_classes = 0

    def embedder(self, dim: int, released_layout: bool = False) -> None:
        return None

    def batch(self, prompts: list[str], device=None) -> Text:
        """The prompts encoded, in fp32 on `device`."""
        if self.encode is None:
            raise UserError("no text encoder is attached to this text conditioning (the cache or checkpoint "
                            "records none): pass one")  # fmt: skip
        return self.encode(list(prompts)).float().to(device)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "caption_channels": self.caption_channels, "max_tokens": self.max_tokens}

    def network_args(self) -> dict[str, Any]:
        return {"caption_channels": self.caption_channels, "max_tokens": self.max_tokens}

    def random(self, n: int, device=None, generator: torch.Generator | None = None) -> Text:
        """Random prompt embeddings (B, L, D), every token real; as the null, the empty prompt's one real token."""
        L, D = self.max_tokens, self.caption_channels
        emb = torch.randn(n, L, D, generator=generator).to(device)
        null_emb = torch.randn(L, D, generator=generator).to(device)
        null_mask = torch.zeros(L, dtype=torch.long, device=device)
        null_mask[0] = 1
        return Text(emb, torch.ones(n, L, dtype=torch.long, device=device), null_emb, null_mask)

    def parse(self, text: str | None, meta: dict) -> list[str] | None:
        return [text] if text else None

    def values(self, prompts: list[str] | None, n: int, meta: dict | None = None) -> list[str]:
        """The prompt of each of n images: the given prompts in turn (default: a few fixed ones)."""
        prompts = list(prompts or DEFAULT_PROMPTS)
        return [prompts[i % len(prompts)] for i in range(n)]

    def grid_values(self, scfg, n: int) -> list[str]:
        """The prompts of a training run's sample grid: `sample.prompts` in turn."""
        return self.values(scfg.prompts, n)


Conditioning = ClassConditioning | Unconditional | TextConditioning


def conditioning_for(num_classes: int) -> Conditioning:
    """The conditioning of a model with `num_classes` classes (0: unconditional)."""
    return ClassConditioning(int(num_classes)) if num_classes > 0 else Unconditional()


def from_spec(spec: dict[str, Any] | None, text_encoder: str | None = None) -> Conditioning:
    """The conditioning a `spec()` describes (None: unconditional), for a text one with the encoder that makes
    its prompts (a cache records it); a malformed spec is a ValueError."""
    if spec is None:
        return Unconditional()
    if not isinstance(spec, dict) or spec.get("kind") not in ("class", "none", "text"):
        raise ValueError(f"conditioning: not a conditioning spec: {spec!r}")
    if spec["kind"] == "text":
        c, t = spec.get("caption_channels"), spec.get("max_tokens")
        if type(c) is not int or type(t) is not int or c < 1 or t < 1:
            raise ValueError(f"conditioning: caption_channels and max_tokens must be positive integers: {spec!r}")
        return TextConditioning(c, t, text_encoder)
    n = spec.get("num_classes", 0)
    if type(n) is not int or n < 0:
        raise ValueError(f"conditioning: num_classes must be a count: {spec!r}")
    return conditioning_for(n)


def from_record(record: dict) -> Conditioning:
    """The conditioning a checkpoint's model arguments record: `conditioning` (a `spec()`) where present, else
    `num_classes` (0 or absent: unconditional; checkpoints of class-conditional models before the spec)."""
    spec = record.get("conditioning")
    if isinstance(spec, dict):
        return from_spec(spec)
    return conditioning_for(int(record.get("num_classes") or 0))
