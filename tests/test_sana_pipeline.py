"""dcae <-> diffusers SANA pipelines (dcae.diffusion.t2i.pipeline): a tiny text-to-image run (tiny DC-AE, the
bundled all-MiniLM-L6-v2 encoder, SANA-tiny, 2 steps) exported as a SanaPipeline folder; diffusers' SanaPipeline
samples the same images as our sampler (with our time grid passed as `sigmas`) and, called as the docs say, the
same picture as `dcae t2i sample --model` and `--ckpt` (its scheduler, noise seed + i); load_pipeline gives back
the same models; one-line errors. CPU, fp32, no downloads."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_diffusion_latents import tiny_autoencoder

from dcae.diffusion.cache import decode_scaled
from dcae.diffusion.processes.sampling import sample
from dcae.diffusion.t2i.encoders import TextEncoder, all_minilm_l6_v2
from dcae.diffusion.t2i.pipeline import export_pipeline, load_pipeline
from dcae.diffusion.train.checkpoint import load_checkpoint
from dcae.errors import UserError
from dcae.models import DCAE

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

SHIFT, STEPS, CFG, MAX_TOKENS = 3.0, 4, 4.5, 16
PROMPTS = ["a red square", "a blue square"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A 2-step text-to-image run on 8 captioned 32 x 32 images (latents 8 x 8 x 8), exported with the Euler
    scheduler and shift 3. The autoencoder folder is re-saved with another scaling factor after caching: the
    export must write the one the latents were scaled with (0.5)."""
    from dcae.diffusion.t2i.cache import extract_text_latents
    from dcae.diffusion.train.config import load_config
    from dcae.diffusion.train.loop import train

    root = tmp_path_factory.mktemp("t2i")
    (root / "data").mkdir()
    colors = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 40)}
    for i, (name, c) in enumerate(list(colors.items()) * 2):
        Image.fromarray(np.full((32, 32, 3), c, np.uint8)).save(root / "data" / f"{i}.png")
        (root / "data" / f"{i}.txt").write_text(f"a {name} square")
    ae = tiny_autoencoder()
    ae.save_pretrained(root / "ae")
    encoder = TextEncoder.from_pretrained(all_minilm_l6_v2(), max_tokens=MAX_TOKENS)
    extract_text_latents(ae, encoder, root / "data", root / "cache", model_name=str(root / "ae"), resolution=32,
                         progress=False)  # fmt: skip
    ae.config.scaling_factor = 1.0  # (ae's own config object; the cache recorded 0.5)
    ae.save_pretrained(root / "ae", overwrite=True)
    ae.config.scaling_factor = 0.5
    overrides = [f"data={root / 'cache'}", f"out_dir={root / 'run'}", "model.name=SANA-tiny", "batch_size=2",
                 "max_steps=2", "log.every=1", "checkpoint.every=2", "mixed_precision=no", "num_workers=0",
                 "sample.every=0", f"sample.steps={STEPS}", f"sample.cfg_scale={CFG}", "sample.num=2",
                 "optim.lr=1e-3", "log.tensorboard=false"]  # fmt: skip
    train(load_config(None, overrides), progress=False)
    folder = export_pipeline(root / "run", root / "pipe", shift=SHIFT)
    model, process, meta = load_checkpoint(root / "run")
    return {"root": root, "folder": folder, "model": model, "process": process, "meta": meta, "ae": ae,
            "encoder": encoder}  # fmt: skip


def _ours(run: dict, noise: torch.Tensor, text) -> tuple[torch.Tensor, torch.Tensor]:
    z = sample(run["model"], run["process"], noise, text, steps=STEPS, solver="euler", cfg_scale=CFG, shift=SHIFT)
    return z, decode_scaled(run["ae"], z, 0.5)


