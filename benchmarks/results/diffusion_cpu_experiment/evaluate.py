"""The CPU experiment's evaluation (see docs/diffusion.md): python evaluate.py RUN LATENTS OUT."""

# Do class-conditional samples land on the training latents of their class?
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dcae.data.images import make_grid, save_image
from dcae.diffusion.c2i.latents import read_index
from dcae.diffusion.processes.sampling import sample
from dcae.diffusion.train.checkpoint import conditioning_of, load_checkpoint
from dcae.models import DCAE

run, lat_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
model, process, meta = load_checkpoint(run)
index = read_index(lat_dir)
shard = load_file(str(lat_dir / "shard-00000.safetensors"))
real = torch.cat([shard["latents"], shard["latents_flip"]])  # 2N x C x h x w
real_y = torch.cat([shard["labels"], shard["labels"]])
n_cls = index["num_classes"]
results = {"step": meta["step"], "num_classes": n_cls, "latent_shape": index["latent_shape"]}


def nearest(z):
    d = torch.cdist(z.flatten(1), real.flatten(1))  # L2 to every training latent
    j = d.argmin(1)
    return real_y[j], d.min(1).values / real.flatten(1).norm(dim=1).mean()


torch.manual_seed(0)
noise = torch.randn(4 * n_cls, *index["latent_shape"], generator=torch.Generator().manual_seed(0))
y = torch.arange(n_cls).repeat(4)
for cfg in (1.0, 2.0):
    z = sample(model, process, noise, conditioning_of(meta).batch(y), steps=20, solver="heun", cfg_scale=cfg)
    cls, rel = nearest(z)
    d = torch.cdist(z.flatten(1), real.flatten(1))
    own = torch.stack([d[i, real_y == y[i]].min() for i in range(len(y))])
    other = torch.stack([d[i, real_y != y[i]].min() for i in range(len(y))])
    results[f"cfg{cfg:g}"] = {
        "nn_class_accuracy": (cls == y).float().mean().item(),
        "own_class_vs_other_class_nn_distance": (own / other).median().item(),
        "nn_rel_distance_median": rel.median().item(),
        "sample_rms": z.square().mean().sqrt().item(),
    }
    if cfg == 2.0:
        z_show = z[:8]
base_cls, base_rel = nearest(noise)  # reference: pure noise latents
results["noise_baseline"] = {
    "nn_class_accuracy": (base_cls == y).float().mean().item(),
    "nn_rel_distance_median": base_rel.median().item(),
}
results["real_rms"] = real.square().mean().sqrt().item()
_, mean_rel = nearest(real.mean(0, keepdim=True))  # reference: the average training latent
results["mean_latent_baseline_rel_distance"] = mean_rel.item()

ae = DCAE.from_pretrained(index["model"]).eval()
with torch.no_grad():
    dec_real = ae.decode(shard["latents"][:8] / index["scaling_factor"]).clamp(-1, 1)
    dec_samp = ae.decode(z_show / index["scaling_factor"]).clamp(-1, 1)
small = lambda t: F.interpolate(t[None] if t.ndim == 3 else t, size=64, mode="area")  # noqa: E731
# No photo thumbnails here: the ImageNet images stay out of the repository.
rows = [small(dec_real), small(dec_samp)]
save_image(make_grid(list(torch.cat(rows)), nrow=8), out / "decoded_real_vs_decoded_samples.png")
(out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
print(json.dumps(results, indent=2))
