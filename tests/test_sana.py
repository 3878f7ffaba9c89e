"""SANA (dcae.diffusion.nets.sana) against diffusers' SanaTransformer2DModel: the same output from the same
weights in both directions, the time convention, gradient checkpointing, the released sizes on the meta device,
and every refused option. CPU, fp32, random weights, no downloads."""

from __future__ import annotations

import pytest
import torch

from dcae.diffusion.conditioning import Text, TextConditioning
from dcae.diffusion.nets import create_diffusion_model, list_diffusion_models, set_grad_checkpointing
from dcae.diffusion.nets.sana import (
    SanaConfigError,
    SanaTransformer,
    diffusers_config,
    from_diffusers,
    save_diffusers,
    to_diffusers_state_dict,
)
from dcae.diffusion.processes.flow import FlowMatching
from dcae.errors import UnknownModelError, UserError, WeightsError

diffusers = pytest.importorskip("diffusers")
SanaTransformer2DModel = diffusers.SanaTransformer2DModel

TINY = {
    "in_channels": 8,
    "out_channels": 8,
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "num_layers": 2,
    "num_cross_attention_heads": 2,
    "cross_attention_head_dim": 32,
    "cross_attention_dim": 64,
    "caption_channels": 16,
    "sample_size": 8,
}
CONFIGS = {
    "plain": {},
    "cross-heads-4x16": {"num_cross_attention_heads": 4, "cross_attention_head_dim": 16},
    "cross-inner-48": {"num_cross_attention_heads": 1, "cross_attention_head_dim": 48},  # != width
    "patch2": {"patch_size": 2},
    "sana1.5-options": {
        "qk_norm": "rms_norm_across_heads",
        "attention_bias": True,
        "norm_elementwise_affine": True,
        "mlp_ratio": 3.0,
        "norm_eps": 1e-5,
    },  # fmt: skip
    "sincos-pe": {"interpolation_scale": 1.0, "patch_size": 2},
    "sincos-pe-x2": {"interpolation_scale": 2.0},
    "learned-sigma": {"out_channels": 16},
    "timestep-scale": {"timestep_scale": 0.001},  # SANA-Sprint's teacher
}


