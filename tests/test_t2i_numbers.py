"""Numbers that cannot mean anything are refused in one line, before any work: every numeric option of `dcae t2i
cache / sample / export / eval`, `dcae sample` and `dcae latents` (zero, negative, NaN, inf, astronomically large;
image sizes beyond the machine's memory), and every numeric field of the trainers' configs (through `dcae t2i
train` / `dcae train` overrides). Also: files written by dcae follow the umask, --help shows every default, and a
warning is one `dcae: warning:` line. Parsing and validation only, except the file-mode test's tiny export."""

from __future__ import annotations

import argparse
import json
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dcae import cli
from dcae.cli import build_parser, main
from dcae.diffusion.train import config as diffusion_config
from dcae.errors import UserError
from dcae.train import config as ae_config
from dcae.utils import cliargs, numbers, sizes

HUGE_INT, HUGE_FLOAT = "1e30", "1e300"
BAD_COUNTS = ("0", "-1", "nan", "inf", HUGE_INT, "2.5", "abc")  # for options that are counts (>= 1)
BAD_NONNEGATIVE_INTS = ("-1", "nan", "inf", HUGE_INT, "2.5")
BAD_SEEDS = ("-1", "nan", "inf", HUGE_INT)
BAD_GUIDANCE = ("-1", "nan", "inf", "-inf", HUGE_FLOAT)  # 0 is a valid guidance scale (the unconditional model)
BAD_SHIFTS = ("0", "-1", "nan", "inf", HUGE_FLOAT)

CACHE = ["t2i", "cache", "--data", "d", "--model", "m", "--text-encoder", "t"]
T2I_SAMPLE = ["t2i", "sample", "--ckpt", "c", "--prompt", "a red square"]
EXPORT = ["t2i", "export", "--ckpt", "c"]
EVAL = ["t2i", "eval", "--ckpt", "c", "--prompts", "p.txt"]
SAMPLE = ["sample", "--ckpt", "c"]
LATENTS = ["latents", "--model", "m", "--data", "d"]

CASES = [
    *[(CACHE, "--resolution", v) for v in BAD_COUNTS],
    *[(CACHE, "--patch-size", v) for v in (*BAD_COUNTS, "1000")],
    *[(CACHE, "--max-tokens", v) for v in (*BAD_COUNTS, "1000000")],
    *[(CACHE, "--batch-size", v) for v in BAD_COUNTS],
    *[(CACHE, "--shard-size", v) for v in BAD_COUNTS],
    *[(T2I_SAMPLE, "--cfg", v) for v in BAD_GUIDANCE],
    *[(T2I_SAMPLE, "--shift", v) for v in BAD_SHIFTS],
    *[(T2I_SAMPLE, "--steps", v) for v in BAD_COUNTS],
    *[(T2I_SAMPLE, "--seed", v) for v in BAD_SEEDS],
    *[(T2I_SAMPLE, "--batch-size", v) for v in BAD_COUNTS],
    *[(T2I_SAMPLE, "--per-prompt", v) for v in BAD_COUNTS],
    *[(T2I_SAMPLE, "--grid", v) for v in BAD_NONNEGATIVE_INTS],
    *[(T2I_SAMPLE, "--size", v) for v in ("0x512", "512x-8", "nanx512", "512xinf", "512", "1e30x512", "axb")],
    *[(EXPORT, "--shift", v) for v in BAD_SHIFTS],
    *[(EVAL, "--limit", v) for v in BAD_COUNTS],
    *[(EVAL, "--subset-seed", v) for v in BAD_SEEDS],
    *[(EVAL, "--fid-resolution", v) for v in BAD_COUNTS],
    *[(EVAL, "--cfg", v) for v in BAD_GUIDANCE],
    *[(EVAL, "--shift", v) for v in BAD_SHIFTS],
    *[(EVAL, "--steps", v) for v in BAD_COUNTS],
    *[(EVAL, "--size", v) for v in ("0x512", "nanx512")],
    *[(SAMPLE, "-n", v) for v in BAD_COUNTS],
    *[(SAMPLE, "--cfg", v) for v in BAD_GUIDANCE],
    *[(SAMPLE, "--steps", v) for v in BAD_COUNTS],
    *[(SAMPLE, "--channels", v) for v in BAD_COUNTS],
    *[(SAMPLE, "--eta", v) for v in ("-1", "nan", "inf", "2", HUGE_FLOAT)],
    *[(SAMPLE, "--seed", v) for v in BAD_SEEDS],
    *[(SAMPLE, "--batch-size", v) for v in BAD_COUNTS],
    *[(SAMPLE, "--grid", v) for v in BAD_NONNEGATIVE_INTS],
    *[(SAMPLE, "--guidance-interval", v) for v in ("1,0", "-1,1", "0,2", "0,nan", "inf,1", "0.5", "a,b")],
    *[(LATENTS, "--resolution", v) for v in BAD_COUNTS],
    *[(LATENTS, "--workers", v) for v in (*BAD_NONNEGATIVE_INTS, "100000")],
    *[(LATENTS, "--shard-size", v) for v in BAD_COUNTS],
]


