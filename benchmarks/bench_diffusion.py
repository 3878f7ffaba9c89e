"""Diffusion-transformer throughput on SD-VAE-f8 (p2), DC-AE-f32 (p1) and DC-AE-f64 (p1) latents of 512 px images.

Same as `dcae bench diffusion`:
    python benchmarks/bench_diffusion.py --json benchmarks/results/diffusion_cpu.json        # CPU: DiT-S
    python benchmarks/bench_diffusion.py --model DiT-XL UViT-H --batch 32 --compile \
        --json benchmarks/results/diffusion_gpu.json
"""

from __future__ import annotations

import argparse
import sys

from dcae.diffusion.bench import main_from_args
from dcae.diffusion.commands import add_bench_args

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(parser)
    sys.exit(main_from_args(parser.parse_args()))
