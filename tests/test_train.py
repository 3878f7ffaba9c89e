"""dcae train: config, data, trainable sets per phase, losses, a full three-phase run in-process."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_helpers import TINY_MODEL, tiny_config, write_photos

from dcae.models import DCAE, DCAEConfig
from dcae.runtime import checkpoint as state
from dcae.runtime.schedule import lr_at
from dcae.train import params
from dcae.train.config import ConfigError, OptimConfig, load_config, packaged_configs
from dcae.train.data import ImageDataset, ResumableBatchSampler, augment, list_items, split_items


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and with pytest-xdist workers (or anything else)
    sharing the cores, oversubscribed OpenMP makes each step 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model() -> DCAE:
    torch.manual_seed(0)
    return DCAE(DCAEConfig(**TINY_MODEL))


# ----------------------------------------------------------------------------- config
def test_defaults_follow_the_paper():
    cfg = load_config()
    assert (cfg.phase1.optim.lr, cfg.phase1.optim.weight_decay, cfg.phase1.optim.betas) == (6.4e-5, 0.1, (0.9, 0.999))
    assert (cfg.phase2.optim.lr, cfg.phase2.optim.weight_decay) == (1.6e-5, 1e-3)
    assert (cfg.phase3.optim.lr, cfg.phase3.optim.betas) == (5.4e-5, (0.5, 0.9))
    assert cfg.phase1.trainable == {"all": "*"}
    assert set(cfg.phase2.trainable.values()) == {"encoder.project_out.*", "decoder.project_in.*"}
    assert cfg.phase3.trainable == {"decoder_head": "decoder.project_out.*"}
    assert cfg.phase1.loss.gan_weight == cfg.phase2.loss.gan_weight == 0 and cfg.phase3.loss.gan_weight > 0


def test_overrides_and_yaml_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    # PyYAML reads 6.4e-5 (no dot) as a string: the loader must still give a float
    path.write_text("phase1:\n  optim:\n    lr: 6.4e-5\n  steps: 10\nmodel:\n  name: dc-ae-f32c32-in-1.0\n")
    cfg = load_config(
        path,
        [
            "phase1.optim.lr=1e-4",
            "phase2.trainable_inner_stages=true",
            "phase3.optim.betas=[0.4,0.8]",
            "phase2.trainable.extra=re:decoder\\.stages\\.5\\..*",
            "data.train=[a,b]",
            "val.resolutions=[128,256]",
            "phase2.max_minutes=null",
        ],
    )
    assert cfg.phase1.optim.lr == 1e-4 and isinstance(cfg.phase1.optim.lr, float)
    assert cfg.phase1.steps == 10 and cfg.model.name == "dc-ae-f32c32-in-1.0"
    assert cfg.phase2.trainable_inner_stages is True
    assert cfg.phase3.optim.betas == (0.4, 0.8)
    assert cfg.phase2.trainable["extra"].startswith("re:")
    assert cfg.data.train == ["a", "b"] and cfg.val.resolutions == [128, 256]
    # YAML reads a bare `no` as false: mixed_precision=no must still mean "no", in a file and as an override
    path.write_text("mixed_precision: no\n")
    assert load_config(path).mixed_precision == "no"
    assert load_config(None, ["mixed_precision=no"]).mixed_precision == "no"


def test_packaged_configs_load_and_match_repo_copies():
    shipped = packaged_configs()
    assert {"tiny", "f32c32", "finetune"} <= set(shipped)
    repo = Path(__file__).resolve().parents[1] / "configs"
    for path in shipped.values():
        load_config(path)
        assert (repo / path.name).read_text() == path.read_text(), f"configs/{path.name} differs from the packaged copy"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["phase1.optim.lrr=1"], "did you mean phase1.optim.lr"),
        (["phase1.steps=abc"], "expected int"),
        (["phase1.steps=0"], "phase1.steps must be at least 1, got 0"),
        (["mixed_precision=fp8"], "mixed_precision"),
        (["phase3.optim.schedule=linear"], "schedule"),
        (["phase1.loss.perceptual_net=resnet"], "perceptual_net"),
        (["phase1.loss.l1_weight=0", "phase1.loss.perceptual_weight=0"], "no reconstruction loss"),
        (["nokey"], "key=value"),
        (["phase1=3"], "expected a mapping"),
    ],
)
def test_bad_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("phase1: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_reports_config_errors(capsys, tmp_path):
    from dcae.cli import main

    assert main(["train", "tiny", "phase1.steps=-3", "--out", str(tmp_path)]) == 2
    assert "phase1" in capsys.readouterr().err
    # overrides may come after options
    assert main(["train", "tiny", "--phase", "2", "phase2.resolution=96", "--print-config"]) == 0
    assert "resolution: 96" in capsys.readouterr().out


# ----------------------------------------------------------------------------- trainable sets
def test_phase_patterns_select_the_declared_layers():
    model = tiny_model()
    cfg = load_config()
    sel2 = params.select_trainable(model, params.phase_patterns(cfg.phase2, model))
    names2 = {n for ns in sel2.values() for n in ns}
    assert names2 and all(n.startswith(("encoder.project_out.", "decoder.project_in.")) for n in names2)
    cfg.phase2.trainable_inner_stages = True
    sel2b = params.select_trainable(model, params.phase_patterns(cfg.phase2, model))
    assert any(n.startswith("encoder.stages.5.") for n in sel2b["encoder_inner_stage"])
    assert any(n.startswith("decoder.stages.5.") for n in sel2b["decoder_inner_stage"])
    sel3 = params.select_trainable(model, params.phase_patterns(cfg.phase3, model))
    assert {n for ns in sel3.values() for n in ns} == {
        n for n, _ in model.named_parameters() if n.startswith("decoder.project_out.")
    }
    with pytest.raises(ConfigError, match="matches no parameter"):
        params.select_trainable(model, {"typo": "decoder.projectout.*"})


def test_frozen_batchnorm_stays_in_eval_mode():
    model = tiny_model()
    params.apply_trainable(model, {"head": ["decoder.project_out.op_list.0.weight"]})
    params.set_train_mode(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert model.decoder.project_out.training


# ----------------------------------------------------------------------------- data
def test_sampler_resumes_exactly_and_ranks_are_disjoint():
    full = ResumableBatchSampler(10, 2, seed=3)
    it = iter(full)
    batches = [next(it) for _ in range(12)]  # crosses two epoch boundaries (5 batches per epoch)
    resumed = iter(ResumableBatchSampler(10, 2, seed=3, start_batch=7))
    assert [next(resumed) for _ in range(5)] == batches[7:12]
    r0 = next(iter(ResumableBatchSampler(10, 2, seed=3, rank=0, world_size=2)))
    r1 = next(iter(ResumableBatchSampler(10, 2, seed=3, rank=1, world_size=2)))
    assert not {i for i, _, _ in r0} & {i for i, _, _ in r1}
    assert full.position(12) == {"epoch": 2, "batch_in_epoch": 2, "batches_consumed": 12}


def test_augment_shapes_and_determinism():
    arr = np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8)
    a = augment(arr, 32, np.random.default_rng(1), scale_range=(1.0, 1.5))
    b = augment(arr, 32, np.random.default_rng(1), scale_range=(1.0, 1.5))
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)
    small = augment(arr[:20, :20], 32, np.random.default_rng(0), resize=False, crop="center")
    assert small.shape == (32, 32, 3)


def test_tar_shards_and_folders(tmp_path):
    photos = write_photos(tmp_path / "photos", n=4)
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for p in sorted(photos.iterdir()):
            tar.add(p, arcname=f"{p.stem}.png")
            info = tarfile.TarInfo(f"{p.stem}.json")
            data = b'{"label": 1}'
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))  # webdataset-style companion file: ignored
    items = list_items([str(tmp_path / "shard-*.tar"), str(photos)])
    assert len(items) == 8 and sum(1 for it in items if it.key) == 4
    ds = ImageDataset(items, 32, seed=0)
    x_tar, _ = ds[(0, 0, 0)]
    x_file, _ = ds[(4, 0, 0)]
    assert torch.equal(x_tar, x_file)  # the same photo read from the shard and from the folder


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    photos = write_photos(tmp_path / "photos", n=4)
    (photos / "img_001.png").write_bytes(b"not a png at all")
    good = (photos / "img_002.png").read_bytes()
    (photos / "zz_truncated.png").write_bytes(good[: len(good) // 2])
    ds = ImageDataset(list_items([str(photos)]), 32, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [ds[(i, 0, i)] for i in range(len(ds))]
    assert sum(skipped for _, skipped in results) == 2
    assert all(x.shape == (3, 32, 32) for x, _ in results)
    assert any("img_001.png" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------- units
def test_lr_schedule():
    o = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, 100, o) == pytest.approx(0.1)
    assert lr_at(10, 100, o) == pytest.approx(1.0)
    assert lr_at(100, 100, o) == pytest.approx(0.1)
    assert lr_at(55, 100, o) == pytest.approx(0.55)


def test_discriminator_and_adaptive_weight():
    from dcae.train.losses import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss

    d = PatchDiscriminator(channels=8, layers=3)
    assert d(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # 70x70-receptive-field patches
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0
    w = torch.nn.Parameter(torch.ones(3))
    ratio = adaptive_gan_weight((w * 2).sum(), (w * 4).sum(), w, 1e4)
    assert ratio.item() == pytest.approx(0.5, rel=1e-3)


# ----------------------------------------------------------------------------- a full run
@pytest.fixture(scope="module")
def three_phase_run(tmp_path_factory):
    from dcae.train.trainer import train

    root = tmp_path_factory.mktemp("train")
    photos = write_photos(root / "photos", n=8)
    (photos / "aa_corrupt.jpg").write_bytes(b"\xff\xd8 broken jpeg")  # sorted first: a training image
    (photos / "zz_corrupt.png").write_bytes(b"\x89PNG broken")  # sorted last: held out (holdout=2)
    cfg = tiny_config(root / "run", [str(photos)], grad_accum=2)
    for n in (1, 2, 3):  # global batches: 2 accumulation steps of the helper's micro-batch
        cfg[f"phase{n}"]["batch_size"] *= 2
    cfg["data"]["holdout"] = 2
    cfg["phase2"]["steps"] = 2
    cfg["phase3"]["steps"] = 2
    cfg["val"]["resolutions"] = [32, 64]
    result = train(load_config(cfg), phases=[1, 2, 3])
    return root / "run", result


def _state(path: Path) -> dict[str, torch.Tensor]:
    return DCAE.from_pretrained(path).state_dict()


def _checkpoint_model(run: Path, n: int) -> dict[str, torch.Tensor]:
    return state.load_checkpoint(state.latest_checkpoint(run / f"phase{n}" / "checkpoints"))["model"]


DECLARED = [(2, ("encoder.project_out.", "decoder.project_in.")), (3, ("decoder.project_out.",))]


@pytest.mark.parametrize("phase, prefixes", DECLARED)
def test_phases_2_and_3_change_only_their_parameters(three_phase_run, phase, prefixes):
    run, _ = three_phase_run
    before = _state(run / f"phase{phase - 1}" / "model")
    for after in (_checkpoint_model(run, phase), _state(run / f"phase{phase}" / "model")):  # raw and EMA export
        assert before.keys() == after.keys()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed, "nothing trained"
        assert all(k.startswith(prefixes) for k in changed), sorted(changed)
        # every declared tensor moved (BN buffers included among the frozen, unchanged ones)
        declared = {k for k in before if k.startswith(prefixes)}
        assert declared == changed


def test_run_outputs(three_phase_run):
    run, result = three_phase_run
    assert result["model"] == run / "phase3" / "model"
    for n in (1, 2, 3):
        folder = run / f"phase{n}"
        metrics = json.loads((folder / "metrics.json").read_text())
        assert [m["resolution"] for m in metrics["eval"]] == [32, 64]
        assert all(np.isfinite(m["psnr"]) and 0 <= m["ssim"] <= 1 for m in metrics["eval"])
        assert all(m["num_images"] == 1 and m["implied_scaling_factor"] > 0 for m in metrics["eval"])
        if n == 1:  # one full epoch: the corrupt training file was met, skipped and counted
            assert metrics["skipped_images"] >= 1
        assert (folder / "loss_curves.png").is_file() and (folder / "samples" / "final.png").is_file()
        assert len(state.list_checkpoints(folder / "checkpoints")) == 2  # keep_last
        header = (folder / "log.csv").read_text().splitlines()[0]
        assert header.startswith("step,") and "l1" in header
        # both export formats load back to the same weights
        a, b = _state(folder / "model"), _state(folder / "model-diffusers")
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (run / "loss_curves.png").is_file() and (run / "summary.json").is_file()
    assert "d_loss" in (run / "phase3" / "log.csv").read_text().splitlines()[0]


def test_rerun_without_resume_is_refused(three_phase_run):
    from dcae.errors import UserError
    from dcae.train.trainer import train

    run, _ = three_phase_run
    cfg = load_config(str(run / "config.yaml"))
    with pytest.raises(UserError, match="--resume"):
        train(cfg, phases=[1])
    # with --resume, completed phases are skipped
    assert train(cfg, phases=[2, 3], resume=True)["model"] == run / "phase3" / "model"


def test_phase_2_needs_phase_1(tmp_path):
    from dcae.errors import UserError
    from dcae.train.trainer import train

    photos = write_photos(tmp_path / "p", n=4)
    with pytest.raises(UserError, match="run phase 1 first"):
        train(load_config(tiny_config(tmp_path / "run", [str(photos)])), phases=[2])


def test_loss_decreases_on_real_photos(tmp_path):
    from dcae.runtime.log import read_log
    from dcae.train.trainer import train

    cfg = tiny_config(tmp_path / "run", ["skimage:astronaut,chelsea,coffee,rocket,camera,coins"])
    cfg["data"]["holdout"] = 0
    cfg["phase1"].update(steps=40, batch_size=4, optim={"lr": 2e-3, "warmup_steps": 5})
    cfg["phase1"]["loss"] = {"perceptual_weight": 0.1, "perceptual_net": "stlpips-alex"}  # real LPIPS weights
    train(load_config(cfg), phases=[1])
    rows = read_log(tmp_path / "run" / "phase1" / "log.csv")
    first = np.mean([r["loss"] for r in rows[:5]])
    last = np.mean([r["loss"] for r in rows[-5:]])
    assert last < 0.8 * first, (first, last)
    assert all("lpips" in r for r in rows)


def test_split_holdout_is_sorted_tail(tmp_path):
    photos = write_photos(tmp_path / "p", n=5)
    train, val = split_items([str(photos)], [], 2)
    assert [Path(it.source).name for it in val] == ["img_003.png", "img_004.png"] and len(train) == 3


def test_finetune_from_init_via_cli(three_phase_run, tmp_path):
    """`dcae train CONFIG --init SRC --phase N`: fine-tuning saved weights (here in the diffusers format),
    with gradient checkpointing on."""
    import yaml

    from dcae.cli import main

    run, _ = three_phase_run
    init = run / "phase1" / "model-diffusers"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"] = {"config": None, "name": None}  # the architecture comes from --init
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "ft"
    argv = ["train", str(path), "--phase", "1", "--init", str(init), "--out", str(out), "phase1.steps=1"]
    assert main([*argv, "model.gradient_checkpointing=true", "ema_decay=0"]) == 0
    before, after = _state(init), _state(out / "phase1" / "model")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not (out / "phase2").exists()


def test_structured_latent_training_uses_only_the_drawn_channels(tmp_path):
    """model.latent_channel_choices (DC-AE 1.5): with k always 2, only the first 2 output channels of the
    encoder's last conv and the first 2 input channels of the decoder's first conv learn; the rest of
    those weights stays exactly at its initial value (no weight decay, no EMA here)."""
    from dcae.train.trainer import build_model, train

    photos = write_photos(tmp_path / "photos", n=4)
    cfg = tiny_config(tmp_path / "run", [str(photos)], ema_decay=0.0)
    cfg["model"]["config"].update(encoder_out_shortcut=False, encoder_sliceable_out=True,
                                  decoder_in_shortcut=False, decoder_sliceable_in=True)  # fmt: skip
    cfg["model"]["latent_channel_choices"] = [2]
    cfg["phase1"]["optim"] = {"weight_decay": 0.0}
    config = load_config(cfg)
    state.seed_everything(config.seed)
    initial = build_model(config).state_dict()
    train(config, phases=[1])
    after = _checkpoint_model(tmp_path / "run", 1)
    enc, dec = "encoder.project_out.op_list.0.conv.weight", "decoder.project_in.conv.weight"
    assert torch.equal(after[enc][2:], initial[enc][2:]) and not torch.equal(after[enc][:2], initial[enc][:2])
    assert torch.equal(after[dec][:, 2:], initial[dec][:, 2:])
    assert not torch.equal(after[dec][:, :2], initial[dec][:, :2])

    cfg = tiny_config(tmp_path / "plain", [str(photos)])
    cfg["model"]["latent_channel_choices"] = [2]
    from dcae.errors import UserError

    with pytest.raises(UserError, match="latent_channel_choices: .*sliceable"):
        train(load_config(cfg), phases=[1])
