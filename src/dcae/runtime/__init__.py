"""What every trainer shares: typed configs, the learning-rate schedule, the EMA, training checkpoints with
RNG state, the log, and the accelerator. The autoencoder trainer (dcae.train) and the diffusion trainer
(dcae.diffusion.train) are loops on top of these."""
