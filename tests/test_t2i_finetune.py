"""`dcae t2i train` from a pretrained model (finetune.pretrained): full fine-tuning and LoRA through peft, exact
resume, only the adapters trained, and a model of other latents or another text encoder refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_diffusion_latents import tiny_autoencoder
from test_t2i import _cli, _overrides, _same, _state, cache  # noqa: F401 (cache: the module fixture)

from dcae.diffusion.t2i.encoders import all_minilm_l6_v2
from dcae.diffusion.train.checkpoint import list_checkpoints, load_checkpoint
from dcae.diffusion.train.config import load_config
from dcae.diffusion.train.loop import train
from dcae.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
pytest.importorskip("peft")
LORA = {"finetune.lora.rank": 4, "finetune.lora.alpha": 8}


@pytest.fixture(scope="module")
def base(cache, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("base") / "run"
    train(load_config(None, _overrides(cache, out, max_steps=2)), progress=False)
    return out


def _ckpt(out):
    return torch.load(list_checkpoints(out)[-1], weights_only=True)


def test_full_finetune_starts_from_the_pretrained_ema_weights(cache, base, tmp_path):  # noqa: F811
    pretrained, _, _ = load_checkpoint(base)
    out = tmp_path / "ft"
    # lr tiny and one step: the weights move by at most lr per step (Adam), so they are the pretrained ones
    result = train(
        load_config(None, _overrides(cache, out, max_steps=1, **{"finetune.pretrained": base, "optim.lr": "1e-12"})),
        progress=False,
    )
    assert np.isfinite(result["loss"])
    state = _ckpt(out)["model"]
    for k, v in pretrained.state_dict().items():
        torch.testing.assert_close(state[k], v, atol=1e-9, rtol=0)
    fresh = train(load_config(None, _overrides(cache, tmp_path / "fresh", max_steps=1, **{"optim.lr": "1e-12"})),
                  progress=False)  # fmt: skip
    assert fresh["checkpoint"] and not torch.equal(_ckpt(tmp_path / "fresh")["model"]["proj_out.weight"],
                                                   pretrained.state_dict()["proj_out.weight"])  # fmt: skip


def test_lora_trains_only_the_adapters_and_resumes_exactly(cache, base, tmp_path):  # noqa: F811
    kw = {"finetune.pretrained": base, **LORA}
    train(load_config(None, _overrides(cache, tmp_path / "full", **kw)), progress=False)
    train(load_config(None, _overrides(cache, tmp_path / "split", max_steps=2, **kw)), progress=False)
    train(load_config(None, _overrides(cache, tmp_path / "split", **kw)), progress=False)
    assert _same(_state(tmp_path / "full"), _state(tmp_path / "split"))
    pretrained = load_checkpoint(base)[0].state_dict()
    ck = _ckpt(tmp_path / "full")
    lora_keys = [k for k in ck["model"] if ".lora_" in k]
    assert lora_keys and all(".attn" in k for k in lora_keys)
    assert len(lora_keys) == 2 * 4 * 2 * 4  # A and B, 4 targets, 2 attentions, 4 layers
    for k, v in ck["model"].items():  # every base weight is the pretrained one
        if ".lora_" not in k:
            assert torch.equal(v, pretrained[k.replace(".base_layer", "")]), k
    moved = [k for k in lora_keys if "lora_B" in k and ck["model"][k].abs().max() > 0]
    assert moved  # B starts at zero (peft's init) and trained
    trainable = {k for k, p in ck["optimizer"]["state"].items()}
    assert len(trainable) == len(lora_keys)  # Adam holds state for the adapters only
    model, _, _ = load_checkpoint(tmp_path / "full")  # rebuilt from model_args["lora"]
    assert any(".lora_A." in n for n, _ in model.named_parameters())


def test_lora_target_that_matches_nothing_is_one_line(cache, base, tmp_path):  # noqa: F811
    kw = {"finetune.pretrained": base, "finetune.lora.rank": 2, "finetune.lora.target_modules": "[to_qq]"}
    with pytest.raises(UserError, match="to_qq"):
        train(load_config(None, _overrides(cache, tmp_path / "x", **kw)), progress=False)


def test_pretrained_of_other_latents_is_refused_by_name(cache, base, tmp_path):  # noqa: F811
    """A cache made with other autoencoder weights: the run names both autoencoders."""
    root = cache.parent
    tiny_autoencoder(seed=1).save_pretrained(tmp_path / "ae1")
    rc, err = _cli("t2i", "cache", "--data", root / "data", "--model", tmp_path / "ae1", "--text-encoder",
                   all_minilm_l6_v2(), "-o", tmp_path / "cache1", "--resolution", 32, "--max-tokens", 16)  # fmt: skip
    assert rc == 0, err
    rc, err = _cli("t2i", "train", *_overrides(tmp_path / "cache1", tmp_path / "x",
                                                **{"finetune.pretrained": base}))  # fmt: skip
    assert rc != 0
    line = err.strip().splitlines()[-1]
    assert "autoencoder" in line and str(tmp_path / "ae1") in line and "finetune.pretrained" in line


@pytest.mark.slow
def test_lora_under_ddp_equals_one_process_with_grad_accum(cache, base, tmp_path):  # noqa: F811
    """`torchrun --nproc_per_node 2 dcae t2i train` with LoRA (frozen base weights under DDP) and one process
    with grad_accum=2 train the same adapters."""
    import subprocess

    from test_t2i import ENV
    from test_train_helpers import torchrun_dcae

    kw = {"finetune.pretrained": base, **LORA, "batch_size": 4, "max_steps": 2}
    train(load_config(None, _overrides(cache, tmp_path / "one", grad_accum=2, **kw)), progress=False)
    proc = subprocess.run([*torchrun_dcae(), "t2i", "train", "--quiet", *_overrides(cache, tmp_path / "two", **kw)],
                          env=ENV, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = _ckpt(tmp_path / "one")["model"], _ckpt(tmp_path / "two")["model"]
    lora_keys = [k for k in one if ".lora_" in k]
    assert lora_keys and any(one[k].abs().max() > 0 for k in lora_keys if "lora_B" in k)
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-4, msg=k)
