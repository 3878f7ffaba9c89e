"""Conditions: a batch knows its null value, drops to it at the asked rate, and splits and joins with the
batch; kinds read what indexes and checkpoints record."""

from __future__ import annotations

import pytest
import torch

from dcae.diffusion.conditioning import (
    ClassConditioning,
    Labels,
    Text,
    Unconditional,
    chunk,
    from_record,
    with_null,
)
from dcae.errors import UserError


def _text(n: int = 4000, length: int = 6, width: int = 3) -> Text:
    g = torch.Generator().manual_seed(0)
    null_mask = torch.zeros(length, dtype=torch.long)
    null_mask[0] = 1
    return Text(torch.randn(n, length, width, generator=g), torch.ones(n, length, dtype=torch.long),
                torch.full((length, width), 7.0), null_mask)  # fmt: skip


def test_text_dropout_replaces_whole_prompts_by_the_empty_one():
    t = _text()
    d = t.drop(0.1, torch.Generator().manual_seed(1))
    dropped = (d.emb == 7.0).all(dim=(1, 2))
    assert 0.085 < dropped.float().mean().item() < 0.115  # 4000 draws: 0.1 +- 4 sigma
    assert torch.equal(d.mask[dropped], t.null_mask.expand(int(dropped.sum()), -1))
    assert torch.equal(d.emb[~dropped], t.emb[~dropped]) and torch.equal(d.mask[~dropped], t.mask[~dropped])
    assert t.drop(0.0) is t


def test_text_guidance_batch_and_chunks():
    t = _text(n=4)
    g = with_null(t)
    assert len(g) == 8 and torch.equal(g.emb[:4], t.emb) and (g.emb[4:] == 7.0).all()
    assert [len(c) for c in t.chunk(2)] == [2, 2] and torch.equal(torch.cat([c.emb for c in t.chunk(2)]), t.emb)
    with pytest.raises(ValueError, match="token count"):
        Text(t.emb, t.mask, torch.zeros(5, 3), t.null_mask)


def test_labels_and_kinds():
    y = Labels(torch.tensor([0, 2, 1]), 3)
    assert torch.equal(with_null(y).y, torch.tensor([0, 2, 1, 3, 3, 3]))
    assert chunk(None, 2) == [None, None]
    assert from_record({"num_classes": 3}) == ClassConditioning(3) and from_record({}) == Unconditional()
    assert ClassConditioning(4).values(None, 6, {}) == [0, 1, 2, 3, 0, 1]
    assert ClassConditioning(4).values("goldfish,0", 3, {"class_names": ["tench", "goldfish"]}) == [1, 0, 1]
    with pytest.raises(UserError, match="out of range"):
        ClassConditioning(4).parse("7", {})
    with pytest.raises(UserError, match="unconditional"):
        Unconditional().values("1", 2, {})