def _theirs(config: dict, seed: int = 0) -> SanaTransformer2DModel:
    """diffusers' model with every parameter moved off its init (norm weights of 1, zero biases)."""
    torch.manual_seed(seed)
    model = SanaTransformer2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs(batch: int, channels: int, h: int, w: int, caption: int, tokens: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, h, w, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    emb = torch.randn(batch, tokens, caption, generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    for i in range(batch):  # prompts of different lengths, right-padded like Gemma's; the first one is full
        mask[i, max(1, tokens - 3 * i) :] = 0
    null_mask = torch.zeros(tokens, dtype=torch.long)
    null_mask[:2] = 1
    return x, t, Text(emb, mask, torch.randn(tokens, caption, generator=g), null_mask)


def _call_theirs(model: SanaTransformer2DModel, x, t, cond: Text) -> torch.Tensor:
    """What diffusers' SanaPipeline does per step: timestep * config.timestep_scale, the mask as given."""
    timestep = t * model.config.timestep_scale
    return model(x, encoder_hidden_states=cond.emb, timestep=timestep, encoder_attention_mask=cond.mask).sample


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_output_as_diffusers_from_its_weights(name):
    config = {**TINY, **CONFIGS[name]}
    theirs = _theirs(config)
    ours = from_diffusers(theirs.state_dict(), dict(theirs.config)).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())  # the same keys, in the same order
    p = config.get("patch_size", 1)
    x, t, cond = _inputs(3, 8, 6 * p, 10 * p, 16)  # non-square, batch 3, padded prompts
    with torch.no_grad():
        out, ref = ours(x, t, cond), _call_theirs(theirs, x, t, cond)
    assert out.shape == ref.shape == (3, config["out_channels"], 6 * p, 10 * p)
    assert _rel(out, ref) < 1e-5, (name, _rel(out, ref), (out - ref).abs().max().item())
    if config.get("interpolation_scale"):  # the latent size of the training grid (diffusers' stored table), too
        x2 = torch.randn(3, 8, config["sample_size"], config["sample_size"])
        with torch.no_grad():
            assert _rel(ours(x2, t, cond), _call_theirs(theirs, x2, t, cond)) < 1e-5
        assert theirs.patch_embed.pos_embed.shape[1] == (config["sample_size"] // p) ** 2
    # padded tokens are ignored (the mask is applied), and batch elements do not see each other
    emb = cond.emb.clone()
    emb[1, cond.mask[1] == 0] = 100.0
    with torch.no_grad():
        assert torch.allclose(ours(x, t, Text(emb, cond.mask, cond.null_emb, cond.null_mask)), out, atol=1e-5)
        assert torch.allclose(ours(x[:1], t[:1], cond.chunk(3)[0]), out[:1], atol=1e-5)


def test_sana_sprint_guidance_embedding_as_diffusers():
    """SANA-Sprint's transformer (guidance_embeds, q/k RMS norm across heads): diffusers' output from its
    weights, with `guidance` and the timestep as SanaSprintPipeline passes them (unscaled)."""
    config = {**TINY, "guidance_embeds": True, "qk_norm": "rms_norm_across_heads"}
    theirs = _theirs(config)
    ours = from_diffusers(theirs.state_dict(), dict(theirs.config)).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x, t, cond = _inputs(2, 8, 6, 10, 16)
    t, guidance = t / 1000, torch.tensor([0.45, 0.3])
    with torch.no_grad():
        out = ours(x, t, cond, guidance=guidance)
        ref = theirs(x, encoder_hidden_states=cond.emb, timestep=t, guidance=guidance,
                     encoder_attention_mask=cond.mask).sample  # fmt: skip
    assert _rel(out, ref) < 1e-5, _rel(out, ref)
    with pytest.raises(ValueError, match="guidance"):
        ours(x, t, cond)
    with pytest.raises(ValueError, match="guidance"):
        from_diffusers(_theirs(TINY).state_dict(), dict(_theirs(TINY).config))(x, t, cond, guidance=guidance)


def test_saved_folder_loads_in_diffusers_and_back(tmp_path):
    torch.manual_seed(0)
    ours = create_diffusion_model("SANA-tiny", 8, 8, caption_channels=16, qk_norm="rms_norm_across_heads").eval()
    folder = save_diffusers(ours, tmp_path / "transformer")
    theirs, info = SanaTransformer2DModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert {k: v for k, v in theirs.config.items() if not k.startswith("_")} == ours.config
    x, t, cond = _inputs(2, 8, 4, 6, 16)
    with torch.no_grad():
        out, ref = ours(x, t, cond), _call_theirs(theirs.eval(), x, t, cond)
    assert _rel(out, ref) < 1e-5, _rel(out, ref)
    # our folder back into ours (and a pipeline folder with transformer/ in it), and diffusers' own folder
    for source in (folder, tmp_path):
        back = from_diffusers(source)
        assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())
    theirs.save_pretrained(tmp_path / "theirs")
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    theirs.save_pretrained(tmp_path / "variant", variant="bf16", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    for source, variant in (("theirs", None), ("sharded", None), ("variant", "bf16")):
        again = from_diffusers(tmp_path / source, variant=variant).eval()
        with torch.no_grad():
            assert torch.equal(again(x, t, cond), out), source
    with pytest.raises(WeightsError, match="variant="):
        from_diffusers(tmp_path / "variant")
    with pytest.raises(UserError, match="already exists"):
        save_diffusers(ours, folder)
    assert to_diffusers_state_dict(ours).keys() == theirs.state_dict().keys()
    assert diffusers_config(ours)["_class_name"] == "SanaTransformer2DModel"


def test_time_mapping_matches_diffusers_flow_schedulers():
    """Our flow time t is diffusers' sigma: the model sees t * 1000 (MODEL_TIME_SCALE), its output is the
    velocity noise - x0 in both, and diffusers' FlowMatch Euler step is x + (sigma_next - sigma) v."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    euler.set_timesteps(10)
    sigmas = euler.sigmas.double()
    assert torch.allclose(euler.timesteps.double(), sigmas[:-1] * 1000, atol=1e-3)
    assert all(abs(FlowMatching.model_time(float(s)) - float(ts)) < 1e-3 for s, ts in zip(sigmas, euler.timesteps))
    # the same shift of the time grid: sigma' = s sigma / (1 + (s - 1) sigma)
    ours = torch.tensor(FlowMatching.sampling_times(10, shift=3.0), dtype=torch.float64)
    assert abs(float(ours[0]) - float(sigmas[0])) < 1e-6 and float(ours[-1]) == float(sigmas[-1]) == 0.0
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    s, s_next = euler.sigmas[3], euler.sigmas[4]
    xt, v = FlowMatching.interpolate(x0, noise, torch.full((2,), float(s)))
    stepped = euler.step(v, euler.timesteps[3], xt).prev_sample
    assert torch.allclose(stepped, xt + (s_next - s) * v, atol=1e-5)
    assert torch.allclose(stepped, FlowMatching.interpolate(x0, noise, torch.full((2,), float(s_next)))[0], atol=1e-5)
    # SANA's default sampler (flow DPM-Solver) feeds the same sigma * 1000, truncated to an integer
    dpm = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    dpm.set_timesteps(10)
    assert torch.equal(dpm.timesteps, (dpm.sigmas[:-1].double() * 1000).long())


def test_timestep_scale_is_applied_by_our_model():
    theirs = _theirs({**TINY, "timestep_scale": 0.001})
    ours = from_diffusers(theirs.state_dict(), dict(theirs.config)).eval()
    x, t, cond = _inputs(2, 8, 4, 4, 16)
    raw = theirs(x, encoder_hidden_states=cond.emb, timestep=t, encoder_attention_mask=cond.mask).sample
    scaled = theirs(x, encoder_hidden_states=cond.emb, timestep=t * 0.001, encoder_attention_mask=cond.mask).sample
    with torch.no_grad():
        out = ours(x, t, cond)
    assert _rel(out, scaled) < 1e-5 and _rel(out, raw) > 1e-3
    with torch.no_grad():  # a scalar time is every sample's
        assert torch.equal(ours(x, 250.0, cond), ours(x, torch.full((2,), 250.0), cond))


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = create_diffusion_model("SANA-tiny", 8, 8, caption_channels=16, num_layers=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, cond = _inputs(2, 8, 4, 6, 16)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        FlowMatching().loss(model, x, cond, torch.Generator().manual_seed(3)).mean().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    model.train()
    plain = grads()
    set_grad_checkpointing(model, True)
    assert model.grad_checkpointing
    recomputed = grads()
    for k, g in plain.items():
        assert torch.allclose(recomputed[k], g, rtol=1e-5, atol=1e-7), k
    assert all(g.abs().sum() > 0 for k, g in plain.items() if "transformer_blocks" in k), "every block learns"


@pytest.mark.parametrize(
    "name,width,depth", [("SANA-600M", 1152, 28), ("SANA-1600M", 2240, 20), ("SANA1.5-4800M", 2240, 60)]
)
def test_released_sizes_on_meta_match_diffusers(name, width, depth):
    with torch.device("meta"):
        ours = create_diffusion_model(name, in_channels=32, input_size=32)
        theirs = SanaTransformer2DModel(**ours.config)
    assert ours.config["num_attention_heads"] * ours.config["attention_head_dim"] == width
    assert len(ours.transformer_blocks) == depth and ours.config["caption_channels"] == 2304
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters())
    print(f"{name}: {n / 1e6:.2f}M parameters")
    # runs on the meta device for shapes: any latent size
    x, t, cond = _inputs(1, 32, 16, 24, 2304, tokens=4)
    with torch.device("meta"):
        out = ours(x.to("meta"), t.to("meta"), cond.to("meta"))
    assert out.shape == (1, 32, 16, 24)


def test_released_cross_attention_shapes():
    """The released configs (diffusers' convert_sana_to_diffusers.py): 0.6B 16 x 72, 1.6B 20 x 112."""
    with torch.device("meta"):
        small = create_diffusion_model("SANA-600M", 32, 16)
        large = create_diffusion_model("SANA1.5-1600M", 32, 32)
    assert (small.config["num_cross_attention_heads"], small.config["cross_attention_head_dim"]) == (16, 72)
    assert (large.config["num_cross_attention_heads"], large.config["cross_attention_head_dim"]) == (20, 112)
    assert small.config["num_attention_heads"] == 36 and large.config["qk_norm"] == "rms_norm_across_heads"
    assert small.config["sample_size"] == 16 and small.config["interpolation_scale"] is None


def test_tiny_size_and_interface():
    model = create_diffusion_model("sana-tiny", 32, 8)
    n = sum(p.numel() for p in model.parameters())
    assert 100_000 < n < 1_000_000, n
    assert isinstance(model, SanaTransformer) and model.in_channels == model.out_channels == 32
    assert model.conditioning == TextConditioning(2304, 300)
    assert model.conditioning.spec() == {"kind": "text", "caption_channels": 2304, "max_tokens": 300}
    assert "SANA-600M" in list_diffusion_models() and "SANA-tiny" in list_diffusion_models()
    assert create_diffusion_model("SANA-tiny/2", 8, 8, caption_channels=16).patch_size == 2
    assert create_diffusion_model("SANA-tiny", 8, 8, learn_sigma=True, caption_channels=16).out_channels == 16
    x, t, cond = _inputs(2, 32, 4, 4, 2304)
    with pytest.raises(ValueError, match="Text condition"):
        model(x, t)
    with pytest.raises(TypeError):
        model(x, t, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="patch size"):
        create_diffusion_model("SANA-tiny/2", 32, 8)(x[:, :, :3], t, cond)
    # training step through the flow-matching process, with caption dropout to the empty prompt
    FlowMatching(cond_dropout=0.5).loss(model.train(), x, cond).mean().backward()


def test_refused_options_are_named():
    with pytest.raises(SanaConfigError, match="qk_norm = 'layer_norm'"):
        SanaTransformer(**TINY, qk_norm="layer_norm")
    with pytest.raises(SanaConfigError, match="cross_attention_dim = 32") as info:
        SanaTransformer(**{**TINY, "cross_attention_dim": 32, "num_layers": 0})
    assert "num_layers = 0" in str(info.value)  # every problem at once
    with pytest.raises(SanaConfigError, match="cross_attention_dim = None"):
        SanaTransformer(**{**TINY, "cross_attention_dim": None})
    with pytest.raises(SanaConfigError, match="'rope_theta'"):
        from_diffusers({}, {**TINY, "rope_theta": 10000})
    with pytest.raises(SanaConfigError, match="PixArtTransformer2DModel"):
        from_diffusers({}, {**TINY, "_class_name": "PixArtTransformer2DModel"})
    theirs = _theirs(TINY)
    sd = theirs.state_dict()
    sd.pop("caption_norm.weight")
    with pytest.raises(WeightsError, match="caption_norm.weight"):
        from_diffusers(sd, dict(theirs.config))
    with pytest.raises(ValueError, match="config"):
        from_diffusers(theirs.state_dict())
    with pytest.raises(UserError, match="text-conditioned"):
        create_diffusion_model("SANA-tiny", 8, 8, num_classes=1000)
    with pytest.raises(UnknownModelError):
        create_diffusion_model("SANA-300M", 8, 8)
    with pytest.raises(UnknownModelError, match="'depth'"):
        create_diffusion_model("SANA-tiny", 8, 8, depth=2)


def test_half_precision_forward_is_finite():
    """bf16 weights and inputs: the linear attention runs in fp32 inside, the output stays in bf16."""
    torch.manual_seed(0)
    model = create_diffusion_model("SANA-tiny", 8, 8, caption_channels=16).eval()
    x, t, cond = _inputs(2, 8, 4, 6, 16)
    with torch.no_grad():
        ref = model(x, t, cond)
        half = Text(cond.emb.bfloat16(), cond.mask, cond.null_emb.bfloat16(), cond.null_mask)
        out = model.to(torch.bfloat16)(x.bfloat16(), t, half)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert _rel(out.float(), ref) < 0.05
