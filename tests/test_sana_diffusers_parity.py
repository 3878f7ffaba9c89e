"""Issue #28: a released-style SANA pipeline (written by diffusers' SanaPipeline.save_pretrained: tiny Gemma-2,
tiny SanaTransformer2DModel, tiny f32 AutoencoderDC) sampled by `dcae t2i sample --model` gives diffusers'
picture for the same seed: Euler (binning at a bin size and at a non-bin size, and off), Heun, SANA's flow
DPM-Solver++, 1 to 20 steps, the instruction on and off. CPU, fp32, no downloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dcae.cli import main
from dcae.models import DCAE, DCAEConfig

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPT = "a red cube on a table"
SCHEDULERS = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
    "heun": ("FlowMatchHeunDiscreteScheduler", {"shift": 2.0}),
    # SANA 1.0 / 1.5's released scheduler_config.json
    "dpm": ("DPMSolverMultistepScheduler", {"flow_shift": 3.0, "use_flow_sigmas": True, "algorithm_type":
            "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero", "lower_order_final": True,
            "prediction_type": "flow_prediction", "use_karras_sigmas": False}),
}  # fmt: skip


def tiny_f32_autoencoder() -> DCAE:
    torch.manual_seed(0)
    six = dict(encoder_widths=(8,) * 6, encoder_depths=(0, 1, 1, 1, 1, 1), encoder_block_types=("ResBlock",) * 6,
               decoder_widths=(8,) * 6, decoder_depths=(0, 1, 1, 1, 1, 1), decoder_block_types=("ResBlock",) * 6,
               decoder_norms=("trms2d",) * 6, decoder_acts=("silu",) * 6)  # fmt: skip
    return DCAE(DCAEConfig(name="tiny-f32c8", latent_channels=8, scaling_factor=0.5, **six))


def _components(root, seed: int, **transformer_kw) -> dict:
    """A random Gemma-2 with its tokenizer, the tiny f32 autoencoder and a tiny SanaTransformer2DModel (seeded),
    all built from diffusers' and transformers' own classes: a pipeline's components but its scheduler."""
    from test_text_encoders import _gemma

    text_dir = _gemma(root / "gemma", layout="pipeline")
    tiny_f32_autoencoder().save_pretrained(root / "ae", format="diffusers")
    torch.manual_seed(seed)
    transformer = diffusers.SanaTransformer2DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
        **transformer_kw,
    )  # fmt: skip
    return {"tokenizer": transformers.AutoTokenizer.from_pretrained(text_dir / "tokenizer"),
            "text_encoder": transformers.AutoModel.from_pretrained(text_dir / "text_encoder"),
            "vae": diffusers.AutoencoderDC.from_pretrained(root / "ae"), "transformer": transformer}  # fmt: skip


def _saved(pipe_class, components: dict, scheduler, folder):
    """The pipeline saved with save_pretrained and loaded back as diffusers loads it."""
    pipe_class(**components, scheduler=scheduler).save_pretrained(folder)
    pipe = pipe_class.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return folder, pipe


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("parity")
    components = _components(root, seed=1, sample_size=16)
    return {kind: _saved(diffusers.SanaPipeline, components, getattr(diffusers, name)(**config), root / kind)
            for kind, (name, config) in SCHEDULERS.items()}  # fmt: skip


def _dcae(folder, out, seed, steps, size, cfg=None, extra=()) -> np.ndarray:
    argv = ["t2i", "sample", "--model", str(folder), "--prompt", PROMPT, "--seed", str(seed), "--size", size,
            "-o", str(out), *extra]  # fmt: skip
    if steps is not None:
        argv += ["--steps", str(steps)]
    if cfg is not None:
        argv += ["--cfg", str(cfg)]
    assert main(argv) == 0
    return np.asarray(Image.open(out / "images" / "000000.png").convert("RGB"))


def _diffusers(pipe, seed, steps, size, cfg=None, **kw) -> np.ndarray:
    h, w = (int(v) for v in size.split("x"))
    args = dict(generator=torch.Generator("cpu").manual_seed(seed), height=h, width=w, output_type="np", **kw)
    if steps is not None:
        args["num_inference_steps"] = steps
    if cfg is not None:
        args["guidance_scale"] = cfg
    image = pipe(PROMPT, **args).images[0]
    return (image * 255).round().astype(np.uint8)


