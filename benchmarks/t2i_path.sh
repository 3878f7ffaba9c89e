#!/usr/bin/env bash
# The text-to-image path on the CPU, timed (docs/text-to-image.md "Measured"): 64 rendered shapes with captions,
# a random tiny f4c8 autoencoder, all-MiniLM-L6-v2, SANA-tiny. Usage: bash benchmarks/t2i_path.sh [WORKDIR]
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="$REPO/.venv/bin/python"
DCAE="$REPO/.venv/bin/dcae"
WORK=${1:-/tmp/dcae-t2i-path}
rm -rf "$WORK" && mkdir -p "$WORK" && cd "$WORK"
"$PY" - "$REPO" <<'PY'
import sys
import numpy as np
sys.path.insert(0, sys.argv[1] + "/tests")
from pathlib import Path
from PIL import Image, ImageDraw
from test_diffusion_latents import tiny_autoencoder
(Path("data")).mkdir()
colors = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 40)}
rng = np.random.default_rng(0)
for i in range(64):
    name, c = list(colors.items())[i % 4]
    shape = ["square", "circle"][(i // 4) % 2]
    w = 64 if i % 3 else 128
    img = Image.new("RGB", (w, 64), (245, 245, 245))
    d = ImageDraw.Draw(img)
    x = int(rng.integers(4, w - 36))
    (d.rectangle if shape == "square" else d.ellipse)((x, 14, x + 32, 46), fill=c)
    img.save(f"data/{i:03d}.png")
    Path(f"data/{i:03d}.txt").write_text(f"a {name} {shape}")
tiny_autoencoder().save_pretrained("ae")
PY
ENC=$("$PY" -c "from dcae.diffusion.t2i.encoders import all_minilm_l6_v2; print(all_minilm_l6_v2())")
t() {  # run a dcae command quietly, print its wall time
  local s=$EPOCHREALTIME
  "$@" > /dev/null 2>&1
  awk -v a="$s" -v b="$EPOCHREALTIME" -v what="$2 $3" 'BEGIN { printf "%s: %.1f s\n", what, b - a }'
}
t "$DCAE" t2i cache --data data --model ae --text-encoder "$ENC" -o cache --resolution 64 --max-tokens 16
t "$DCAE" t2i train "$REPO/configs/t2i_tiny.yaml" data=cache out_dir=run max_steps=200 batch_size=8 log.every=50 \
  checkpoint.every=100 sample.every=0 --quiet
t "$DCAE" t2i sample --ckpt run --prompt "a red square" --prompt "a blue circle" --prompt "a green square" \
  --prompt "a yellow circle" --steps 20 -o samples --size 64x64
t "$DCAE" t2i export --ckpt run -o pipe
cat run/log.csv
