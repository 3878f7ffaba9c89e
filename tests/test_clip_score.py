"""CLIP score against torchmetrics' CLIPScore (the reference we did not write) on a tiny random CLIP."""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings

import numpy as np
import pytest
import torch

from dcae.errors import UserError
from dcae.metrics.clip_score import ClipScoreAccumulator, ClipScorer

transformers = pytest.importorskip("transformers")
tm_clip = pytest.importorskip("torchmetrics.functional.multimodal.clip_score")
from torchmetrics.multimodal.clip_score import CLIPScore  # noqa: E402

PROMPTS = ["a cat", "a dog on a mat", "x", "two red apples and a green pear on a wooden table"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP folder: model, a byte-level BPE tokenizer (no merges, 77 tokens), a 32 px processor.

    The folder name holds "openai": torchmetrics only loads a path through CLIPModel / CLIPProcessor then."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    out = tmp_path_factory.mktemp("clip") / "openai-tiny-clip"
    out.mkdir()
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    # eos_token_id=2 as in openai/clip-vit-large-patch14's config: pooling at the largest token id
    text = dict(
        layers, vocab_size=len(tokens), max_position_embeddings=77, eos_token_id=2, bos_token_id=0, pad_token_id=1
    )
    vision = dict(layers, image_size=32, patch_size=8)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(out)
    model.save_pretrained(out)
    return out


@contextlib.contextmanager
def _torchmetrics_compat():
    """torchmetrics 1.9 expects transformers 4's get_*_features (a tensor); transformers 5 returns a ModelOutput
    whose pooler_output is that tensor. Only the return type is adapted, nothing is computed differently."""
    cls = transformers.CLIPModel
    originals = cls.get_image_features, cls.get_text_features

    def adapt(fn):
        return lambda self, *a, **k: fn(self, *a, **k).pooler_output

    cls.get_image_features, cls.get_text_features = adapt(originals[0]), adapt(originals[1])
    try:
        yield
    finally:
        cls.get_image_features, cls.get_text_features = originals


@pytest.fixture(scope="module")
def reference(clip_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CLIPScore(model_name_or_path=str(clip_dir))


def _ref_per_image(metric, images, prompts) -> torch.Tensor:
    with _torchmetrics_compat(), torch.no_grad():
        return tm_clip._clip_score_update(images, prompts, metric.model, metric.processor)[0]


def _images(n, h, w, seed):
    return torch.randint(0, 256, (n, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_matches_torchmetrics_per_image_and_mean(clip_dir, reference):
    scorer = ClipScorer.from_pretrained(clip_dir)
    batches = [(_images(4, 40, 50, 0), PROMPTS), (_images(3, 64, 48, 1), PROMPTS[1:])]
    acc = ClipScoreAccumulator()
    reference.reset()
    worst = 0.0
    for images, prompts in batches:
        ours = scorer.score(images, prompts)
        ref = _ref_per_image(reference, list(images), prompts)
        worst = max(worst, float((ours - ref.float()).abs().max()))
        # HxWx3 numpy arrays (the image files' layout) give the same scores
        hwc = [i.permute(1, 2, 0).numpy() for i in images]
        torch.testing.assert_close(scorer.score(hwc, prompts), ours, rtol=0, atol=0)
        acc.update(scorer, images, prompts)
        with _torchmetrics_compat(), torch.no_grad():
            reference.update(list(images), prompts)
    assert worst < 1e-4, worst
    assert acc.count == 7
    raw_ours, raw_ref = float(acc.total / acc.count), float(reference.score / reference.n_samples)
    assert abs(raw_ours - raw_ref) < 1e-4  # the mean before clipping (this random model's may be negative)
    assert abs(acc.compute() - float(reference.compute())) < 1e-4
    assert acc.compute() == max(raw_ours, 0.0)
    print(f"max |ours - torchmetrics| per image {worst:.2e}; unclipped mean {raw_ours:.6f} vs {raw_ref:.6f}")


def test_float_images_in_minus_one_one_are_quantized_like_a_png(clip_dir):
    scorer = ClipScorer.from_pretrained(clip_dir)
    u8 = _images(2, 36, 36, 3)
    x = u8.float() / 127.5 - 1 + 0.001  # not exactly on the grid: rounding brings it back
    torch.testing.assert_close(scorer.score(x, PROMPTS[:2]), scorer.score(u8, PROMPTS[:2]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        scorer.score(u8, PROMPTS[:3])


def test_long_prompt_is_cut_like_torchmetrics_and_warns_once(clip_dir, reference):
    scorer = ClipScorer.from_pretrained(clip_dir)
    long = " ".join(["red", "apple"] * 60)  # 300+ tokens
    prompts = [long, "a cat"]
    images = _images(2, 40, 40, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = scorer.score(images, prompts)
        again = scorer.score(images, prompts)
    mine = [w for w in caught if "longer than CLIP's 77 tokens" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    torch.testing.assert_close(again, ours, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _ref_per_image(reference, list(images), prompts)
    assert float((ours - ref.float()).abs().max()) < 1e-4
    # the long prompt's score is the one of its first 77 tokens (the short prompt's is unchanged)
    torch.testing.assert_close(ours[1:], scorer.score(images[1:], prompts[1:]), rtol=0, atol=1e-5)


def test_per_category_means_merge_and_clipping():
    a, b = ClipScoreAccumulator(), ClipScoreAccumulator()
    a.add(torch.tensor([30.0, 20.0, -5.0]), ["people", "animals", "text"])
    b.add(torch.tensor([10.0, -9.0]), ["people", "text"])
    a.merge(b)
    assert a.count == 5 and math.isclose(a.compute(), 46.0 / 5)
    assert a.per_category() == {"animals": 20.0, "people": 20.0, "text": 0.0}  # text: mean -7 clipped at 0
    assert math.isnan(ClipScoreAccumulator().compute())
    with pytest.raises(ValueError, match="2 scores but 1 categories"):
        a.add(torch.tensor([1.0, 2.0]), ["x"])


def test_uncached_hub_id_offline_is_one_line_naming_it(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        ClipScorer.from_pretrained("openai/clip-vit-large-patch14")
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert "\n" not in msg and "openai/clip-vit-large-patch14" in msg, msg


def test_numpy_batch_and_bad_inputs(clip_dir):
    scorer = ClipScorer.from_pretrained(clip_dir)
    nhwc = np.ascontiguousarray(_images(2, 33, 40, 7).permute(0, 2, 3, 1).numpy())
    torch.testing.assert_close(scorer.score(nhwc, PROMPTS[:2]), scorer.score(list(nhwc), PROMPTS[:2]))
    with pytest.raises(TypeError, match="uint8 images or float"):
        scorer.score(torch.zeros(1, 3, 8, 8, dtype=torch.int32), ["a"])