def _one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.startswith("dcae")]
    assert lines, text
    return lines[-1]


@pytest.mark.parametrize("base, option, value", CASES, ids=[f"{b[0]}-{b[1]}-{o}={v}" for b, o, v in CASES])
def test_a_bad_number_is_a_one_line_usage_error_naming_the_option(base, option, value, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main([*base, "-o", str(out), f"{option}={value}"])
    assert exc.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("dcae ") and f"argument {option}" in line, line
    assert "must be" in line or "give" in line or "must not" in line, line
    assert not out.exists()  # nothing done


@pytest.mark.parametrize(
    "base, options",
    [
        (CACHE, ["--resolution", "8192", "--batch-size", "1", "--patch-size", "2", "--max-tokens", "77"]),
        (T2I_SAMPLE, ["--cfg", "0", "--shift", "3", "--size", "512x768", "--grid", "0", "--seed", str(2**32 - 1)]),
        (EXPORT, ["--shift", "0.5"]),
        (EVAL, ["--limit", "1", "--subset-seed", "0", "--fid-resolution", "299", "--cfg", "1"]),
        (SAMPLE, ["-n", "1e3", "--eta", "1", "--guidance-interval", "0.2,0.8", "--grid", "0", "--cfg", "0"]),
        (LATENTS, ["--workers", "0", "--resolution", "256"]),
    ],
)
def test_sensible_numbers_still_parse(base, options):
    args = build_parser().parse_args([*base, "-o", "out", *options])
    assert args.func is not None


def test_the_option_types_and_the_config_fields_share_one_definition_per_kind():
    parser = build_parser()
    by_option = {}
    for path, p in _commands(parser):
        for action in p._actions:
            for option in action.option_strings:
                by_option[(path, option)] = getattr(action.type, "kind", None)
    assert by_option[("dcae t2i sample", "--cfg")] is numbers.GUIDANCE is diffusion_config.NUMBERS["sample.cfg_scale"]
    assert by_option[("dcae sample", "--cfg")] is numbers.GUIDANCE
    assert by_option[("dcae t2i export", "--shift")] is numbers.SHIFT is by_option[("dcae t2i sample", "--shift")]
    assert by_option[("dcae sample", "--seed")] is numbers.SEED is diffusion_config.NUMBERS["seed"]
    assert by_option[("dcae latents", "--workers")] is numbers.WORKERS is ae_config.NUMBERS["num_workers"]
    assert cliargs.positive_int.kind is numbers.COUNT is diffusion_config.NUMBERS["max_steps"]
    # no numeric option is a bare int or float any more
    bare = [(path, o) for (path, o), kind in by_option.items() if kind is None and _is_bare_number(parser, path, o)]
    assert not bare, bare


def _is_bare_number(parser, path: str, option: str) -> bool:
    for p_path, p in _commands(parser):
        if p_path == path:
            return any(option in a.option_strings and a.type in (int, float) for a in p._actions)
    return False


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("dcae",)):
    yield " ".join(path), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def test_numbers_kinds_say_what_is_wrong():
    assert numbers.COUNT.problem(0) == "must be at least 1, got 0"
    assert numbers.COUNT.problem(10**30) == "must be at most 2147483647, got 1e+30"
    assert numbers.POSITIVE.problem(0.0) == "must be greater than 0, got 0"
    assert numbers.PROBABILITY.problem(float("nan")) == "must be in [0, 1], got nan"
    assert numbers.FRACTION.problem(1.0) == "must be in [0, 1), got 1"
    assert numbers.FINITE.problem(float("-inf")) == "must be a finite number, got -inf"
    assert numbers.COUNT.problem(2.5) == "must be a whole number, got 2.5"
    assert numbers.COUNT.problem(True) is not None and numbers.POSITIVE.problem("x") is not None
    assert numbers.COUNT(3) and not numbers.SHIFT(0.0)


# ----------------------------------------------------------------------------- sizes beyond memory
GIB = 2**30


