"""NaN / Inf in weights, latents and outputs are named (which tensor, which file), in the API and the CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_hostile_inputs import make_corpus, tiny_config

from dcae.cli import main
from dcae.errors import NonFiniteError, NonFiniteWarning
from dcae.models import DCAE
from dcae.models.commands import read_latents

DECODER_HEAD = "decoder.project_out.op_list.2.conv.conv.weight"  # the last conv of the tiny model
ENCODER_STEM = "encoder.project_in.conv.conv.weight"


def _save_with_nan(tmp_path: Path, name: str, tensor_name: str | None) -> Path:
    torch.manual_seed(0)
    model = DCAE.from_config(tiny_config())
    if tensor_name is not None:
        with torch.no_grad():
            model.get_parameter(tensor_name).view(-1)[:3] = float("nan")
    return model.save_pretrained(tmp_path / name)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nonfinite")
    return {
        "ok": _save_with_nan(root, "ok", None),
        "nan_decoder": _save_with_nan(root, "nan_decoder", DECODER_HEAD),
        "nan_encoder": _save_with_nan(root, "nan_encoder", ENCODER_STEM),
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    corpus = make_corpus(tmp_path_factory.mktemp("corpus"))
    return [corpus / n for n in ("ok.png", "cmyk.jpg", "one_px.png")]


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ----------------------------------------------------------------------------- API
def test_loading_nan_weights_warns_naming_the_tensor(models) -> None:
    assert ENCODER_STEM in dict(DCAE.from_config(tiny_config()).named_parameters())
    with pytest.warns(NonFiniteWarning, match=rf"weight {DECODER_HEAD} has 3 NaN/Inf of \d+ values"):
        DCAE.from_pretrained(models["nan_decoder"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        DCAE.from_pretrained(models["ok"])  # finite weights: silent


def test_encode_and_decode_name_the_batch_items_that_are_not_finite(models) -> None:
    model = DCAE.from_pretrained(models["ok"])
    x = torch.zeros(3, 3, 16, 16)
    x[1, 0, 0, 0] = float("nan")
    with torch.no_grad(), pytest.warns(NonFiniteWarning, match=r"NaN/Inf in the latents of batch item\(s\) \[1\] of 3"):
        z = model.encode(x)
    z[2] = float("inf")
    with torch.no_grad(), pytest.warns(NonFiniteWarning, match=r"the images of batch item\(s\) \[1, 2\] of 3"):
        model.decode(z)
    model.finite_check = "error"
    with torch.no_grad(), pytest.raises(NonFiniteError, match=r"latents of batch item\(s\) \[1\]"):
        model.encode(x)
    model.finite_check = "off"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        model.decode(z)
        model.encode(torch.zeros(1, 3, 16, 16))


# ----------------------------------------------------------------------------- CLI
def test_reconstruct_with_nan_weights_reports_each_file_and_no_psnr(models, images, tmp_path, capsys) -> None:
    out, js = tmp_path / "rec", tmp_path / "r.json"
    rc, stdout, err = _run(capsys, "reconstruct", *images, "--model", models["nan_decoder"], "-o", out, "--json", js)
    assert rc == 1 and "Traceback" not in err
    assert f"dcae: warning: {models['nan_decoder']}: weight {DECODER_HEAD} has 3 NaN/Inf" in err
    for path in images:
        lines = [line for line in err.splitlines() if str(path) in line]
        assert lines == [
            f"dcae: {path}: the reconstruction contains NaN/Inf (non-finite model output); nothing written"
        ]
    assert "PSNR" not in stdout and not out.exists()
    doc = json.loads(js.read_text())
    assert doc["images"] == [] and doc["psnr"] is None
    assert [e["file"] for e in doc["errors"]] == [str(p) for p in images]


def test_encode_with_nan_encoder_writes_nothing_and_names_each_file(models, images, tmp_path, capsys) -> None:
    lat = tmp_path / "lat.safetensors"
    rc, _, err = _run(capsys, "encode", *images, "--model", models["nan_encoder"], "-o", lat)
    assert rc == 2 and not lat.exists()
    assert f"weight {ENCODER_STEM} has 3 NaN/Inf" in err
    for path in images:
        assert f"dcae: {path}: the encoder produced NaN/Inf latents" in err
    assert "none of the 3 input images could be encoded" in err


def test_decode_skips_a_non_finite_latent_and_writes_the_others(models, images, tmp_path, capsys) -> None:
    lat = tmp_path / "lat.safetensors"
    assert _run(capsys, "encode", *images, "--model", models["ok"], "-o", lat)[0] == 0
    tensors, meta = read_latents(lat)
    bad = meta["images"][1]
    tensors[bad["key"]][0, 0, 0] = float("nan")
    save_file(tensors, str(lat), metadata={"dcae": json.dumps(meta)})
    rc, _, err = _run(capsys, "decode", lat, "-o", tmp_path / "dec")
    assert rc == 1 and "Traceback" not in err
    assert f"dcae: {bad['file']}: {lat}: {bad['key']} contains NaN/Inf latents; skipped" in err
    written = sorted(p.name for p in (tmp_path / "dec").iterdir())
    assert written == sorted(Path(r["file"]).stem + ".png" for r in meta["images"] if r is not bad)


def test_eval_with_nan_weights_is_a_clear_error(models, images, tmp_path, capsys) -> None:
    argv = ["eval", "--model", models["nan_decoder"], "--data", *images, "--resolution", 32, "--no-fid"]
    rc, _, err = _run(capsys, *argv, "--lpips-net", "none", "--workers", 0, "--no-progress")
    assert rc == 2 and "Traceback" not in err
    assert f"weight {DECODER_HEAD} has 3 NaN/Inf" in err
    assert "none of the 3 images could be evaluated" in err and "output is not finite (NaN/Inf)" in err
    assert "ok.png" in err


def test_eval_of_several_models_keeps_those_that_work(models, images, tmp_path, capsys) -> None:
    js = tmp_path / "e.json"
    argv = ["eval", "--model", models["nan_decoder"], "--model", models["ok"], "--data", *images]
    argv += ["--resolution", 32, "--no-fid", "--lpips-net", "none", "--workers", 0, "--no-progress", "--json", js]
    rc, stdout, err = _run(capsys, *argv)
    assert rc == 1 and "Traceback" not in err
    assert f"dcae: error: {models['nan_decoder']}: none of the 3 images could be evaluated" in err
    doc = json.loads(js.read_text())
    assert [e["model"] for e in doc["models"]] == [str(models["ok"])] and doc["models"][0]["num_images"] == 3
    assert doc["failed_models"][0]["model"] == str(models["nan_decoder"])
    assert f"| {models['ok']} | 3 |" in stdout