def test_exported_folder(run):
    folder = run["folder"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "BertModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["_dcae"]["max_tokens"] == MAX_TOKENS and index["_dcae"]["resolution"] == 32
    vae = diffusers.AutoencoderDC.from_pretrained(folder / "vae")
    assert vae.config.scaling_factor == 0.5  # the cache's, not the autoencoder folder's (now 1.0)
    assert DCAE.from_pretrained(run["root"] / "ae").scaling_factor == 1.0
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    assert scheduler.config.shift == SHIFT and not scheduler.config.use_dynamic_shifting
    assert sorted(p.name for p in (folder / "text_encoder").iterdir()) == ["config.json", "model.safetensors"]


def test_diffusers_pipeline_samples_our_images(run):
    """SanaPipeline.from_pretrained takes the BERT encoder (it only logs the expected Gemma type); with our
    embeddings, our noise as `latents` (used as given: no init-noise scaling) and our time grid via `sigmas`,
    it gives our latents and images."""
    pipe = diffusers.SanaPipeline.from_pretrained(run["folder"])
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.text_encoder).__name__ == "BertModel"
    text = run["encoder"].encode(PROMPTS)
    noise = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    z, image = _ours(run, noise, text)
    null = text.null()
    null_emb, null_mask = null.emb, null.mask
    common = dict(prompt_embeds=text.emb, prompt_attention_mask=text.mask, negative_prompt=None,
                  negative_prompt_embeds=null_emb, negative_prompt_attention_mask=null_mask, latents=noise.clone(),
                  guidance_scale=CFG, height=32, width=32, sigmas=np.linspace(1, 0, STEPS + 1)[:-1].tolist(),
                  use_resolution_binning=False, max_sequence_length=MAX_TOKENS,
                  complex_human_instruction=None)  # fmt: skip
    theirs_z = pipe(**common, output_type="latent").images
    theirs = pipe(**common, output_type="pt").images  # [0, 1]
    z_err = (theirs_z - z).abs().max().item()
    img_err = (theirs - (image / 2 + 0.5).clamp(0, 1)).abs().max().item()
    inside = ((image > -1) & (image < 1)).float().mean().item()  # the share diffusers' clamp leaves as it is
    print(f"SanaPipeline vs ours: latents max |diff| {z_err:.2e} (max |z| {z.abs().max():.2f}), images {img_err:.2e}"
          f" ({inside:.1%} of pixels inside (-1, 1))")  # fmt: skip
    assert inside > 0.9
    assert z_err < 1e-4 and img_err < 1e-5
    # the pipeline's own prompt path gives our encoder's embeddings (uncased BERT; no instruction)
    pe, pm, ne, nm = pipe.encode_prompt(PROMPTS, True, negative_prompt="", device="cpu",
                                        max_sequence_length=MAX_TOKENS, complex_human_instruction=None)  # fmt: skip
    assert torch.equal(pe, text.emb) and torch.equal(pm, text.mask)
    assert torch.equal(ne, null_emb) and torch.equal(nm, null_mask)


def test_dcae_samples_the_exported_pipeline_as_diffusers_does(run, tmp_path):
    """`dcae t2i sample --model FOLDER` and `--ckpt RUN` (same solver and shift) give the PNG diffusers gives with
    `generator=torch.Generator("cpu").manual_seed(S + i)`, max_sequence_length=the record's, no instruction and
    no binning: its scheduler's time grid (shift 3, ending at a shifted sigma_min), not a linspace."""
    from dcae.cli import main

    pipe = diffusers.SanaPipeline.from_pretrained(run["folder"])
    pipe.set_progress_bar_config(disable=True)
    common = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seed", "7", "--size", "32x32", "--steps", str(STEPS),
              "--cfg", str(CFG), "-o"]  # fmt: skip
    assert main(["t2i", "sample", "--model", str(run["folder"]), *common, str(tmp_path / "model")]) == 0
    assert main(["t2i", "sample", "--ckpt", str(run["root"] / "run"), "--shift", str(SHIFT), *common,
                 str(tmp_path / "ckpt")]) == 0  # fmt: skip
    for i, prompt in enumerate(PROMPTS):
        ours = np.asarray(Image.open(tmp_path / "model" / "images" / f"{i:06d}.png").convert("RGB"))
        ckpt = np.asarray(Image.open(tmp_path / "ckpt" / "images" / f"{i:06d}.png").convert("RGB"))
        assert np.array_equal(ours, ckpt)
        image = pipe(prompt, generator=torch.Generator("cpu").manual_seed(7 + i), height=32, width=32,
                     max_sequence_length=MAX_TOKENS, complex_human_instruction=None, use_resolution_binning=False,
                     num_inference_steps=STEPS, guidance_scale=CFG, output_type="np").images[0]  # fmt: skip
        diff = np.abs(ours.astype(int) - (image * 255).round().astype(int))
        print(f"image {i}: max {diff.max()} levels, {(diff > 0).mean():.3%} of values differ")
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_load_pipeline_gives_back_the_models(run):
    p = load_pipeline(run["folder"])
    settings = (p.scaling_factor, p.shift, p.solver, p.steps, p.guidance_scale, p.resolution)
    assert settings == (0.5, SHIFT, "euler", STEPS, CFG, 32)
    ours, theirs = run["model"].state_dict(), p.transformer.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(v, ours[k]) for k, v in theirs.items())
    text = run["encoder"].encode(PROMPTS)
    loaded = p.text_encoder.encode(PROMPTS)
    assert torch.equal(loaded.emb, text.emb) and torch.equal(loaded.mask, text.mask)
    assert torch.equal(loaded.null_emb, text.null_emb)
    x = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([900.0, 250.0])
    with torch.no_grad():
        assert torch.equal(p.transformer(x, t, loaded), run["model"](x, t, text))
        assert torch.equal(p.autoencoder.decode(x), run["ae"].decode(x))
    # the sampled images of both
    noise = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    z = sample(p.transformer, run["process"], noise, loaded.chunk(2)[0], steps=STEPS, solver="euler", cfg_scale=CFG,
               shift=p.shift)  # fmt: skip
    assert torch.equal(decode_scaled(p.autoencoder, z, p.scaling_factor), _ours(run, noise, text.chunk(2)[0])[1])


