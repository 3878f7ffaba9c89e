"""Paths that cannot be used: outputs that exist as the other kind, cannot be created or cannot be written,
and inputs that are links to missing files. Every command says so in one `dcae: error:` line naming the
path, exit status 2, before any model is loaded (the loaders are replaced by ones that fail the test),
and nothing already there is changed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from dcae.cli import main
from dcae.errors import MissingInputError, OutputExistsError, PathError
from dcae.utils.io import check_input, check_output_dir, check_output_file


def _proc_is_unwritable() -> bool:
    try:
        fd, tmp = tempfile.mkstemp(dir="/proc")
    except OSError:
        return True
    os.close(fd)
    os.unlink(tmp)
    return False


UNWRITABLE = Path("/proc/dcae-test-paths")  # /proc takes no new files, not even from root
needs_proc = pytest.mark.skipif(not _proc_is_unwritable(), reason="/proc is missing or takes new files here")


@pytest.fixture()
def paths(tmp_path) -> dict[str, Path]:
    file = tmp_path / "file.txt"
    file.write_text("keep me")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "old.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "missing")
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"not read")
    return {"file": file, "folder": folder, "link": link, "data": data, "tmp": tmp_path}


@pytest.fixture()
def no_loading(monkeypatch):
    """Every model, network, trainer and benchmark entry point fails the test when called."""
    import dcae.diffusion.bench
    import dcae.diffusion.c2i.released.models
    import dcae.diffusion.train.checkpoint
    import dcae.diffusion.train.loop
    import dcae.experiments.common
    import dcae.metrics.commands
    import dcae.metrics.reconstruction
    import dcae.models.bench
    import dcae.models.demo
    import dcae.train.trainer
    from dcae.models import DCAE

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded (or work started) before the paths were checked")

    monkeypatch.setattr(DCAE, "from_pretrained", loaded)
    monkeypatch.setattr(DCAE, "from_config", loaded)
    for module, name in [
        (dcae.diffusion.train.checkpoint, "load_checkpoint"),
        (dcae.diffusion.c2i.released.models, "load_released"),
        (dcae.metrics.reconstruction, "load_autoencoder"),
        (dcae.metrics.commands, "_build_inception"),
        (dcae.metrics.commands, "_build_lpips"),
        (dcae.train.trainer, "train"),
        (dcae.diffusion.train.loop, "train"),
        (dcae.models.demo, "run_demo"),
        (dcae.experiments.common, "make_protocol"),
        (dcae.models.bench, "bench_model"),
        (dcae.diffusion.bench, "main_from_args"),
    ]:
        monkeypatch.setattr(module, name, loaded)


def error_line(capsys, *argv) -> str:
    """Runs `dcae argv`; asserts exit status 2 and one `dcae: error:` line on stderr, and returns it."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dcae: error: "), err
    return lines[0]


# Commands with an output folder: argv for an output folder `out` (and the fixture's inputs `p`).
DIR_COMMANDS = {
    "decode": lambda out, p: ["decode", p["file"], "-o", out],
    "reconstruct": lambda out, p: ["reconstruct", p["data"], "--model", "m", "-o", out],
    "convert": lambda out, p: ["convert", "m", out, "--format", "original"],
    "demo": lambda out, p: ["demo", "--out", out],
    "eval": lambda out, p: ["eval", "--model", "m", "--data", p["data"], "--out", out],
    "latents": lambda out, p: ["latents", "--model", "m", "--data", p["data"], "-o", out],
    "sample": lambda out, p: ["sample", "--ckpt", p["file"], "-o", out],
    "sample-released": lambda out, p: ["sample", "--model", "m", "-o", out],
    "train": lambda out, p: ["train", "tiny", "--out", out],
    "diffusion-train": lambda out, p: ["diffusion", "train", f"data={p['data']}", f"out_dir={out}"],
    "experiment": lambda out, p: ["experiment", "residual", "--smoke", "--out", out, "--data", p["data"]],
}

# Commands with an output file: argv for an output file `out`.
FILE_COMMANDS = {
    "encode": lambda out, p: ["encode", p["data"], "--model", "m", "-o", out],
    "reconstruct --json": lambda out, p: ["reconstruct", p["data"], "--model", "m", "-o", p["tmp"], "--json", out],
    "eval --json": lambda out, p: ["eval", "--model", "m", "--data", p["data"], "--json", out],
    "fid --json": lambda out, p: ["fid", p["data"], p["data"], "--json", out],
    "fid --save-stats": lambda out, p: ["fid", p["data"], "--save-stats", out],
    "metrics --json": lambda out, p: ["metrics", p["data"], p["data"], "--json", out],
    "metrics --csv": lambda out, p: ["metrics", p["data"], p["data"], "--csv", out],
    "bench ae --json": lambda out, p: ["bench", "ae", "--json", out],
    "bench diffusion --json": lambda out, p: ["bench", "diffusion", "--json", out],
}

