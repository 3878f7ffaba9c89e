"""`dcae t2i eval`: MJHQ-style prompts -> images (resumed, not regenerated) -> CLIP score per category, grids,
results.json / results.md; a seeded --limit subset; a missing CLIP model offline is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_clip_score import clip_dir  # noqa: F401  (a tiny random CLIP folder)
from test_t2i import _cli, cache, trained  # noqa: F401

from dcae.diffusion.t2i.eval import read_eval_prompts, subset
from dcae.metrics.clip_score import ClipScorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
META = {
    "b2": {"prompt": "a blue square", "category": "shapes"},
    "a1": {"prompt": "a red square", "category": "shapes"},
    "c3": {"prompt": "a green field", "category": "nature"},
    "d4": {"prompt": "a yellow sun", "category": "nature"},
}


@pytest.fixture
def meta(tmp_path):
    path = tmp_path / "meta_data.json"
    path.write_text(json.dumps(META))
    return path


def _eval(run, meta, clip, out, *extra):
    return _cli("t2i", "eval", "--ckpt", run, "--prompts", meta, "--clip", clip, "--steps", 2, "--size",
                "32x32", "--batch-size", 3, "-o", out, *extra)  # fmt: skip


def test_eval_writes_images_then_clip_per_category_and_resumes(trained, meta, clip_dir, tmp_path):  # noqa: F811
    out = tmp_path / "eval"
    rc, err = _eval(trained, meta, clip_dir, out)
    assert rc == 0, err
    images = sorted((out / "images").glob("*.png"))
    assert [p.name for p in images] == [f"{i:06d}.png" for i in range(4)]
    mtimes = [p.stat().st_mtime_ns for p in images]
    first = json.loads((out / "results.json").read_text())
    rc, err = _eval(trained, meta, clip_dir, out)
    assert rc == 0, err
    assert [p.stat().st_mtime_ns for p in images] == mtimes  # the rerun regenerated nothing
    results = json.loads((out / "results.json").read_text())
    assert results["clip"] == first["clip"]

    assert results["prompts"]["ids"] == ["a1", "b2", "c3", "d4"] and results["prompts"]["count"] == 4
    assert results["settings"]["steps"] == 2 and results["fid"] is None
    assert set(results["clip"]["per_category"]) == {"shapes", "nature"}
    # per-image scores computed directly on the written images, with the prompts in id order
    prompts = [META[k]["prompt"] for k in sorted(META)]
    cats = [META[k]["category"] for k in sorted(META)]
    scorer = ClipScorer.from_pretrained(clip_dir)
    direct = scorer.score([np.array(Image.open(p).convert("RGB")) for p in images], prompts).double()
    assert [r["clip_score"] for r in results["images"]] == pytest.approx(direct.tolist(), abs=1e-4)
    for c in ("shapes", "nature"):
        mean = direct[torch.tensor([x == c for x in cats])].mean().clamp(min=0).item()
        entry = results["clip"]["per_category"][c]
        assert entry["images"] == 2 and entry["clip_score"] == pytest.approx(mean, abs=1e-4)
    assert results["clip"]["clip_score"] == pytest.approx(direct.mean().clamp(min=0).item(), abs=1e-4)
    for c in ("shapes", "nature"):
        assert (out / "grids" / f"{c}.png").is_file()
    md = (out / "results.md").read_text()
    assert "| shapes | 2 |" in md and "| nature | 2 |" in md and "| **all** | 4 |" in md


def test_limit_with_a_seed_picks_the_same_subset(trained, meta, clip_dir, tmp_path):  # noqa: F811
    items = read_eval_prompts(meta)
    assert subset(items, 2, 7) == subset(items, 2, 7) and len(subset(items, 2, 7)) == 2
    assert subset(items, None) == items and subset(items, 10, 0) == items
    picks = {tuple(i["id"] for i in subset(items, 2, s)) for s in range(20)}
    assert len(picks) > 1  # the seed does choose
    for name in ("a", "b"):
        rc, err = _eval(trained, meta, clip_dir, tmp_path / name, "--limit", 2, "--subset-seed", 3)
        assert rc == 0, err
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("a", "b"))
    assert a["prompts"]["ids"] == b["prompts"]["ids"] == [i["id"] for i in subset(items, 2, 3)]
    assert a["prompts"]["total"] == 4 and len(list((tmp_path / "a" / "images").glob("*.png"))) == 2
    text = tmp_path / "prompts.txt"
    text.write_text("a red square\n\n# a comment\na blue square\n")
    assert [(i["prompt"], i["category"]) for i in read_eval_prompts(text)] == [
        ("a red square", "all"),
        ("a blue square", "all"),
    ]


def test_missing_clip_offline_is_one_line(trained, meta, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, err = _eval(trained, meta, "nobody/no-such-clip", tmp_path / "o")
    assert rc == 2 and "nobody/no-such-clip" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o" / "images").exists()  # refused before any image is made


def test_eval_fid_against_a_reference_folder(trained, meta, clip_dir, tmp_path):  # noqa: F811
    """FID next to the CLIP score, from a local reference folder, equal to the Frechet distance computed here
    from the same Inception features with numpy (trace of sqrt(S1 S2) from the eigenvalues of the product)."""
    from dcae.metrics.fid import InceptionFeatures

    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):  # already at the evaluated size: the ADM center crop keeps them as they are
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    out = tmp_path / "eval"
    rc, err = _eval(trained, meta, clip_dir, out, "--fid-ref", ref, "--fid-resolution", 32)
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["clip"]["clip_score"] is not None and results["fid_ref"] == str(ref)

    net = InceptionFeatures().eval()

    def features(folder):
        images = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in
                  sorted(folder.glob("*.png"))]  # fmt: skip
        return net(torch.stack(images)).double().numpy()

    a, b = features(out / "images"), features(ref)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2)
    trace_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert results["fid"] == pytest.approx(expected, rel=1e-3)
    assert f"FID: {results['fid']:.2f}" in (out / "results.md").read_text()


def test_eval_of_a_pipeline_samples_as_t2i_sample(trained, meta, clip_dir, tmp_path):  # noqa: F811
    """`dcae t2i eval --model PIPELINE` goes through `dcae t2i sample`'s path: its image 0 (prompt a1) is the
    PNG `sample` makes for that prompt and seed, as for `--ckpt`."""
    assert _cli("t2i", "export", "--ckpt", trained, "-o", tmp_path / "pipe", "--solver", "dpm++")[0] == 0
    for flag, source in (("--model", tmp_path / "pipe"), ("--ckpt", trained)):
        rc, err = _cli("t2i", "eval", flag, source, "--prompts", meta, "--clip", clip_dir, "--steps", 2, "--size",
                       "32x32", "--seed", 3, "--solver", "dpm++", "-o", tmp_path / f"eval{flag}")  # fmt: skip
        assert rc == 0, err
        rc, err = _cli("t2i", "sample", flag, source, "--prompt", META["a1"]["prompt"], "--steps", 2, "--size",
                       "32x32", "--seed", 3, "--solver", "dpm++", "-o", tmp_path / f"sample{flag}")  # fmt: skip
        assert rc == 0, err
        a, b = (np.asarray(Image.open(tmp_path / d / "images" / "000000.png")) for d in (f"eval{flag}",
                                                                                      f"sample{flag}"))  # fmt: skip
        assert np.array_equal(a, b), flag
