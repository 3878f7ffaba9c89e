"""diffusers AutoencoderDC configs beyond the released ones: every field is honoured (checked against
AutoencoderDC itself, saved with its own save_pretrained) or refused by name."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from diffusers import AutoencoderDC, AutoencoderKL
from safetensors.torch import load_file, save_file
from test_models_parity import randomize_norms

from dcae import DCAE
from dcae.errors import UnknownModelError, WeightsError
from dcae.models.diffusers_config import DIFFUSERS_DEFAULTS, from_diffusers_config

# The kind of model diffusers' own tests build: 2 stages, head dim 2, strided-conv down, interpolate up.
TINY = dict(
    in_channels=3,
    latent_channels=4,
    attention_head_dim=2,
    encoder_block_types=("ResBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(32, 32),
    decoder_block_out_channels=(32, 32),
    encoder_qkv_multiscales=((), (5,)),
    decoder_qkv_multiscales=((), (5,)),
    encoder_layers_per_block=(1, 1),
    decoder_layers_per_block=(1, 1),
    downsample_block_type="conv",
    upsample_block_type="interpolate",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    scaling_factor=0.41407,
)

CONFIGS = {
    "diffusers-test-model": TINY,
    # the model: a head dim that is neither 32 nor the test model's
    "head-dim-8": {
        **TINY,
        "attention_head_dim": 8,
        "encoder_qkv_multiscales": ((), ()),
        "decoder_qkv_multiscales": ((), ()),
    },
    # one input channel, batch norm, ReLU/GELU ResBlocks, two multi-scale kernels, a SiLU ("swish") head
    "bn-multiscale": dict(
        in_channels=1,  # grey-level images
        latent_channels=8,
        attention_head_dim=4,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock"],
        encoder_block_out_channels=(16, 32, 64),
        decoder_block_out_channels=(16, 32, 64),
        encoder_layers_per_block=(1, 1, 2),
        decoder_layers_per_block=(2, 1, 1),
        encoder_qkv_multiscales=((), (), (3, 5)),
        decoder_qkv_multiscales=((), (), (3,)),
        # batch norm on the attention stage too: diffusers keeps RMS norm in its GLUMBConv
        decoder_norm_types=("batch_norm", "batch_norm", "batch_norm"),
        decoder_act_fns=("relu", "gelu", "relu"),  # diffusers' EfficientViT blocks ignore theirs (SiLU)
        decoder_conv_act_fn="swish",
    ),
    # an empty first stage (a stride-2 stem conv here), no bottleneck shortcuts (the DC-AE 1.5 layout),
    # Mish, and fields left at diffusers' 6-stage defaults (qkv_multiscales) for a 3-stage model
    "stem-no-shortcuts": dict(
        latent_channels=8,
        attention_head_dim=16,
        encoder_block_types="ResBlock",
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(16, 32, 64),
        decoder_block_out_channels=(16, 32, 32),
        encoder_layers_per_block=(0, 1, 1),
        decoder_layers_per_block=(0, 2, 1),
        downsample_block_type="Conv",
        upsample_block_type="interpolate",
        decoder_norm_types=("rms_norm", "batch_norm", "rms_norm"),
        decoder_act_fns=("silu", "mish", "silu"),
        encoder_out_shortcut=False,
        decoder_in_shortcut=False,
        decoder_conv_act_fn="silu",
    ),
}


def saved_by_diffusers(config: dict, folder) -> AutoencoderDC:
    torch.manual_seed(0)
    model = AutoencoderDC(**config).eval()
    randomize_norms(model)
    model.save_pretrained(folder)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_fields_are_those_of_the_installed_autoencoder_dc() -> None:
    """Every AutoencoderDC.__init__ argument (and its default) is one this reader knows."""
    params = inspect.signature(AutoencoderDC.__init__).parameters
    theirs = {k: p.default for k, p in params.items() if k != "self"}
    assert theirs == DIFFUSERS_DEFAULTS


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_saved_model_loads_with_parity(name: str, tmp_path) -> None:
    twin = saved_by_diffusers(CONFIGS[name], tmp_path / name)
    model = DCAE.from_pretrained(tmp_path / name)
    assert model.config.attention_head_dim == twin.config.attention_head_dim
    assert model.scaling_factor == pytest.approx(twin.config.scaling_factor)
    c = twin.config.in_channels
    x = torch.rand(2, c, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1  # non-square
    with torch.no_grad():
        z, z_ref = model.encode(x), twin.encode(x).latent
        y, y_ref = model.decode(z_ref), twin.decode(z_ref).sample
    assert z.shape == z_ref.shape and y.shape == y_ref.shape
    print(f"{name}: encode {rel_err(z, z_ref):.1e}, decode {rel_err(y, y_ref):.1e} (relative error)")
    assert rel_err(z, z_ref) < 1e-5 and rel_err(y, y_ref) < 1e-5, (rel_err(z, z_ref), rel_err(y, y_ref))


def test_ignoring_the_head_dim_would_be_caught(tmp_path) -> None:
    """The parity check above can fail: the same weights read with head dim 32 (the old reading) differ."""
    twin = saved_by_diffusers(CONFIGS["head-dim-8"], tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["attention_head_dim"] = 32
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    wrong = DCAE.from_pretrained(tmp_path / "m")
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert rel_err(wrong.encode(x), twin.encode(x).latent) > 1e-2


@pytest.mark.parametrize("name", ["stem-no-shortcuts", "bn-multiscale"])
def test_round_trip_through_our_diffusers_writer(name: str, tmp_path) -> None:
    """A non-released config read from diffusers, written back by dcae, loads in diffusers strictly."""
    twin = saved_by_diffusers(CONFIGS[name], tmp_path / "a")
    DCAE.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b", format="diffusers")
    again, info = AutoencoderDC.from_pretrained(tmp_path / "b", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for k, v in twin.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


# ----------------------------------------------------------------------------- refused by name
# (field, value written to config.json, how the error names it, why)
REFUSED = [
    ("attention_head_dim", 3, "attention_head_dim = 3", "encoder_block_out_channels[1] = 32"),
    ("attention_head_dim", 0, "attention_head_dim = 0", "positive integer"),
    ("decoder_norm_types", "layer_norm", "decoder_norm_types[0] = 'layer_norm'", "supported: 'rms_norm', 'batch_norm'"),
    ("decoder_norm_types", ["rms_norm", "layer_norm"], "decoder_norm_types[1] = 'layer_norm'", "'batch_norm'"),
    ("decoder_norm_types", ["rms_norm"], "decoder_norm_types = ['rms_norm']", "each of the 2 stages"),
    ("decoder_act_fns", ["tanh", "silu"], "decoder_act_fns[0] = 'tanh'", "supported: 'silu', 'swish'"),
    ("decoder_conv_act_fn", "tanh", "decoder_conv_act_fn = 'tanh'", "unknown activation"),
    ("decoder_conv_act_fn", ["relu"], "decoder_conv_act_fn = ['relu']", "unknown activation"),
    ("upsample_block_type", "bilinear", "upsample_block_type = 'bilinear'", "'pixel_shuffle', 'interpolate'"),
    # diffusers would build pixel shuffle for this one (it tests == "interpolate"): refused, not guessed
    ("upsample_block_type", "Interpolate", "upsample_block_type = 'Interpolate'", "unknown upsampling"),
    ("downsample_block_type", "avgpool", "downsample_block_type = 'avgpool'", "'pixel_unshuffle', 'conv'"),
    ("downsample_block_type", "Pixel_Unshuffle", "downsample_block_type = 'Pixel_Unshuffle'", "unknown downsampling"),
    ("encoder_block_types", ["ResBlock", "Transformer"], "encoder_block_types[1] = 'Transformer'", "EfficientViTBlock"),
    ("encoder_qkv_multiscales", [[], [4]], "encoder_qkv_multiscales[1] = [4]", "odd kernel sizes"),
    ("encoder_layers_per_block", [1, 0], "encoder_layers_per_block = [1, 0]", "only the first stage"),
    ("decoder_layers_per_block", [0, 0], "decoder_layers_per_block = [0, 0]", "only the first stage"),
    ("encoder_out_shortcut", "yes", "encoder_out_shortcut = 'yes'", "true or false"),
    ("scaling_factor", 0, "scaling_factor = 0", "positive number"),
    ("latent_channels", 5, "latent_channels (5)", "encoder_out_shortcut"),  # 32 channels do not average to 5
    ("encoder_norm_types", "batch_norm", "encoder_norm_types = 'batch_norm'", "always uses 'rms_norm'"),
    ("encoder_act_fns", ["silu", "relu"], "encoder_act_fns = ['silu', 'relu']", "always uses 'silu'"),
    ("use_fancy_attention", True, "use_fancy_attention = True", "not an argument of diffusers' AutoencoderDC"),
    ("_class_name", "AutoencoderKL", "_class_name = 'AutoencoderKL'", "not a DC-AE"),
]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    saved_by_diffusers(TINY, folder)
    return folder


@pytest.mark.parametrize("field, value, named, why", REFUSED, ids=[f"{f}={v}" for f, v, _, _ in REFUSED])
def test_unsupported_field_is_refused_by_name(tiny_folder, tmp_path, field, value, named, why) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    weights = "diffusion_pytorch_model.safetensors"
    (folder / weights).write_bytes((tiny_folder / weights).read_bytes())
    config = json.loads((tiny_folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError) as err:
        DCAE.from_pretrained(folder)
    msg = str(err.value)
    assert str(folder / "config.json") in msg and named in msg and why in msg, msg


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(ValueError) as err:
        from_diffusers_config({**TINY, "attention_head_dim": 3, "upsample_block_type": "bilinear"})
    assert "attention_head_dim = 3" in str(err.value) and "upsample_block_type = 'bilinear'" in str(err.value)


def test_defaults_are_diffusers_defaults() -> None:
    """A config.json that leaves every field out is diffusers' default model (a 6-stage SANA-like AE)."""
    cfg = from_diffusers_config({"_class_name": "AutoencoderDC"})
    assert cfg.encoder_depths == (2, 2, 2, 3, 3, 3) and cfg.decoder_depths == (3,) * 6
    assert cfg.encoder_block_types == cfg.decoder_block_types == ("ResBlock",) * 6  # multiscales unused there
    assert (cfg.attention_head_dim, cfg.decoder_head_act, cfg.encoder_downsample) == (32, "relu", "pixel_unshuffle")
    with torch.device("meta"):
        ours = DCAE(cfg).state_dict()
        theirs = AutoencoderDC().state_dict()
    assert len([k for k in ours if not k.endswith("num_batches_tracked")]) == len(
        [k for k in theirs if not k.endswith("num_batches_tracked")]
    )


