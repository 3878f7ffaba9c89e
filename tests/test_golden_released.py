"""The released DC-AE ImageNet-512 diffusion models against golden data from the original implementation
(DC-Gen), in ../shared/reference/golden (see its README): per family a small model with the released
structural options and random weights under the released key names, its forward / guided forward and
whole sampling traces; and, per released name, the full-size key list, shapes and parameter count.

Every size is read from the files. Tolerances: forwards 1e-5 relative (max abs error / max abs value);
sampling runs 1e-5, or ten times the run's own rounding sensitivity (stored in its metadata: the relative
change of the output when the network outputs get 1e-6 relative noise) where that is larger. That rule
also bounds dopri5, whose sensitivity the README measures at 3e-5 to 5e-4 (it is adaptive: rounding can
move its step sizes), so its bound is 10x that, not 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dcae.diffusion.c2i.released.models import (
    PREFIX,
    RELEASED,
    ReleasedDiffusion,
    build_released,
    forward_with_cfg,
    network_from_config,
)
from dcae.diffusion.c2i.released.sampling import generate

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "golden"
FAMILIES = ["dit", "sit", "uvit", "usit", "usit_dcae15"]
SAMPLERS = {"GaussianDiffusion": "ddpm", "DPM_Solver": "dpm-solver", "ODE_dopri5": "dopri5", "ODE_heun2": "heun2"}
SENS = "sensitivity_rel_out_change_for_1e-6_rel_noise_on_network_outputs"


def golden_dir() -> Path:
    if not (GOLDEN / "README.md").is_file():
        pytest.skip(f"golden reference data not found at {GOLDEN} (the project's shared reference folder)")
    return GOLDEN


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


class Golden:
    """One family's file: tensors, metadata and our model built from its tiny config with its weights."""

    def __init__(self, family: str) -> None:
        path = golden_dir() / f"{family}.safetensors"
        with safe_open(str(path), "pt") as f:
            self.meta = {k: _json_or_text(v) for k, v in f.metadata().items()}
        self.t = load_file(str(path))
        network = network_from_config(self.meta["tiny_config"])
        network.load_state_dict({k[len(PREFIX) :]: v for k, v in self.t.items() if k.startswith(PREFIX)})
        release = RELEASED[self.meta["released_names"][0]]
        self.model = ReleasedDiffusion(release, network).eval()
        assert release.family == family