def test_export_refuses_existing_folder_and_overwrites(run, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(run["folder"], folder)
    with pytest.raises(UserError, match="already exists"):
        export_pipeline(run["root"] / "run", folder)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")  # stale
    export_pipeline(run["root"] / "run", folder, overwrite=True, solver="dpm++", shift=2.0)
    assert not (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    scheduler = diffusers.DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler")
    assert scheduler.config.use_flow_sigmas and scheduler.config.flow_shift == 2.0
    p = load_pipeline(folder)
    assert (p.solver, p.shift) == ("dpm++", 2.0)
    with pytest.raises(UserError, match="solver 'ddpm'"):
        export_pipeline(run["root"] / "run", tmp_path / "other", solver="ddpm")


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_offline_hub_id_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as exc_info:
        load_pipeline("dcae-tests/no-such-sana-pipeline")
    assert "dcae-tests/no-such-sana-pipeline" in _one_line(exc_info)


def test_damaged_folders_are_one_line(run, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(run["folder"], folder)
    shutil.rmtree(folder / "transformer")
    with pytest.raises(UserError) as exc_info:
        load_pipeline(folder)
    assert "missing transformer/" in _one_line(exc_info)
    (folder / "transformer").mkdir()
    shutil.copy(run["folder"] / "transformer" / "config.json", folder / "transformer")
    with pytest.raises(UserError) as exc_info:
        load_pipeline(folder)
    assert "diffusion_pytorch_model" in _one_line(exc_info)
    (folder / "model_index.json").write_text("{not json")
    with pytest.raises(UserError) as exc_info:
        load_pipeline(folder)
    assert "model_index.json" in _one_line(exc_info)
    (folder / "model_index.json").unlink()
    with pytest.raises(UserError) as exc_info:
        load_pipeline(folder)
    assert "model_index.json missing" in _one_line(exc_info)
    with pytest.raises(UserError) as exc_info:
        load_pipeline(tmp_path / "nowhere")
    assert "nowhere" in _one_line(exc_info)
    with pytest.raises(UserError) as exc_info:
        export_pipeline(tmp_path / "no-run", tmp_path / "out")
    _one_line(exc_info)


def test_load_a_diffusers_written_gemma_pipeline(tmp_path):
    """A folder as SANA's releases: written by SanaPipeline.save_pretrained, a (tiny) Gemma-2 encoder, SANA's flow
    DPM-Solver scheduler. Gemma gets 300 tokens and SanaPipeline's default complex human instruction."""
    import inspect

    import transformers
    from test_text_encoders import _gemma

    from dcae.diffusion.t2i.encoders import SANA_INSTRUCTION

    text_dir = _gemma(tmp_path / "gemma", layout="pipeline")
    tiny_autoencoder().save_pretrained(tmp_path / "ae", format="diffusers")
    torch.manual_seed(0)
    transformer = diffusers.SanaTransformer2DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=32, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64, caption_channels=32,
        sample_size=16,
    )  # fmt: skip
    scheduler = diffusers.DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True,
                                                      prediction_type="flow_prediction")  # fmt: skip
    pipe = diffusers.SanaPipeline(
        tokenizer=transformers.AutoTokenizer.from_pretrained(text_dir / "tokenizer"),
        text_encoder=transformers.AutoModel.from_pretrained(text_dir / "text_encoder"),
        vae=diffusers.AutoencoderDC.from_pretrained(tmp_path / "ae"), transformer=transformer, scheduler=scheduler,
    )  # fmt: skip
    pipe.save_pretrained(tmp_path / "pipe")
    p = load_pipeline(tmp_path / "pipe")
    assert (p.solver, p.shift, p.steps, p.guidance_scale, p.resolution) == ("dpm++", 3.0, 20, 4.5, 64)
    assert p.text_encoder.max_tokens == 300 and p.text_encoder.instruction == SANA_INSTRUCTION
    prompts = ["a photo of a cat", "the red dog"]
    instruction = inspect.signature(pipe.__call__).parameters["complex_human_instruction"].default  # __call__'s
    emb, mask, neg, neg_mask = pipe.encode_prompt(prompts, negative_prompt="", device=torch.device("cpu"),
                                                  complex_human_instruction=instruction)  # fmt: skip
    text = p.text_encoder.encode(prompts)
    assert torch.equal(text.mask, mask) and torch.equal(text.null().mask, neg_mask)
    torch.testing.assert_close(text.emb, emb, rtol=0, atol=1e-6)
    torch.testing.assert_close(text.null().emb, neg, rtol=0, atol=1e-6)
    x = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999.0, 400.0])
    with torch.no_grad():
        ref = transformer(x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t).sample
        torch.testing.assert_close(p.transformer(x, t, text), ref, rtol=0, atol=1e-5)
    assert p.scaling_factor == 0.5