@pytest.fixture
def ram_16gib(monkeypatch):
    """A machine with 16 GiB of RAM and no GPU, whatever this one has."""
    monkeypatch.setattr(sizes, "total_ram_bytes", lambda: 16 * GIB)


@pytest.mark.parametrize(
    "argv, named",
    [
        ([*T2I_SAMPLE, "--size", "100000x100000"], "--size 100000x100000"),
        ([*EVAL, "--size", "100000x100000"], "--size 100000x100000 with --batch-size 4"),
        ([*EVAL, "--fid-resolution", "200000"], "--fid-resolution 200000"),
        ([*CACHE, "--resolution", "100000"], "--resolution 100000 with --batch-size 16"),
        ([*LATENTS, "--resolution", "100000", "--flip"], "--resolution 100000 with --batch-size 32 and --flip"),
        (
            ["sample", "--model", "dc-ae-f32c32-in-1.0-dit-xl-in-512px", "-n", "100000", "--batch-size", "100000"],
            "-n 100000 with --batch-size 100000",
        ),  # fmt: skip
        (["eval", "--model", "m", "--data", "d", "--resolution", "100000"], "--resolution 100000 with --batch-size 8"),
        (["fid", "a", "b", "--resolution", "100000"], "--resolution 100000 with --batch-size 16"),
    ],
)
def test_sizes_beyond_memory_are_refused_before_any_work(argv, named, ram_16gib, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main([*argv, *(["-o", str(out)] if argv[0] not in ("eval", "fid") else []), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"dcae: error: {named}: ") and "needs at least" in err and "16.0 GiB of RAM" in err, err
    assert not out.exists()


def test_sizes_up_to_8k_pass_the_memory_check(ram_16gib, tmp_path, capsys):
    sizes.check_images_fit(8192, 8192, 4, "cpu", "--size 8192x8192")  # 4 x 8K: 6 GiB
    sizes.check_images_fit(8192, 8192, 1, None, "--resolution 8192")
    # through the command: the size passes, the next check (the missing checkpoint) is what stops it
    rc = main([*T2I_SAMPLE, "--size", "8192x8192", "--device", "cpu", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--ckpt c does not exist" in err, err
    with pytest.raises(UserError, match="lower --batch-size"):
        sizes.check_images_fit(8192, 8192, 64, "cpu", "--size 8192x8192")


def test_on_a_cuda_device_the_gpu_memory_counts_too(ram_16gib, monkeypatch):
    """(No GPU needed: torch.cuda answers as one 8 GiB card would.)"""

    class Card:
        name, total_memory = "Tiny GPU", 8 * GIB

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Card())
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert sizes.device_memory("cpu") == [("RAM", 16 * GIB)]
    assert sizes.device_memory("auto")[1] == ("GPU memory of cuda:0 (Tiny GPU)", 8 * GIB)
    assert sizes.device_memory("cuda:1")[1][0].startswith("GPU memory of cuda:1")
    sizes.check_images_fit(8192, 8192, 4, "cuda", "--size 8192x8192")  # 6 GiB fits the card
    with pytest.raises(UserError, match=r"more than this machine's 8\.0 GiB of GPU memory of cuda:0 \(Tiny GPU\)"):
        sizes.check_images_fit(8192, 8192, 8, "cuda", "--size 8192x8192")  # 12 GiB: fits the RAM, not the card
    sizes.check_images_fit(8192, 8192, 8, "cpu", "--size 8192x8192")


# ----------------------------------------------------------------------------- config fields
DIFFUSION_CASES = [
    ("optim.lr", ["0", "-1e-4", ".nan", "nan", ".inf", "1e400"]),
    ("optim.weight_decay", ["-0.1", ".nan", ".inf"]),
    ("optim.betas", ["[0.9,1.0]", "[-0.1,0.9]", "[.nan,0.9]", "[0.9]"]),
    ("optim.warmup_steps", ["-1", "1e30"]),
    ("optim.min_lr_ratio", ["-0.1", "1.5", ".nan"]),
    ("optim.grad_clip", ["-1", ".inf"]),
    ("ema_decay", ["1", "-0.5", ".nan"]),
    ("diffusion.cond_dropout", ["-0.1", "1.1", ".nan"]),
    ("sample.num", ["0", "-1", "100000"]),
    ("sample.steps", ["0", "1e30"]),
    ("sample.every", ["-1"]),
    ("sample.cfg_scale", ["-1", ".nan", ".inf", "1e300"]),
    ("sample.seed", ["-1", "1e30"]),
    ("seed", ["-1", "1e30"]),
    ("batch_size", ["0", "-4", "1e30"]),
    ("grad_accum", ["0"]),
    ("max_steps", ["0", "1e30"]),
    ("num_workers", ["-1", "100000"]),
    ("checkpoint.every", ["0"]),
    ("checkpoint.keep_last", ["0"]),
    ("log.every", ["0"]),
    ("model.overrides.depth", ["0", "-2", "1000000"]),
    ("model.overrides.mlp_ratio", ["0", ".inf", ".nan"]),
]


@pytest.mark.parametrize(
    "field, value", [(f, v) for f, vs in DIFFUSION_CASES for v in vs], ids=lambda x: str(x).replace(".", "_")
)
def test_t2i_train_refuses_each_bad_config_number_in_one_line_naming_the_field(field, value, capsys):
    rc = main(["t2i", "train", "data=latents", f"{field}={value}", "--print-config"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("dcae: error: invalid training config: ") and field in err and "must be" in err, err


def test_all_config_problems_are_listed_at_once(capsys):
    rc = main(["t2i", "train", "data=latents", "optim.lr=0", "ema_decay=.nan", "sample.num=0", "--print-config"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    for field in ("optim.lr must be", "ema_decay must be", "sample.num must be"):
        assert field in err


@pytest.mark.parametrize(
    "field, value",
    [
        ("phase1.optim.lr", ".nan"),
        ("phase1.optim.eps", "0"),
        ("phase2.optim.betas", "[0.5,1]"),
        ("phase1.steps", "1e30"),
        ("phase1.max_minutes", "-1"),
        ("phase3.loss.gan_weight", "-1"),
        ("phase3.disc.lr", ".inf"),
        ("data.hflip", "1.5"),
        ("data.scale_range", "[0,1]"),
        ("val.resolutions", "[0]"),
        ("ema_decay", ".nan"),
        ("seed", "-1"),
    ],
)
def test_autoencoder_train_refuses_bad_config_numbers_too(field, value, capsys):
    rc = main(["train", "tiny", f"{field}={value}", "--print-config"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and field in err and "must be" in err, err


def test_missing_data_names_both_cache_commands(capsys):
    assert main(["t2i", "train", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "`dcae latents` or `dcae t2i cache`" in err


def test_export_with_shift_zero_is_refused_before_writing(tmp_path):
    from dcae.diffusion.t2i.pipeline import export_pipeline

    with pytest.raises(UserError, match="shift must be greater than 0"):
        export_pipeline(tmp_path / "no-run", tmp_path / "pipe", shift=0.0)
    assert not (tmp_path / "pipe").exists()


# ----------------------------------------------------------------------------- warnings
def test_a_warning_is_one_dcae_line_without_source(capsys):
    before = warnings.showwarning, warnings.formatwarning
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        rc = main(["t2i", "train", "data=latents", "max_steps=5", "optim.warmup_steps=10", "--print-config"])
    assert rc == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "dcae: warning: optim.warmup_steps=10 >= max_steps=5: the whole run is learning-rate warm-up (the rate "
        "never reaches optim.lr=0.0001)"
    ]
    assert (warnings.showwarning, warnings.formatwarning) == before  # main gives Python's back
    assert cli.format_warning("cut\n  here", DeprecationWarning) == "dcae: warning: DeprecationWarning: cut here\n"
    assert cli.format_warning("plain", UserWarning) == "dcae: warning: plain\n"


def test_a_warm_up_within_the_run_is_not_warned(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diffusion_config.load_config(None, ["data=x", "max_steps=10", "optim.warmup_steps=9"])


# ----------------------------------------------------------------------------- --help
def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


def _option_help(text: str, option: str) -> str:
    """The help block of `option` in an argparse --help text (its lines up to the next option)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(option))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if line.strip().startswith("-"):
            break
        block.append(line)
    return " ".join(" ".join(block).split())


def test_help_shows_the_defaults(capsys):
    text = _help(["t2i", "cache"], capsys)
    assert "(default: 512)" in _option_help(text, "--resolution")
    assert "(default: 1024)" in _option_help(text, "--shard-size")
    assert _option_help(text, "--batch-size").count("default") == 1  # cliargs' own "(default: 16)", not twice
    text = _help(["sample"], capsys)
    assert "(default: 64)" in _option_help(text, "--grid") and "(default: 0,1)" in text
    text = _help(["t2i", "sample"], capsys)
    assert "None" not in text and "(default: 16)" in _option_help(text, "--grid")
    assert "(default: 1)" in _option_help(_help(["bench", "ae"], capsys), "--warmup")
    assert "(default: 512)" in _option_help(_help(["bench", "diffusion"], capsys), "--resolution")
    train = _help(["train"], capsys)
    assert "(default: all)" in _option_help(train, "--phase")


def test_every_option_with_a_value_shows_its_default_once():
    problems = []
    for path, parser in _commands(build_parser()):
        formatter = parser._get_formatter()
        assert isinstance(formatter, cliargs.DefaultsHelpFormatter), path
        for action in parser._actions:
            if not action.option_strings or action.help is argparse.SUPPRESS or action.nargs == 0:
                continue
            text = formatter._expand_help(action) if action.help else ""
            if action.default is not None and "default" not in text:
                problems.append(f"{path} {action.option_strings[-1]}: no default in {text!r}")
            if text.count("(default") > 1 or "(default: None)" in text:
                problems.append(f"{path} {action.option_strings[-1]}: {text!r}")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- file modes
@pytest.fixture
def umask():
    """Set the process's umask inside a test; the one before comes back."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_to(mask: int) -> None:
        os.umask(mask)

    yield set_to
    os.umask(saved)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask(mask, mode, umask, tmp_path):
    from dcae.runtime.checkpoint import save_checkpoint
    from dcae.utils.io import atomic_save_safetensors, atomic_write_json, atomic_write_text

    umask(mask)
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_text(tmp_path / "b.txt", "x")
    atomic_write_json(tmp_path / "a.json", {"x": 2})  # a replaced file too
    atomic_save_safetensors({"w": torch.zeros(2)}, tmp_path / "c.safetensors")
    save_checkpoint({"step": 1, "w": torch.zeros(2)}, tmp_path / "ckpt" / "step_0000001.pt", keep_last=2)
    found = _modes(tmp_path)
    assert found == dict.fromkeys(["a.json", "b.txt", "c.safetensors", "ckpt/step_0000001.pt"], mode), found


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory) -> Path:
    """A 1-step SANA-tiny run on 4 captioned 32 x 32 images (tiny f4 autoencoder, the bundled MiniLM), trained
    under umask 022."""
    from PIL import Image
    from test_diffusion_latents import tiny_autoencoder

    from dcae.diffusion.t2i.cache import extract_text_latents
    from dcae.diffusion.t2i.encoders import TextEncoder, all_minilm_l6_v2
    from dcae.diffusion.train.loop import train

    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("modes")
    (root / "data").mkdir()
    for i, c in enumerate([(220, 30, 30), (30, 30, 220)] * 2):
        Image.fromarray(np.full((32, 32, 3), c, np.uint8)).save(root / "data" / f"{i}.png")
        (root / "data" / f"{i}.txt").write_text(f"square {i % 2}")
    ae = tiny_autoencoder()
    ae.save_pretrained(root / "ae")
    encoder = TextEncoder.from_pretrained(all_minilm_l6_v2(), max_tokens=8)
    extract_text_latents(ae, encoder, root / "data", root / "cache", model_name=str(root / "ae"), resolution=32,
                         progress=False)  # fmt: skip
    overrides = [f"data={root / 'cache'}", f"out_dir={root / 'run'}", "model.name=SANA-tiny", "batch_size=2",
                 "max_steps=1", "mixed_precision=no", "num_workers=0", "sample.every=0", "sample.decode=false",
                 "sample.num=1", "sample.steps=1", "log.tensorboard=false"]  # fmt: skip
    saved = os.umask(0o022)
    try:
        train(diffusion_config.load_config(None, overrides), progress=False)
    finally:
        os.umask(saved)
    return root / "run"


def test_a_training_run_and_an_exported_pipeline_follow_the_umask(t2i_run, umask, tmp_path, capsys):
    pytest.importorskip("diffusers")
    run_files = _modes(t2i_run)  # written under umask 022: checkpoints, config.yaml, log.csv, loss.png, samples
    assert any(name.endswith(".pt") for name in run_files) and "config.yaml" in run_files
    assert set(run_files.values()) == {0o644}, run_files
    for mask, mode in ((0o022, 0o644), (0o077, 0o600)):
        umask(mask)
        out = tmp_path / f"pipe{mask:o}"
        assert main(["t2i", "export", "--ckpt", str(t2i_run), "-o", str(out)]) == 0, capsys.readouterr().err
        found = _modes(out)
        assert {"model_index.json", "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
                "scheduler/scheduler_config.json"} <= set(found)  # fmt: skip
        assert set(found.values()) == {mode}, found
    assert json.loads((tmp_path / "pipe22" / "model_index.json").read_text())["_class_name"] == "SanaPipeline"
