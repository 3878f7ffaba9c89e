"""`dcae bench diffusion`: one run measures the same transformer on f8-p2, f32-p1 and f64-p1 latents."""

from __future__ import annotations

import json

from dcae.cli import main as cli


def test_bench_cli_records_and_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = [
        "bench",
        "diffusion",
        "--model",
        "DiT-S",
        "--depth",
        "1",
        "--batch",
        "1",
        "--warmup",
        "0",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--json",
        str(out),
    ]
    assert cli(args) == 0
    records = json.loads(out.read_text())
    assert [r["setting"] for r in records] == ["sd-vae-f8-p2", "dc-ae-f32-p1", "dc-ae-f64-p1"]
    assert [r["tokens"] for r in records[:3]] == [1024, 256, 64]
    for r in records:
        assert {"setting", "tokens", "batch", "train_img_s", "infer_img_s", "model", "device", "dtype"} <= set(r)
        assert r["train_img_s"] > 0 and r["infer_img_s"] > 0 and r["device"] == "cpu" and r["dtype"] == "float32"
    f8, f64 = records[0], records[2]
    assert f8["train_ratio_vs_f8"] == 1.0 and f8["infer_ratio_vs_f8"] == 1.0
    # 16x fewer tokens: far fewer FLOPs per image, and faster in practice
    assert f64["fwd_gflops_per_img"] < f8["fwd_gflops_per_img"] / 8
    assert f64["infer_img_s"] > f8["infer_img_s"]
    assert "| DiT-S" in capsys.readouterr().out
    from PIL import Image

    assert Image.open(out.with_suffix(".png")).size[0] > 300  # the chart next to the numbers


def test_whole_image_generation_adds_the_decode():
    """generate = 2N network evaluations (CFG) + one decode to 512 px, per image; here with narrow
    autoencoders of the three compression factors (the defaults are the full-size diffusers models)."""
    import pytest
    import torch
    from diffusers import AutoencoderKL

    from dcae.diffusion.bench import SETTINGS, run_bench
    from dcae.models import DCAE, DCAEConfig
    from dcae.models.bench import _diffusers_twin

    def narrow_dcae(stages: int, latent: int):
        # the last widths grow 4x per stage, as the residual (pixel-unshuffle) shortcuts need
        widths, depths = ((8,) * 5 + (32, 128))[:stages], (0,) + (1,) * (stages - 1)
        cfg = DCAEConfig(name=f"narrow-{stages}", latent_channels=latent, encoder_widths=widths,
                         encoder_depths=depths, encoder_block_types=("ResBlock",) * stages, decoder_widths=widths,
                         decoder_depths=depths, decoder_block_types=("ResBlock",) * stages,
                         decoder_norms=("bn2d",) * stages, decoder_acts=("relu",) * stages)  # fmt: skip
        return _diffusers_twin(DCAE.from_config(cfg))

    autoencoders = {
        "sd-vae-f8-p2": lambda: AutoencoderKL(
            block_out_channels=(8,) * 4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=4,
        ),  # fmt: skip
        "dc-ae-f32-p1": lambda: narrow_dcae(6, 32),
        "dc-ae-f64-p1": lambda: narrow_dcae(7, 128),
    }
    records = run_bench(["DiT-S"], 1, torch.device("cpu"), torch.float32, warmup=0, steps=1, overrides={"depth": 1},
                        log=lambda *a: None, generate_steps=3, autoencoders=autoencoders)  # fmt: skip
    assert [r["setting"] for r in records] == [s.name for s in SETTINGS]
    for r in records:
        per_image = 2 * 3 / r["infer_img_s"] + 1 / r["decode_img_s"]
        assert r["generate_img_s"] == pytest.approx(1 / per_image, rel=1e-2)
        assert 0 < r["decode_share"] < 1 and r["generate_steps"] == 3
    assert records[0]["generate_ratio_vs_f8"] == 1.0


def test_sana_text_to_image_settings_and_condition(tmp_path):
    """SANA on the same three latents, conditioned on random encoded prompts (Text) rather than class labels:
    f8-p2 at 512 px is 32 x 32 = 1024 tokens, f32-p1 4x fewer, f64-p1 16x fewer; 1024 px quadruples each.
    Sampling is timed as guided steps on the doubled batch, with its ratio against f8-p2 of the same run."""
    import torch

    from dcae.cli import main as cli
    from dcae.diffusion.bench import bench_condition
    from dcae.diffusion.conditioning import Text, TextConditioning

    cond = bench_condition(TextConditioning(2304, 300), 2, torch.device("cpu"))
    assert isinstance(cond, Text) and cond.emb.shape == (2, 300, 2304) and cond.mask.shape == (2, 300)
    assert cond.null_emb.shape == (300, 2304) and cond.null_mask.shape == (300,) and cond.null_mask.sum() == 1

    out = tmp_path / "t2i.json"
    args = ["bench", "diffusion", "--model", "SANA-tiny", "--depth", "1", "--text-tokens", "8", "--caption-channels",
            "16", "--resolution", "512", "1024", "--batch", "1", "--warmup", "0", "--steps", "1", "--sample-steps",
            "2", "--device", "cpu", "--json", str(out)]  # fmt: skip
    assert cli(args) == 0
    records = json.loads(out.read_text())
    assert [(r["resolution"], r["setting"], r["tokens"]) for r in records] == [
        (512, "sd-vae-f8-p2", 1024),
        (512, "dc-ae-f32-p1", 256),
        (512, "dc-ae-f64-p1", 64),
        (1024, "sd-vae-f8-p2", 4096),
        (1024, "dc-ae-f32-p1", 1024),
        (1024, "dc-ae-f64-p1", 256),
    ]
    assert [r["latent_shape"] for r in records[:3]] == [[4, 64, 64], [32, 16, 16], [128, 8, 8]]
    for r in records:
        assert r["model"].startswith("SANA-tiny") and r["patch_size"] == (2 if "f8" in r["setting"] else 1)
        assert r["condition"] == {"kind": "text", "emb": [1, 8, 16], "mask": [1, 8], "null_emb": [8, 16]}
        assert r["train_img_s"] > 0 and r["sample_img_s"] > 0 and r["sample_steps"] == 2
    for base in (records[0], records[3]):  # the ratios are against f8-p2 of the same resolution
        assert base["train_ratio_vs_f8"] == 1.0 and base["sample_ratio_vs_f8"] == 1.0
    assert records[2]["fwd_gflops_per_img"] < records[0]["fwd_gflops_per_img"] / 8
    assert records[4]["sample_ratio_vs_f8"] == round(records[4]["sample_img_s"] / records[3]["sample_img_s"], 2)
