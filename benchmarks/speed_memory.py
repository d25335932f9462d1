"""Peak memory of a Stage 1 training step, vlmkit against transformers (CLIP ViT-B/32 shape, batch 32).

    python -m benchmarks.speed_memory       # from the repository root

Each side runs in a fresh process that builds its model and takes three training steps
(forward + InfoNCE + backward + AdamW, as `benchmarks.speed`'s stage1 workload runs them);
the figure is that process's peak resident memory, read from /proc (VmHWM, which exec
resets, unlike getrusage's ru_maxrss, which a child inherits from its parent).
"""
from __future__ import annotations

import subprocess
import sys

from benchmarks.results import ROOT, write_section

CODE = """
import sys
sys.path.insert(0, '.')
from benchmarks.speed import stage1_step
step = stage1_step({side!r}, 'fp32')
for _ in range(3):
    step()
print(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')).split()[1])
"""


def peak_mb(side: str) -> float:
    out = subprocess.run([sys.executable, "-c", CODE.format(side=side)], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    peaks = {side: peak_mb(side) for side in ("vlmkit", "transformers")}
    rows = [(f"peak RSS MB, {side} fp32 (own process, 3 steps)", f"{mb:.0f}") for side, mb in peaks.items()]
    rows.append(("peak memory ratio vlmkit / transformers", f"{peaks['vlmkit'] / peaks['transformers']:.2f}x"))
    write_section("speed-memory", "Speed: peak memory of a Stage 1 training step (CLIP ViT-B/32 shape, batch 32)",
                  rows, notes="vlmkit's model is converted from a transformers one, so both exist for a moment in "
                              "its process; training's peak (gradients, AdamW moments, activations) is far above "
                              "that moment. This section replaces the peak-RSS rows of a `speed` run before this "
                              "module existed: those read getrusage's ru_maxrss in a child process, which Linux "
                              "carries over from the parent, so both sides showed the benchmark process's own "
                              "peak and those two rows are void.")


if __name__ == "__main__":
    main()