def _same_picture(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    assert ours.shape == theirs.shape, what
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    print(f"{what}: max {diff.max()} levels, {(diff > 0).mean():.3%} of values differ")
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, what
    assert theirs.std() > 5, what  # a picture, not a flat field


CASES = [  # scheduler, steps, size (binned: 400x640 -> 384x640, 256x256 -> 512x512, then back), cfg, options
    ("euler", 1, "400x640", None, ()),
    ("euler", 2, "400x640", None, ()),
    ("euler", 4, "400x640", 2.0, ("--no-instruction",)),
    ("euler", 20, "400x640", None, ()),
    ("euler", 4, "512x512", 1.0, ()),  # a bin size; guidance off
    ("euler", None, "256x320", None, ("--no-resolution-binning",)),  # __call__'s default steps and guidance
    ("heun", 1, "256x256", None, ()),
    ("heun", 2, "400x640", None, ()),
    ("heun", 4, "320x256", None, ("--no-resolution-binning",)),
    ("dpm", 1, "256x256", None, ()),
    ("dpm", 2, "400x640", None, ()),
    ("dpm", 4, "400x640", None, ("--no-instruction",)),
    ("dpm", 20, "320x256", None, ("--no-resolution-binning",)),
]


def _diffusers_options(extra: tuple[str, ...]) -> dict:
    """The arguments of diffusers' pipeline call that do what our flags `extra` do."""
    kw = {}
    if "--no-instruction" in extra:
        kw["complex_human_instruction"] = None
    if "--no-resolution-binning" in extra:
        kw["use_resolution_binning"] = False
    return kw


@pytest.mark.parametrize("kind,steps,size,cfg,extra", CASES)
def test_same_seed_same_picture(pipes, tmp_path, kind, steps, size, cfg, extra):
    folder, pipe = pipes[kind]
    ours = _dcae(folder, tmp_path / "out", 7, steps, size, cfg, extra)
    theirs = _diffusers(pipe, 7, steps, size, cfg, **_diffusers_options(extra))
    _same_picture(ours, theirs, f"{kind} {steps} steps {size} {extra}")


@pytest.mark.parametrize("kind,steps", [("euler", 4), ("heun", 2), ("dpm", 20)])
def test_latents_equal(pipes, kind, steps):
    """Our loop's latents (sana_call.sample_as_pipeline on our transformer) equal output_type='latent'."""
    from dcae.diffusion.t2i.pipeline import load_pipeline
    from dcae.diffusion.t2i.sana_call import make_scheduler, sample_as_pipeline

    folder, pipe = pipes[kind]
    theirs = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(3), num_inference_steps=steps, height=256,
                  width=256, output_type="latent", use_resolution_binning=False).images  # fmt: skip
    p = load_pipeline(folder)
    noise = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    scheduler = make_scheduler(p.scheduler_config, p.scheduler_path)
    ours = sample_as_pipeline(p.transformer, scheduler, noise, p.text_encoder.encode([PROMPT]), steps, 4.5)
    err = (ours - theirs).abs().max().item()
    print(f"{kind} {steps} steps: latents max |diff| {err:.1e} (max |z| {theirs.abs().max():.2f})")
    assert err < 1e-5


def test_seed_of_image_i_is_seed_plus_i(pipes, tmp_path):
    folder, pipe = pipes["euler"]
    argv = ["t2i", "sample", "--model", str(folder), "--prompt", PROMPT, "--prompt", "a blue ball", "--seed", "5",
            "--steps", "2", "--size", "256x256", "--batch-size", "2", "-o", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    ours = np.asarray(Image.open(tmp_path / "images" / "000001.png").convert("RGB"))
    image = pipe("a blue ball", generator=torch.Generator("cpu").manual_seed(6), num_inference_steps=2, height=256,
                 width=256, output_type="np").images[0]  # fmt: skip
    _same_picture(ours, (image * 255).round().astype(np.uint8), "image 1 of seed 5")


def test_dynamic_shifting_is_one_line(pipes, tmp_path, capsys):
    """SanaPipeline passes no mu, so diffusers fails on a dynamically shifted scheduler too: one line here."""
    import json
    import shutil

    folder = tmp_path / "pipe"
    shutil.copytree(pipes["euler"][0], folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"use_dynamic_shifting": True}))
    assert main(["t2i", "sample", "--model", str(folder), "--prompt", PROMPT, "-o", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip()
    assert "needs a mu" in err and len(err.splitlines()) == 1


def test_other_sana_pipelines_are_refused_by_name(pipes, tmp_path, capsys):
    import json
    import shutil

    folder = tmp_path / "pag"
    shutil.copytree(pipes["euler"][0], folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": "SanaPAGPipeline"}))
    assert main(["t2i", "sample", "--model", str(folder), "--prompt", PROMPT, "-o", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip()
    assert "SanaPAGPipeline is not supported" in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def sprint(tmp_path_factory):
    """A tiny SANA-Sprint: guidance-embedded transformer with q/k norm across heads, sample_size 32 (the only
    one SanaSprintPipeline bins), SCMScheduler."""
    root = tmp_path_factory.mktemp("sprint")
    components = _components(root, seed=2, sample_size=32, guidance_embeds=True, qk_norm="rms_norm_across_heads")
    return _saved(diffusers.SanaSprintPipeline, components, diffusers.SCMScheduler(), root / "pipe")


@pytest.mark.parametrize(
    "steps,size,extra",
    [(None, "400x640", ()), (1, "1024x1024", ()), (4, "256x320", ("--no-resolution-binning", "--no-instruction"))],
)
def test_sprint_same_seed_same_picture(sprint, tmp_path, steps, size, extra):  # fmt: skip
    folder, pipe = sprint
    kw = {} if steps == 2 or steps is None else {"intermediate_timesteps": None}
    kw.update(_diffusers_options(extra))
    ours = _dcae(folder, tmp_path / "out", 7, steps, size, None, extra)
    theirs = _diffusers(pipe, 7, steps, size, None, **kw)
    _same_picture(ours, theirs, f"sprint {steps} steps {size} {extra}")


def test_sprint_image_i_of_a_batch_is_seed_plus_i(sprint, tmp_path):
    """Each image of a batch draws the scheduler's noise from its own generator, as a single-image call does."""
    folder, pipe = sprint
    argv = ["t2i", "sample", "--model", str(folder), "--prompt", PROMPT, "--prompt", "a blue ball", "--seed", "5",
            "--size", "256x256", "--no-resolution-binning", "--batch-size", "2", "-o", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    for i, prompt in enumerate((PROMPT, "a blue ball")):
        ours = np.asarray(Image.open(tmp_path / "images" / f"{i:06d}.png").convert("RGB"))
        image = pipe(prompt, generator=torch.Generator("cpu").manual_seed(5 + i), height=256, width=256,
                     use_resolution_binning=False, output_type="np").images[0]  # fmt: skip
        _same_picture(ours, (image * 255).round().astype(np.uint8), f"sprint image {i} of seed 5")
