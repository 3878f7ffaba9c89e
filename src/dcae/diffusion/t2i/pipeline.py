"""dcae <-> diffusers SANA pipelines: `export_pipeline` writes one of our text-to-image checkpoints as a
`diffusers.SanaPipeline` folder; `load_pipeline` reads such a folder (ours or a released
`Efficient-Large-Model/Sana_*_diffusers`) into our models for `dcae t2i sample --model`.

An exported folder: transformer/ (the EMA weights, `nets.sana.save_diffusers`), vae/ (the checkpoint's autoencoder
in AutoencoderDC's format, its `scaling_factor` set to the one the latents were scaled with: SanaPipeline decodes
`latents / vae.config.scaling_factor`, as `cache.decode_scaled`), text_encoder/ + tokenizer/ (the cache's
encoder, its files copied), scheduler/ and model_index.json (written last, so a folder without it is an
interrupted export), each file written atomically.

What diffusers accepts: `SanaPipeline.from_pretrained(folder)` loads any transformers encoder that model_index.json
names (BERT, T5, ...): it only logs "Expected types for text_encoder: (Gemma2PreTrainedModel,), got ...". Call it
with `complex_human_instruction=None` and `max_sequence_length=` the cache's token count (model_index.json's
`_dcae.max_tokens`): then its prompt path gives our encoder's embeddings (tested for BERT; it lower-cases prompts,
as an uncased tokenizer does anyway); or pass `prompt_embeds` etc. from our `TextEncoder`. A transformer whose
`sample_size` is not 16, 32, 64 or 128 (latent pixels) needs `use_resolution_binning=False`; height and width must
be multiples of 32. `dcae t2i sample` (--model of such a folder, or --ckpt with the same solver and shift)
samples it as SanaPipeline.__call__ does with that scheduler (dcae.diffusion.t2i.sana_call; image i seeded
seed + i), so diffusers called with `generator=torch.Generator("cpu").manual_seed(seed)`, those arguments and
`use_resolution_binning=False` gives the same picture. (Our own `sample(..., steps=N, shift=s)`, used for ddim,
has sigmas linspace(1, 0, N + 1) shifted: pass `sigmas=numpy.linspace(1, 0, N + 1)[:-1]` to diffusers for it.)

A pipeline not exported by dcae (no `_dcae` record) is sampled by `dcae t2i sample --model` as SanaPipeline.__call__
(or SanaSprintPipeline.__call__) samples it, binning and instruction included (dcae.diffusion.t2i.sana_call: its
own scheduler, binning, seeding); only `SanaPipeline` and `SanaSprintPipeline` folders load (other Sana* pipelines
are refused by name).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from dcae.diffusion.cache import load_autoencoder
from dcae.diffusion.nets.sana import SanaTransformer, from_diffusers, save_diffusers
from dcae.diffusion.processes.flow import FlowMatching
from dcae.diffusion.solvers import EXPORT_SOLVERS, SCHEDULERS
from dcae.diffusion.t2i.encoders import FAMILIES, SANA_INSTRUCTION, TextEncoder, _folders, _model_type, _transformers
from dcae.diffusion.train.checkpoint import load_checkpoint
from dcae.diffusion.train.lora import merge_lora
from dcae.errors import MissingInputError, UserError, brief
from dcae.models import DCAE
from dcae.models.weights import _diffusers_version, hub_snapshot
from dcae.utils.devices import resolve_dtype
from dcae.utils.io import atomic_path, atomic_write_json
from dcae.utils.numbers import SHIFT

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
SANA_STEPS, SANA_GUIDANCE = 20, 4.5  # SanaPipeline.__call__'s defaults
SPRINT_STEPS = 2  # SanaSprintPipeline.__call__'s (guidance 4.5 too)
SANA_MAX_TOKENS = 300  # SanaPipeline's max_sequence_length for Gemma
_MODEL_FILES = ("config.json", "generation_config.json", "model*.safetensors*")
_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                    "spiece.model", "sentencepiece.bpe.model", "chat_template.*")  # fmt: skip


@dataclass
class SanaPipelineModels:
    """What `load_pipeline` gives: the models and the sampling settings the pipeline records."""

    transformer: torch.nn.Module  # dcae.diffusion.nets.sana.SanaTransformer, eval mode
    text_encoder: object  # dcae.diffusion.t2i.encoders.TextEncoder
    autoencoder: torch.nn.Module  # dcae.models.DCAE, eval mode
    scaling_factor: float  # vae.config.scaling_factor: generated latents are divided by it before decoding
    shift: float  # the scheduler's flow shift
    solver: str  # our solver nearest to the scheduler: euler, heun or dpm++
    steps: int  # default steps: what our export recorded, else SanaPipeline's default
    guidance_scale: float
    resolution: int | None  # the training resolution (ours), else transformer sample_size x the vae's compression
    source: str
    scheduler_config: dict = dataclasses.field(default_factory=dict)  # scheduler/scheduler_config.json
    scheduler_path: Path | None = None
    exported: bool = False  # written by `dcae t2i export` (model_index.json's _dcae record)
    instruction: bool = False  # the complex human instruction is prepended to prompts
    sprint: bool = False  # a SanaSprintPipeline (SCMScheduler, TrigFlow, embedded guidance)


# ----------------------------------------------------------------------------- export
def _matching(folder: Path, patterns) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns))


def _copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _encoder_classes(model_dir: Path, tok_dir: Path) -> tuple[str, str]:
    """The transformers class names diffusers loads text_encoder/ and tokenizer/ with."""

    transformers = _transformers()
    family = FAMILIES.get(_model_type(model_dir))
    if family is None:
        raise UserError(f"{model_dir}: not a text encoder dcae knows")
    model_class = family.model_class
    if model_class == "AutoModel":
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        model_class = MODEL_MAPPING[type(transformers.AutoConfig.from_pretrained(model_dir))].__name__
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except Exception as exc:
        raise UserError(f"{tok_dir}: no usable tokenizer ({brief(exc, 200)})") from exc
    return model_class, type(tokenizer).__name__


def _scheduler_config(solver: str, shift: float) -> dict:

    name = next((k for k, (s, _) in SCHEDULERS.items() if s == solver), None)
    if name is None:
        raise UserError(f"solver {solver!r} has no diffusers scheduler here; choose {', '.join(EXPORT_SOLVERS)}")
    config = {"_class_name": name, "_diffusers_version": _diffusers_version(), "num_train_timesteps": 1000}
    if solver == "dpm++":  # as SANA's released pipelines
        return config | {"flow_shift": shift, "use_flow_sigmas": True, "prediction_type": "flow_prediction",
                         "algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"}  # fmt: skip
    return config | {"shift": shift}


def export_pipeline(checkpoint_or_run: str | Path, folder: str | Path, overwrite: bool = False, *,
                    solver: str = "euler", shift: float = 1.0, use_ema: bool = True) -> Path:  # fmt: skip
    """Write a diffusers SanaPipeline folder from one of our text-to-image checkpoints (a .pt or a run folder:
    its newest). The scheduler is `solver`'s (euler: FlowMatchEulerDiscreteScheduler, as `dcae t2i sample`'s
    default; heun; dpm++: SANA's flow DPMSolverMultistepScheduler) with flow `shift`. An existing non-empty folder
    is refused unless `overwrite`; then the components' stale files go."""

    problem = SHIFT.problem(shift)
    if problem is not None:  # a scheduler with shift 0 samples nothing but noise; refused before anything is written
        raise UserError(f"shift {problem}: the flow shift of the time grid is > 0 (1: none)")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file; a pipeline is written as a folder")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise UserError(f"{folder} already exists (pass overwrite=True / --overwrite to replace it)")
    scheduler = _scheduler_config(solver, float(shift))
    model, process, meta = load_checkpoint(checkpoint_or_run, use_ema=use_ema)
    if not isinstance(model, SanaTransformer) or not isinstance(process, FlowMatching):
        what = meta["model_args"].get("name")
        raise UserError(f"{meta['path']}: a SanaPipeline needs a SANA flow-matching text-to-image model, not {what}")
    if meta["model_args"].get("lora"):  # a LoRA run: the adapters folded into the weights (peft's merge)
        model = merge_lora(model)
    lat = meta["latents"]
    if lat.kind != "text" or not lat.text_encoder:
        raise UserError(f"{meta['path']}: the checkpoint records no text encoder of its latents")
    model_dir, tok_dir = _folders(lat.text_encoder)
    classes = _encoder_classes(model_dir, tok_dir)

    written: set[Path] = set()
    folder.mkdir(parents=True, exist_ok=True)
    save_diffusers(model, folder / "transformer", overwrite=True)
    written |= {folder / "transformer" / n for n in ("config.json", "diffusion_pytorch_model.safetensors")}
    ae = load_autoencoder(lat)
    ae.config = dataclasses.replace(ae.config, scaling_factor=lat.scaling_factor)  # a copy: the zoo's
    ae.save_pretrained(folder / "vae", format="diffusers", overwrite=True)
    written |= {folder / "vae" / n for n in ("config.json", "diffusion_pytorch_model.safetensors")}
    weights = _matching(model_dir, _MODEL_FILES)
    if not any(p.name.endswith(".safetensors") for p in weights):
        weights += _matching(model_dir, ("pytorch_model*.bin*",))
    for sub, files in (("text_encoder", weights), ("tokenizer", _matching(tok_dir, _TOKENIZER_FILES))):
        for src in files:
            _copy(src, folder / sub / src.name)
            written.add(folder / sub / src.name)
    atomic_write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
    written.add(folder / "scheduler" / "scheduler_config.json")
    for sub in COMPONENTS:  # leftovers of an overwritten pipeline (e.g. old shards) would shadow the new files
        for p in (folder / sub).iterdir():
            if p.is_file() and p not in written:
                p.unlink()
    sample = meta["config"].get("sample", {})
    record = {"checkpoint": meta["path"], "step": meta["step"], "ema": use_ema, "autoencoder": lat.autoencoder,
              "text_encoder": lat.text_encoder, "max_tokens": lat.conditioning.max_tokens, "instruction": None,
              "resolution": lat.resolution, "solver": solver, "shift": float(shift),
              "steps": sample.get("steps"), "guidance_scale": sample.get("cfg_scale")}  # fmt: skip
    atomic_write_json(folder / "model_index.json", {
        "_class_name": "SanaPipeline", "_diffusers_version": _diffusers_version(), "_dcae": record,
        "scheduler": ["diffusers", scheduler["_class_name"]], "text_encoder": ["transformers", classes[0]],
        "tokenizer": ["transformers", classes[1]], "transformer": ["diffusers", "SanaTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderDC"],
    })  # fmt: skip
    return folder


