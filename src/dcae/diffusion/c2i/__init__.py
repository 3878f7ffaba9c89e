"""Class-conditional (and unconditional) diffusion on DC-AE latents, the peer of text-to-image (`t2i`): the
labelled latent cache (`dcae latents`), sampling our checkpoints (`dcae sample`) and the 14 released models
(`released/`). Networks, processes, the training loop and the latent-cache contract are shared."""
