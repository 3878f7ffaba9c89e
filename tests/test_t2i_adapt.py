"""`dcae t2i adapt` (DC-Gen): a teacher on an f4 autoencoder's latents (patch 2) moved onto a deeper f8 one
(patch 1, the same 4 x 4 tokens): the alignment loss against a direct computation with the teacher's embedder,
the three stages (what each trains), exact resume of stage 1, the merged result sampled like any checkpoint, and
bad input (a teacher of another autoencoder, caches that do not pair) refused in one line."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from PIL import Image
from test_diffusion_latents import tiny_autoencoder

from dcae.cli import main
from dcae.diffusion.t2i.adapt import adapt, alignment_loss, load_config
from dcae.diffusion.t2i.encoders import all_minilm_l6_v2
from dcae.diffusion.train.checkpoint import list_checkpoints, load_checkpoint
from dcae.diffusion.train.config import load_config as load_train_config
from dcae.diffusion.train.loop import train
from dcae.errors import UserError
from dcae.models import DCAE, DCAEConfig

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 40)}


def f8_autoencoder() -> DCAE:
    torch.manual_seed(0)
    four = dict(encoder_widths=(8, 16, 16, 16), encoder_depths=(0, 1, 1, 1), encoder_block_types=("ResBlock",) * 4,
                decoder_widths=(8, 16, 16, 16), decoder_depths=(0, 1, 1, 1), decoder_block_types=("ResBlock",) * 4,
                decoder_norms=("trms2d",) * 4, decoder_acts=("silu",) * 4)  # fmt: skip
    return DCAE(DCAEConfig(name="tiny-f8c16", latent_channels=16, scaling_factor=0.5, **four))


def _cache(root, data, ae, name, patch):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(
            [
                "t2i",
                "cache",
                "--data",
                str(data),
                "--model",
                str(ae),
                "--text-encoder",
                str(all_minilm_l6_v2()),
                "-o",
                str(root / name),
                "--resolution",
                "32",
                "--max-tokens",
                "16",
                "--patch-size",
                str(patch),
            ]
        )
    assert rc == 0, err.getvalue()
    return root / name


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    (root / "data").mkdir()
    for i, (name, c) in enumerate(list(COLORS.items()) * 2):
        Image.fromarray(np.full((32, 32, 3), c, np.uint8)).save(root / "data" / f"{i}.png")
        (root / "data" / f"{i}.txt").write_text(f"a {name} square")
    tiny_autoencoder().save_pretrained(root / "f4")
    f8_autoencoder().save_pretrained(root / "f8")
    a = _cache(root, root / "data", root / "f4", "cache_f4", 2)
    b = _cache(root, root / "data", root / "f8", "cache_f8", 1)
    teacher = root / "teacher"
    train(load_train_config({"data": str(a), "out_dir": str(teacher), "batch_size": 4, "max_steps": 2,
                             "mixed_precision": "no", "num_workers": 0, "sample": {"every": 0, "num": 1, "steps": 1},
                             "log": {"every": 1, "tensorboard": False}, "model": {"name": "SANA-tiny/2"}}),
          progress=False)  # fmt: skip
    return root, a, b, teacher


def _config(world, out, **kw):
    root, a, b, teacher = world
    base = {"teacher": str(teacher), "teacher_data": str(a), "data": str(b), "out_dir": str(out), "batch_size": 4,
            "log_every": 1, "checkpoint_every": 1, "align": {"steps": 4, "lr": 1e-2}, "head": {"steps": 2},
            "tune": {"steps": 2}, "lora": {"rank": 2}, "sample": {"every": 0, "num": 1, "steps": 1}}  # fmt: skip
    return load_config({**base, **kw})


def _interp_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """Bilinear (align_corners=False) as a matrix: output i samples input position (i + 0.5) n_in / n_out - 0.5,
    clamped at the edges, between its two neighbours."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        x = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(np.floor(x)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        m[i, lo] += 1 - (x - lo)
        m[i, hi] += x - lo
    return m


