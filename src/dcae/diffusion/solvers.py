"""Every solver name dcae knows, in one place, with no torch import (the command parsers read it).

- `SOLVERS`: what dcae.diffusion.processes.sampling.sample runs, and which kind of model each takes;
- the released models' own samplers (dcae.diffusion.c2i.released.sampling);
- the diffusers schedulers a SANA pipeline may name and the solver each one is (dcae.diffusion.t2i.pipeline).
"""

SOLVERS = ("euler", "heun", "ddim", "dpm++", "ddpm")  # every solver `sample` runs
FLOW_ONLY_SOLVERS = ("euler", "heun")  # integrate the flow ODE: flow matching models only
DDPM_ONLY_SOLVERS = ("ddpm",)  # the learned DDPM variance: DDPM models only
FLOW_MODEL_SOLVERS = tuple(s for s in SOLVERS if s not in DDPM_ONLY_SOLVERS)  # what a flow model takes
DDPM_MODEL_SOLVERS = tuple(s for s in SOLVERS if s not in FLOW_ONLY_SOLVERS)  # what a DDPM model takes

# The released models' own samplers.
ODE_SOLVERS = ("dopri5", "heun2", "midpoint", "rk4")  # torchdiffeq on flow models; steps = grid points
OWN_SAMPLERS = ("ddpm", "dpm-solver", *ODE_SOLVERS)  # steps = their own
# `sample`'s solvers on a released model (steps = solver steps); "ddpm" names DiT's own
OUR_SOLVERS = tuple(s for s in SOLVERS if s not in OWN_SAMPLERS)
# `dcae sample --solver`: our solvers for our checkpoints, and the samplers of the released models
SAMPLE_SOLVERS = SOLVERS + tuple(s for s in OWN_SAMPLERS if s not in SOLVERS)

# diffusers scheduler of a SANA pipeline -> (our solver, the config field holding the flow shift)
SCHEDULERS = {
    "FlowMatchEulerDiscreteScheduler": ("euler", "shift"),
    "FlowMatchHeunDiscreteScheduler": ("heun", "shift"),
    "DPMSolverMultistepScheduler": ("dpm++", "flow_shift"),  # SANA's release: DPM-Solver++(2M) on flow sigmas
}
EXPORT_SOLVERS = tuple(solver for solver, _ in SCHEDULERS.values())  # `dcae t2i export --solver`
