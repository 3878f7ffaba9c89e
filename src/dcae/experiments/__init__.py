"""Small-scale reproductions of the paper's findings, one command each (`dcae experiment NAME`).

Each experiment module has `run(protocol) -> results` and writes report.md, results.json and PNG pictures
into its output folder (the training runs go under `runs/` there).
"""

EXPERIMENTS = {
    "residual": ("dcae.experiments.residual", "residual autoencoding vs the same network without shortcuts"),
    "adaptation": ("dcae.experiments.adaptation", "decoupled high-resolution adaptation vs its two controls"),
    "gan": ("dcae.experiments.gan", "head-only GAN vs no GAN vs GAN on the full model (phase 3)"),
    "decoder": ("dcae.experiments.decoder", "smaller decoders for a frozen encoder: speed vs quality"),
    "t2i": ("dcae.experiments.t2i", "text-to-image: prompt adherence, DC-AE f32 patch 1 vs f8 patch 2"),
    "structured": ("dcae.experiments.structured", "DC-AE 1.5: structured latent + augmented diffusion training"),
    "adapt": ("dcae.experiments.adapt", "DC-Gen: a text-to-image model moved onto a deeper autoencoder vs scratch"),
}