# ----------------------------------------------------------------------------- bad input
def test_another_diffusers_family_is_refused_naming_the_file(tmp_path) -> None:
    kl = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    kl.save_pretrained(tmp_path / "kl")
    with pytest.raises(WeightsError, match="AutoencoderKL") as err:
        DCAE.from_pretrained(tmp_path / "kl")
    assert str(tmp_path / "kl" / "config.json") in str(err.value)
    # without its config.json, the weights alone match no DC-AE
    weights = tmp_path / "kl" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(WeightsError, match="match no known DC-AE") as err:
        DCAE.from_pretrained(weights.rename(tmp_path / "kl.safetensors"))
    assert "kl.safetensors" in str(err.value)


def test_missing_and_wrong_shape_diffusers_keys_are_named(tiny_folder, tmp_path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_folder / "config.json").read_text())
    sd = load_file(str(tiny_folder / "diffusion_pytorch_model.safetensors"))
    del sd["decoder.norm_out.bias"]
    sd["encoder.conv_out.weight"] = torch.zeros(4, 32, 1, 1)
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightsError) as err:
        DCAE.from_pretrained(folder)
    msg = str(err.value)
    assert "diffusion_pytorch_model.safetensors" in msg
    assert "decoder.project_out.op_list.0.bias" in msg  # our name of decoder.norm_out.bias
    assert "encoder.project_out.main.op_list.0.conv.weight" in msg and "(4, 32, 1, 1)" in msg


def test_unknown_model_name_in_config_json_names_the_file(tiny_folder, tmp_path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((tiny_folder / "diffusion_pytorch_model.safetensors").read_bytes())
    (folder / "config.json").write_text(json.dumps({"model_name": "dc-ae-f64c128-1.6"}))
    with pytest.raises(UnknownModelError) as err:
        DCAE.from_pretrained(folder)
    assert str(folder / "config.json") in str(err.value) and "dc-ae-f64c128-1.5" in str(err.value)
