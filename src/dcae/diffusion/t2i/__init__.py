"""Text-to-image diffusion on DC-AE latents (SANA-style), the peer of the class-conditional models (`c2i`):
text encoders, the captioned latent cache, diffusers SANA pipelines (import / export), sampling, evaluation and
the `dcae t2i` commands. Networks, processes, the training loop and the latent-cache contract are shared
(`dcae.diffusion.nets`, `.processes`, `.train`, `.cache`)."""

__all__ = ["generate"]


def __getattr__(name: str):
    if name == "generate":  # images from a SANA pipeline (folder or Hub id) or one of our checkpoints
        from dcae.diffusion.t2i.sampling import generate

        return generate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