# ----------------------------------------------------------------------------- loading
def _hub_patterns(variant: str | None) -> list[str]:
    weights = f"*.{variant}*" if variant else "*.safetensors"
    return ["model_index.json", "scheduler/*", "tokenizer/*", "*/config.json", "*/*.safetensors.index*.json",
            f"transformer/{weights}", "vae/*.safetensors", "text_encoder/*.safetensors"]  # fmt: skip


def _pipeline_folder(source: str | Path, variant: str | None) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path} is a file; a SANA pipeline is a folder (model_index.json and its components)")
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) and not str(source).startswith("."):
        return hub_snapshot(str(source), allow_patterns=_hub_patterns(variant))
    raise MissingInputError(f"{source}: no such SANA pipeline folder (nor a Hugging Face Hub id: owner/name)")


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path.parent}: not a diffusers pipeline ({what} missing)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable {what} ({brief(exc, 120)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} is not a JSON object")
    return data


def _scheduler_settings(folder: Path, sprint: bool = False) -> tuple[str, float, dict]:
    path = folder / "scheduler" / "scheduler_config.json"
    config = _read_json(path, "scheduler_config.json")
    name = config.get("_class_name")
    if sprint or name == "SCMScheduler":
        if not (sprint and name == "SCMScheduler"):
            raise UserError(f"{path}: a SanaSprintPipeline samples with SCMScheduler only, this one is {name!r}"
                            if sprint else f"{path}: SCMScheduler belongs to a SanaSprintPipeline")  # fmt: skip
        return "scm", 1.0, config
    if name not in SCHEDULERS:
        raise UserError(f"{path}: scheduler {name!r} is not one dcae samples with ({', '.join(SCHEDULERS)})")
    solver, key = SCHEDULERS[name]
    if name == "DPMSolverMultistepScheduler" and not (config.get("use_flow_sigmas") and
                                                      config.get("prediction_type") == "flow_prediction"):  # fmt: skip
        raise UserError(f"{path}: a DPMSolverMultistepScheduler without flow sigmas is not a flow-matching sampler")
    if config.get("use_dynamic_shifting"):
        raise UserError(f"{path}: use_dynamic_shifting needs a mu, which SanaPipeline never passes (diffusers "
                        "fails on it too); set it false")  # fmt: skip
    shift = config.get(key, 1.0)
    if isinstance(shift, bool) or not isinstance(shift, int | float) or shift <= 0:
        raise UserError(f"{path}: {key} = {shift!r}, expected a positive number")
    return solver, float(shift), config


def load_pipeline(source: str | Path, *, device: str | torch.device = "cpu", dtype: str = "fp32",
                  variant: str | None = None, instruction: bool | None = None) -> SanaPipelineModels:  # fmt: skip
    """Our models from a diffusers SANA pipeline: a local folder or a Hub id (downloaded once: model_index.json,
    the scheduler, tokenizer, configs and safetensors weights; offline and not cached: one line). `dtype` of the
    transformer and the text encoder (fp32, bf16, fp16); `variant`: the transformer's weight files, e.g. 'bf16'
    (the text encoder's and the vae's are read without variant).
    `instruction`: prepend SanaPipeline's complex human instruction to Gemma prompts, as its __call__ does by
    default (None: yes for a Gemma pipeline not exported by dcae). Every failure is one UserError line."""

    folder = _pipeline_folder(source, variant)
    index = _read_json(folder / "model_index.json", "model_index.json")
    name = index.get("_class_name")
    if not str(name).startswith("Sana"):
        raise UserError(f"{folder}: model_index.json describes a {name}, not a SANA pipeline")
    if name not in ("SanaPipeline", "SanaSprintPipeline"):  # SanaPAGPipeline, SanaControlNetPipeline, ...
        raise UserError(f"{folder}: a {name} is not supported; dcae samples SanaPipeline and SanaSprintPipeline "
                        "folders")  # fmt: skip
    sprint = name == "SanaSprintPipeline"
    missing = [f"{c}/" for c in COMPONENTS if not (folder / c).is_dir() or not any((folder / c).iterdir())]
    if missing:
        raise UserError(f"{folder}: incomplete SANA pipeline, missing {' and '.join(missing)}")
    record = index.get("_dcae") if isinstance(index.get("_dcae"), dict) else {}
    solver, shift, scheduler_config = _scheduler_settings(folder, sprint)
    family = FAMILIES.get(_model_type(folder / "text_encoder"))
    gemma = family is not None and family.name == "gemma"
    max_tokens = record.get("max_tokens") or (SANA_MAX_TOKENS if gemma else None)
    if instruction is None:
        instruction = gemma and not record
    transformer = from_diffusers(folder / "transformer", max_tokens=max_tokens or SANA_MAX_TOKENS,
                                 dtype=resolve_dtype(dtype), variant=variant)  # fmt: skip
    encoder = TextEncoder.from_pretrained(folder, dtype=dtype, device=device, max_tokens=max_tokens,
                                          instruction=SANA_INSTRUCTION if instruction else None)  # fmt: skip
    autoencoder = DCAE.from_pretrained(folder / "vae")
    caption_channels = transformer.config["caption_channels"]
    if encoder.width != caption_channels:
        raise UserError(f"{folder}: text_encoder/ gives {encoder.width}-wide tokens, the transformer takes "
                        f"{caption_channels}")  # fmt: skip
    if autoencoder.latent_channels != transformer.in_channels:
        raise UserError(f"{folder}: vae/ has {autoencoder.latent_channels} latent channels, the transformer takes "
                        f"{transformer.in_channels}")  # fmt: skip
    if transformer.conditioning.max_tokens != encoder.max_tokens:  # the encoder's positions end earlier
        transformer.conditioning = dataclasses.replace(transformer.conditioning, max_tokens=encoder.max_tokens)
    resolution = record.get("resolution") or transformer.sample_size * autoencoder.spatial_compression
    return SanaPipelineModels(
        transformer=transformer.to(device).eval(), text_encoder=encoder, autoencoder=autoencoder.to(device).eval(),
        scaling_factor=float(autoencoder.scaling_factor), shift=shift, solver=solver,
        steps=int(record.get("steps") or (SPRINT_STEPS if sprint else SANA_STEPS)),
        guidance_scale=float(record.get("guidance_scale") or SANA_GUIDANCE),
        resolution=int(resolution), source=str(source), scheduler_config=scheduler_config,
        scheduler_path=folder / "scheduler" / "scheduler_config.json", exported=bool(record),
        instruction=bool(instruction), sprint=sprint,
    )  # fmt: skip
