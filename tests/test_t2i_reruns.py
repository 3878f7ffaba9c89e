"""Reruns into a sample folder make the missing images of the same plan or refuse another in one line, never
mix two (out/plan.json, dcae.diffusion.generation): `dcae t2i sample`, `dcae t2i eval` and `dcae sample`,
one process or two."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from PIL import Image
from test_clip_score import clip_dir  # noqa: F401  (a tiny random CLIP folder)
from test_diffusion_train import config, latents  # noqa: F401
from test_t2i import ENV, _cli, cache, trained  # noqa: F401

from dcae.diffusion.train.checkpoint import list_checkpoints
from dcae.diffusion.train.loop import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _made(out) -> dict[str, int]:
    """Image name -> modification time of a sample folder's images."""
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "images").glob("*.png"))}


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _one_line(rc: int, err: str, *words) -> None:
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert all(str(w) in err for w in words), err


def test_t2i_sample_reruns_resume_extend_refuse_or_overwrite(trained, tmp_path):  # noqa: F811
    out = tmp_path / "s"
    base = ["t2i", "sample", "--ckpt", trained, "--steps", 1, "--size", "32x32", "--grid", 0, "-o", out]
    red, blue, green = ("--prompt", "a red square"), ("--prompt", "a blue square"), ("--prompt", "a green square")
    assert _cli(*base, *red)[0] == 0
    first = _made(out)
    assert _cli(*base, *red)[0] == 0 and _made(out) == first  # the same plan: nothing to make
    _one_line(*_cli(*base, *blue), out, "another plan", '"a red square" -> "a blue square"', "--overwrite")
    _one_line(*_cli(*base, *red, "--cfg", 2.0), out, "cfg 4.5 -> 2.0")
    _one_line(*_cli(*base, *red, "--seed", 1), out, "seed 0 -> 1")
    assert json.loads((out / "samples.json").read_text())["prompts"] == ["a red square"]  # nothing mixed in
    assert _cli(*base, *red, *blue)[0] == 0  # the same first image, one more: only that one is made
    now = _made(out)
    assert list(now) == ["000000.png", "000001.png"] and now["000000.png"] == first["000000.png"]
    _one_line(*_cli(*base, *red), out, "2 images planned there, 1 now")
    # --overwrite makes every image again and removes those beyond the new plan
    assert _cli(*base, *green, "--overwrite")[0] == 0
    assert list(_made(out)) == ["000000.png"] and json.loads((out / "samples.json").read_text())["prompts"] == [
        "a green square"
    ]
    assert _cli(*base[:-1], tmp_path / "fresh", *green)[0] == 0
    assert np.array_equal(_pixels(out / "images" / "000000.png"), _pixels(tmp_path / "fresh" / "images" / "000000.png"))
    # images that no plan describes (an earlier version's folder) are not added to
    (out / "plan.json").unlink()
    _one_line(*_cli(*base, *green), out, "1 image(s) and no plan.json")


def test_t2i_eval_refuses_other_settings_by_the_same_plan(trained, clip_dir, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue square\n")
    out = tmp_path / "eval"
    base = ["t2i", "eval", "--ckpt", trained, "--prompts", prompts, "--clip", clip_dir, "--steps", 1, "--size",
            "32x32", "-o", out]  # fmt: skip
    assert _cli(*base)[0] == 0
    made = _made(out)
    _one_line(*_cli(*base, "--steps", 2), out, "steps 1 -> 2")
    assert _made(out) == made and json.loads((out / "plan.json").read_text())["settings"]["steps"] == 1
    assert _cli(*base, "--steps", 2, "--overwrite")[0] == 0 and _made(out) != made


def test_class_sample_reruns_refuse_other_classes_seed_or_checkpoint(latents, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    train(config(latents, run, max_steps=2, **{"checkpoint.every": 1}), progress=False)
    out = tmp_path / "s"
    base = ["sample", "--ckpt", run, "-n", 2, "--steps", 1, "--grid", 0, "-o", out]

    def cli(*argv):
        return _cli(*base, *argv)

    assert cli()[0] == 0
    made = _made(out)
    assert cli()[0] == 0 and _made(out) == made
    _one_line(*cli("--classes", "1"), out, "1 image(s) of another class, first image 0: 0 -> 1")
    _one_line(*cli("--seed", 3), out, "seed 0 -> 3")
    _one_line(*cli("--steps", 2), out, "steps 1 -> 2")
    older = list_checkpoints(run)[0]
    _one_line(*_cli(*base[:2], older, *base[3:]), out, "checkpoint", "step 2 -> 1")
    assert cli("--classes", "1", "--overwrite")[0] == 0
    assert json.loads((out / "samples.json").read_text())["labels"] == [1, 1]
    assert cli("-n", 3, "--classes", "1")[0] == 0 and len(_made(out)) == 3  # one more of the same plan


@pytest.mark.slow
def test_two_processes_refuse_another_plan_together(trained, tmp_path):  # noqa: F811
    """Under torchrun the first process checks and writes the plan; a refusal stops every process (no hang)."""
    from test_train_helpers import torchrun_dcae

    out = tmp_path / "two"
    common = ["t2i", "sample", "--ckpt", str(trained), "--steps", "1", "--size", "32x32", "-o", str(out)]
    assert _cli(*common, "--prompt", "a red square", "--prompt", "a blue square")[0] == 0
    proc = subprocess.run([*torchrun_dcae(), *common, "--prompt", "a green square", "--prompt", "a blue square"],
                          env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0 and "another plan" in proc.stderr, proc.stderr[-3000:]
    assert json.loads((out / "samples.json").read_text())["prompts"] == ["a red square", "a blue square"]