# Commands with an input given as a link to a missing file: argv for that input `link`.
LINK_COMMANDS = {
    "encode image": lambda link, p: ["encode", p["data"], link, "--model", "m", "-o", p["tmp"] / "z.safetensors"],
    "encode --model": lambda link, p: ["encode", p["data"], "--model", link, "-o", p["tmp"] / "z.safetensors"],
    "decode latents": lambda link, p: ["decode", link, "-o", p["tmp"] / "d"],
    "reconstruct image": lambda link, p: ["reconstruct", link, "--model", "m", "-o", p["tmp"] / "r"],
    "convert source": lambda link, p: ["convert", link, p["tmp"] / "c", "--format", "diffusers"],
    "demo --model": lambda link, p: ["demo", "--out", p["tmp"] / "demo", "--model", link],
    "eval --data": lambda link, p: ["eval", "--model", "m", "--data", p["data"], link],
    "eval --model": lambda link, p: ["eval", "--model", f"diffusers:{link}", "--data", p["data"]],
    "eval --inception": lambda link, p: ["eval", "--model", "m", "--data", p["data"], "--inception", link],
    "fid set": lambda link, p: ["fid", p["data"], link],
    "metrics ref": lambda link, p: ["metrics", link, p["data"]],
    "latents --data": lambda link, p: ["latents", "--model", "m", "--data", link, "-o", p["tmp"] / "l"],
    "latents --model": lambda link, p: ["latents", "--model", link, "--data", p["data"], "-o", p["tmp"] / "l"],
    "sample --ckpt": lambda link, p: ["sample", "--ckpt", link, "-o", p["tmp"] / "s"],
    "sample --autoencoder": lambda link, p: ["sample", "--ckpt", p["file"], "--autoencoder", link, "-o", p["tmp"]],
    "train config": lambda link, p: ["train", link, "--out", p["tmp"] / "t"],
    "train data": lambda link, p: ["train", "tiny", f"data.train=[{link}]", "--out", p["tmp"] / "t"],
    "train --init": lambda link, p: ["train", "tiny", "--init", link, "--out", p["tmp"] / "t"],
    "diffusion train data": lambda link, p: ["diffusion", "train", f"data={link}", f"out_dir={p['tmp'] / 't'}"],
    "experiment --data": lambda link, p: ["experiment", "gan", "--smoke", "--data", link, "--out", p["tmp"] / "e"],
}


@pytest.mark.parametrize("command", DIR_COMMANDS)
def test_output_folder_that_is_a_file(command, paths, no_loading, capsys):
    line = error_line(capsys, *DIR_COMMANDS[command](paths["file"], paths))
    assert f"{paths['file']} is an existing file, not a folder" in line
    assert paths["file"].read_text() == "keep me"


@pytest.mark.parametrize("command", DIR_COMMANDS)
def test_output_folder_under_a_file(command, paths, no_loading, capsys):
    out = paths["file"] / "out"
    line = error_line(capsys, *DIR_COMMANDS[command](out, paths))
    assert f"{out} cannot be created: {paths['file']} is a file, not a folder" in line
    assert paths["file"].read_text() == "keep me"


@pytest.mark.parametrize("command", DIR_COMMANDS)
def test_output_folder_that_is_a_link_to_nothing(command, paths, no_loading, capsys):
    line = error_line(capsys, *DIR_COMMANDS[command](paths["link"], paths))
    assert f"{paths['link']} is a link to a missing folder {paths['tmp'] / 'missing'}" in line
    assert not (paths["tmp"] / "missing").exists()


@needs_proc
@pytest.mark.parametrize("command", DIR_COMMANDS)
def test_output_folder_that_cannot_be_written(command, paths, no_loading, capsys):
    out = UNWRITABLE / "out"
    line = error_line(capsys, *DIR_COMMANDS[command](out, paths))
    assert f"{out} cannot be created: cannot write in /proc" in line


@pytest.mark.parametrize("command", FILE_COMMANDS)
def test_output_file_that_is_a_folder(command, paths, no_loading, capsys):
    line = error_line(capsys, *FILE_COMMANDS[command](paths["folder"], paths))
    assert f"{paths['folder']} is an existing folder, not a file" in line
    assert [f.name for f in paths["folder"].iterdir()] == ["old.json"]


@pytest.mark.parametrize("command", FILE_COMMANDS)
def test_output_file_under_a_file(command, paths, no_loading, capsys):
    out = paths["file"] / "out.json"
    line = error_line(capsys, *FILE_COMMANDS[command](out, paths))
    assert f"{out} cannot be created: {paths['file']} is a file, not a folder" in line
    assert paths["file"].read_text() == "keep me"


