"""Text-to-image diffusion on DC-AE latents (SANA-style), the peer of the class-conditional models (`c2i`):
text encoders, the captioned latent cache, diffusers SANA pipelines (import / export), sampling, evaluation and
the `dcae t2i` commands. Networks, processes, the training loop and the latent-cache contract are shared
(`dcae.diffusion.nets`, `.processes`, `.train`, `.cache`)."""
