"""CPU benchmark of DC-AE encode/decode, ours against diffusers' AutoencoderDC (`make bench`).

    python benchmarks/bench_ae.py --json benchmarks/results/ae_cpu.json

Takes the options of `dcae bench ae` (see `dcae bench ae --help`); without --device it runs on the CPU
with the CPU defaults (dc-ae-f32c32-in-1.0, 256 px, batch 1, fp32, median of 3), a few minutes on 2
cores. --models also takes saved models (e.g. a trained decoder's runs/x/phase3/model next to its
teacher's folder). On a GPU machine use `dcae bench ae` or benchmarks/gpu_check.py instead.
"""

from __future__ import annotations

import sys

from dcae.models.bench import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--device" not in argv:
        argv += ["--device", "cpu"]
    sys.exit(main(argv))