def test_alignment_loss_equals_a_direct_computation():
    torch.manual_seed(0)
    D = 24
    teacher = torch.nn.Conv2d(4, D, 2, stride=2).double()  # f8-like latents 8 x 8, patch 2 -> 4 x 4 tokens
    student = torch.nn.Conv2d(16, D, 1).double()  # deeper latents 2 x 2, patch 1 -> 2 x 2 tokens

    def embed(conv):
        return lambda z: conv(z).flatten(2).transpose(1, 2)

    za, zb = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 16, 2, 2, dtype=torch.float64)
    ours = alignment_loss(embed(student), embed(teacher), zb, za, 1, 2)
    # direct: the teacher's tokens as a matrix product over 2 x 2 patches, the student's as a 1 x 1 one
    patches = za.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 1, 4, 5).reshape(3, 16, -1)  # B, T, C*p*p
    target = patches @ teacher.weight.reshape(D, -1).T + teacher.bias
    s = torch.einsum("bchw,dc->bdhw", zb, student.weight[:, :, 0, 0]) + student.bias[None, :, None, None]
    m = _interp_matrix(4, 2)
    up = torch.einsum("ih,bdhw,jw->bdij", m, s, m).flatten(2).transpose(1, 2)
    direct = ((up - target) ** 2).mean()
    torch.testing.assert_close(ours, direct, rtol=1e-12, atol=0)


def test_three_stages_then_a_merged_checkpoint_that_samples(world, tmp_path):
    root, a, b, teacher = world
    result = adapt(_config(world, tmp_path / "run"), progress=False)
    t = load_checkpoint(teacher)[0].state_dict()
    align = torch.load(result["align"], weights_only=True)["model"]
    head = torch.load(result["head"], weights_only=True)["model"]
    tuned = torch.load(result["lora"], weights_only=True)["model"]
    block = "transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(align[block], t[block]) and torch.equal(head[block], t[block])  # backbone: the teacher's
    assert align["patch_embed.proj.weight"].shape == (t["patch_embed.proj.weight"].shape[0], 16, 1, 1)
    assert not torch.equal(head["patch_embed.proj.weight"], align["patch_embed.proj.weight"])  # stage 2 trains it
    assert not torch.equal(head["proj_out.weight"], align["proj_out.weight"])
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in tuned.items())  # stage 3's adapters trained
    model, _, meta = load_checkpoint(result["final"])
    assert not any(".lora_" in n for n in model.state_dict()) and model.in_channels == 16 and model.patch_size == 1
    assert meta["latents"].latent_channels == 16
    out = tmp_path / "samples"
    assert main(["t2i", "sample", "--ckpt", str(tmp_path / "run" / "final"), "--prompt", "a red square", "--steps",
                 "2", "-o", str(out)]) == 0  # fmt: skip
    assert (out / "images" / "000000.png").is_file()
    again = adapt(_config(world, tmp_path / "run"), progress=False)  # all done: nothing reruns
    assert again["final"] == result["final"]


def test_stage_one_resumes_exactly(world, tmp_path):
    full = adapt(_config(world, tmp_path / "full", tune={"steps": 1}, head={"steps": 1}), progress=False)
    adapt_cfg = _config(world, tmp_path / "split", align={"steps": 2, "lr": 1e-2}, tune={"steps": 1}, head={"steps": 1})
    from dcae.diffusion.t2i import adapt as adapt_mod

    a, b = adapt_mod.open_cache(adapt_cfg.teacher_data), adapt_mod.open_cache(adapt_cfg.data)
    teacher = adapt_mod.load_pretrained(adapt_cfg.teacher).model
    adapt_mod._stage1(adapt_cfg, teacher, a, b, tmp_path / "split")  # 2 of the 4 steps, then the rest
    adapt(_config(world, tmp_path / "split", tune={"steps": 1}, head={"steps": 1}), progress=False)
    x = torch.load(full["align"], weights_only=True)["model"]
    y = torch.load(list_checkpoints(tmp_path / "split" / "align")[-1], weights_only=True)["model"]
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_teacher_of_another_autoencoder_and_unpaired_caches_are_one_line(world, tmp_path):
    root, a, b, teacher = world
    tiny_autoencoder(seed=1).save_pretrained(tmp_path / "f4other")
    other = _cache(tmp_path, root / "data", tmp_path / "f4other", "other", 2)
    with pytest.raises(UserError, match="teacher=.*autoencoder.*f4other"):
        adapt(_config(world, tmp_path / "x", teacher_data=str(other)), progress=False)
    (tmp_path / "half").mkdir()
    for i in range(4):
        for ext in ("png", "txt"):
            (tmp_path / "half" / f"{i}.{ext}").write_bytes((root / "data" / f"{i}.{ext}").read_bytes())
    half = _cache(tmp_path, tmp_path / "half", root / "f8", "half", 1)
    with pytest.raises(UserError, match="not the same images"):
        adapt(_config(world, tmp_path / "y", data=str(half)), progress=False)