def _json_or_text(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:  # version strings are plain text
        return value


_CACHE: dict[str, Golden] = {}


def golden(family: str) -> Golden:
    if family not in _CACHE:
        _CACHE[family] = Golden(family)
    return _CACHE[family]


def runs(family: str) -> list[str]:
    path = GOLDEN / f"{family}.json"
    return list(json.loads(path.read_text())["sampling"]) if path.is_file() else ["(no golden data)"]


# ----------------------------------------------------------------------------- released names
@pytest.mark.parametrize("family", FAMILIES)
def test_golden_released_names_build_exact_keys_shapes_and_counts(family):
    facts = json.loads((golden_dir() / f"{family}.json").read_text())["released"]
    assert set(facts) == {n for n, r in RELEASED.items() if r.family == family}
    for name, fact in facts.items():
        model = build_released(name, device="meta")  # the 3B model is 12 GB in fp32
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert shapes == fact["state_dict_keys"], name
        assert len(shapes) == fact["num_state_dict_keys"]
        assert sum(p.numel() for p in model.parameters()) == fact["num_parameters"], name
        release, zoo = RELEASED[name], fact["zoo_entry"]
        assert release.hub_id == fact["hub_repo_id_implied"]
        assert (release.autoencoder, release.scaling_factor) == (zoo["autoencoder_name"], zoo["scaling_factor"])
        assert list(release.latent_shape) == fact["latent_shape"]
        merged = fact["merged_config"][fact["merged_config"]["model"]]
        assert release.spec.steps == merged["num_inference_steps"]
        assert release.spec.adaptive_channel == merged["adaptive_channel"]
        # our network built from the original's merged config has the same structure
        with torch.device("meta"):
            twin = network_from_config(fact["merged_config"])
        assert {k: list(v.shape) for k, v in twin.state_dict().items()} == {
            k[len(PREFIX) :]: v for k, v in fact["state_dict_keys"].items()
        }


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("family", FAMILIES)
def test_golden_forward_and_cfg_forward(family):
    g = golden(family)
    t = g.t
    with torch.no_grad():
        out = g.model(t["golden.fwd.x"], t["golden.fwd.t"], t["golden.fwd.y"])
        assert out.shape == t["golden.fwd.out"].shape
        assert rel_err(out, t["golden.fwd.out"]) < 1e-5
        scale = g.meta["cfg_forward"]["cfg_scale"]
        cfg = forward_with_cfg(g.model, t["golden.cfgfwd.x"], t["golden.cfgfwd.t"], t["golden.cfgfwd.y"], scale)
        assert rel_err(cfg, t["golden.cfgfwd.out"]) < 1e-5
        for c in (16, 64):  # adaptive channels: a leading subset of the latent channels
            if f"golden.fwd_c{c}.x" in t:
                sub = g.model(t[f"golden.fwd_c{c}.x"], t["golden.fwd.t"], t["golden.fwd.y"])
                assert rel_err(sub, t[f"golden.fwd_c{c}.out"]) < 1e-5


# ----------------------------------------------------------------------------- sampling
def _sample(g: Golden, run: str):
    st, t = g.meta["sampling"][run], g.t
    p = f"golden.sample.{run}."
    sampler = SAMPLERS[st["eval_scheduler"]]
    steps = int(st.get("timestep_respacing") or st["num_inference_steps"])
    step_noise = t.get(p + "step_noise")
    feed = (lambda k: step_noise[k]) if sampler == "ddpm" else None  # the original's draws, in order
    trace: list = []
    out, nfe = generate(
        g.model, t["golden.sample.y"], t[p + "init_noise"], cfg_scale=st["cfg_scale"], sampler=sampler,
        steps=steps, step_noise=feed, trace=trace,
    )  # fmt: skip
    return st, p, sampler, out, nfe, trace


@pytest.mark.parametrize("family,run", [(f, r) for f in FAMILIES for r in runs(f)])
def test_golden_sampling_run(family, run):
    g = golden(family)
    st, p, sampler, out, nfe, trace = _sample(g, run)
    t = g.t
    tol = max(1e-5, 10 * st[SENS])
    err = rel_err(out, t[p + "out"])
    assert err < tol, f"{family} {run}: relative error {err:.2e} > {tol:.1e}"
    if sampler == "dopri5":
        return  # adaptive: rounding may move its evaluation times (the output bound above is the contract)
    assert nfe == st["nfe"] == len(t[p + "model_t"])
    times = torch.tensor([tm for tm, _, _ in trace], dtype=torch.float64)
    assert torch.allclose(times, t[p + "model_t"].double(), rtol=1e-6, atol=1e-6)
    if p + "net_in" in t:  # every evaluation: network input and raw output, before guidance
        for i, (_, net_in, net_out) in enumerate(trace):
            assert rel_err(net_in, t[p + "net_in"][i]) < tol, f"evaluation {i}"
            assert rel_err(net_out, t[p + "net_out"][i]) < tol, f"evaluation {i}"


def test_golden_ddpm_draws_its_noise_from_the_generator():
    """Without fed noise DDPM draws from `generator`: reproducible, and different seeds differ."""
    g = golden("dit")
    noise, y = g.t["golden.sample.ddpm10_cfg1.3.init_noise"], g.t["golden.sample.y"]

    def run(seed):
        return generate(g.model, y, noise, steps=10, generator=torch.Generator().manual_seed(seed))[0]

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("family", FAMILIES)
def test_golden_weights_load_from_a_release_folder(family, tmp_path):
    """The golden file's `diffusion_model.` tensors in a release folder (config.json naming the released model,
    plus the small config) load strictly through `load_released` and reproduce the golden forward."""
    from safetensors.torch import save_file

    from dcae.diffusion.c2i.released.models import load_released

    g = golden(family)
    weights = {k: v for k, v in g.t.items() if k.startswith(PREFIX)}
    assert {k: list(v.shape) for k, v in weights.items()} == json.loads((GOLDEN / f"{family}.json").read_text())[
        "tiny_state_dict_keys"
    ]
    save_file(weights, str(tmp_path / "model.safetensors"))
    name = g.meta["released_names"][0]
    (tmp_path / "config.json").write_text(json.dumps({"model_name": name, "config": g.meta["tiny_config"]}))
    model = load_released(tmp_path)
    assert model.release.name == name and not model.training
    with torch.no_grad():
        out = model(g.t["golden.fwd.x"], g.t["golden.fwd.t"], g.t["golden.fwd.y"])
    assert rel_err(out, g.t["golden.fwd.out"]) < 1e-5


@pytest.mark.parametrize("family", ["sit", "usit", "usit_dcae15"])
def test_golden_flow_models_with_our_fixed_step_solvers(family):
    """dcae's own solvers on a released flow model (time reversed, velocity negated by the adapter) land on
    the original's dopri5 sample, within dopri5's own accuracy (rtol 1e-3), and Euler converges to it."""
    g = golden(family)
    run = "dopri5_cfg1.5"
    st, p = g.meta["sampling"][run], f"golden.sample.{run}."
    y, noise, ref = g.t["golden.sample.y"], g.t[p + "init_noise"], g.t[p + "out"]

    def err(solver, steps):
        out, nfe = generate(g.model, y, noise, cfg_scale=st["cfg_scale"], sampler=solver, steps=steps)
        assert nfe == steps * (2 if solver == "heun" else 1)
        return rel_err(out, ref)

    assert err("heun", 40) < 2e-3 and err("dpm++", 40) < 3e-3
    e10, e40 = err("euler", 10), err("euler", 40)
    assert e40 < e10 / 3 and e40 < 2e-2


@pytest.mark.parametrize("family", ["dit", "uvit"])
def test_golden_eps_models_with_our_fixed_step_solvers(family):
    """dpm++ through the eps adapters (DiT: linear betas and the step index; UViT: scaled-linear betas and
    time k + 1) converges towards the released deterministic sampler's limit: the DPM-Solver at 300
    evaluations for UViT (itself bit-identical to the original at 30 and 6), DDIM at 500 steps for DiT."""
    g = golden(family)
    y = g.t["golden.sample.y"]
    noise = torch.randn((2, *g.t["golden.fwd.x"].shape[1:]), generator=torch.Generator().manual_seed(0))
    limit = generate(g.model, y, noise, sampler="dpm-solver", steps=300)[0] if family == "uvit" else None
    if limit is None:
        limit = generate(g.model, y, noise, sampler="ddim", steps=500)[0]
    e = [rel_err(generate(g.model, y, noise, sampler="dpm++", steps=n)[0], limit) for n in (25, 100)]
    assert e[1] < e[0] / 1.5 and e[1] < 0.05, e