@needs_proc
@pytest.mark.parametrize("command", FILE_COMMANDS)
def test_output_file_that_cannot_be_written(command, paths, no_loading, capsys):
    out = UNWRITABLE / "out.json"
    line = error_line(capsys, *FILE_COMMANDS[command](out, paths))
    assert f"{out} cannot be created: cannot write in /proc" in line


@pytest.mark.parametrize("command", LINK_COMMANDS)
def test_input_that_is_a_link_to_a_missing_file(command, paths, no_loading, capsys):
    line = error_line(capsys, *LINK_COMMANDS[command](paths["link"], paths))
    assert f"{paths['link']} is a link to a missing file {paths['tmp'] / 'missing'}" in line
    assert sorted(p.name for p in paths["tmp"].iterdir()) == ["data", "file.txt", "folder", "link"]  # none written


def test_existing_outputs_are_kept(paths, no_loading, capsys):
    """An output that exists is refused (unless --overwrite) and stays as it was, whatever else fails."""
    line = error_line(capsys, "encode", paths["data"], "--model", "m", "-o", paths["file"])
    assert f"{paths['file']} already exists" in line
    error_line(capsys, "encode", paths["link"], "--model", "m", "-o", paths["file"], "--overwrite")
    old = paths["folder"] / "old.json"
    line = error_line(capsys, "eval", "--model", "m", "--data", paths["data"], "--json", old)
    assert f"{old} already exists" in line
    line = error_line(capsys, "eval", "--model", "m", "--data", paths["link"], "--out", paths["folder"])
    assert "is a link to a missing file" in line
    assert paths["file"].read_text() == "keep me" and old.read_text() == "{}"


def test_trainers_refuse_an_out_that_is_a_file(paths):
    """The library's trainers too (they create their out folder): a UserError naming it, before any work."""
    from dcae.diffusion.train.config import load_config as diffusion_config
    from dcae.diffusion.train.loop import train as train_diffusion
    from dcae.train.config import load_config
    from dcae.train.trainer import train

    cfg = load_config("tiny", [f"out_dir={paths['file']}"])
    with pytest.raises(PathError, match="is an existing file, not a folder"):
        train(cfg)
    cfg = diffusion_config(None, [f"data={paths['data']}", f"out_dir={paths['file'] / 'run'}"])
    with pytest.raises(PathError, match="cannot be created: .* is a file, not a folder"):
        train_diffusion(cfg)
    assert paths["file"].read_text() == "keep me"


# ----------------------------------------------------------------------------- the checks themselves
def test_check_output_dir(paths):
    assert check_output_dir(paths["folder"]) == paths["folder"]
    assert check_output_dir(paths["tmp"] / "new" / "deeper") == paths["tmp"] / "new" / "deeper"
    assert not (paths["tmp"] / "new").exists()  # checked, not created
    linked = paths["tmp"] / "to-folder"
    linked.symlink_to(paths["folder"])
    assert check_output_dir(linked) == linked  # a link to a folder is a folder
    with pytest.raises(PathError, match=r"^results folder .*file.txt is an existing file, not a folder$"):
        check_output_dir(paths["file"], "results folder")
    with pytest.raises(PathError, match="cannot be created: .*link is a link to a missing folder"):
        check_output_dir(paths["link"] / "x")
    assert sorted(p.name for p in paths["folder"].iterdir()) == ["old.json"]  # the write test left nothing


def test_check_output_file(paths):
    new = paths["folder"] / "new.json"
    assert check_output_file(new) == new
    assert check_output_file(paths["file"], overwrite=True) == paths["file"]
    with pytest.raises(OutputExistsError, match="already exists"):
        check_output_file(paths["file"])
    with pytest.raises(OutputExistsError):  # a link, even to nothing, is something there
        check_output_file(paths["link"])
    with pytest.raises(PathError, match="is an existing folder, not a file"):
        check_output_file(paths["folder"], overwrite=True)
    with pytest.raises(PathError, match="cannot be created: .*file.txt is a file, not a folder"):
        check_output_file(paths["file"] / "a" / "b.json")


def test_check_input(paths):
    assert check_input(paths["file"]) == paths["file"]
    assert check_input("dc-ae-f32c32-in-1.0", must_exist=False) == Path("dc-ae-f32c32-in-1.0")  # a name
    with pytest.raises(MissingInputError, match=r"^latents .*nope does not exist$") as e:
        check_input(paths["tmp"] / "nope", "latents")
    assert isinstance(e.value, FileNotFoundError)  # as before, for callers that catch that
    with pytest.raises(MissingInputError, match=r"link is a link to a missing file .*missing$"):
        check_input(paths["link"], must_exist=False)
    with pytest.raises(MissingInputError, match=r"link/a.png does not exist: .*link is a link to a missing folder"):
        check_input(paths["link"] / "a.png")
    chain = paths["tmp"] / "chain"
    chain.symlink_to(paths["link"])
    with pytest.raises(MissingInputError, match=r"chain is a link to a missing file .*missing$"):
        check_input(chain)
