"""Stage 1 from webdataset shards against Stage 1 from memory: the same preset, quality and speed.

Run from the repository root (about 25 minutes on 2 CPU cores):

    python -m benchmarks.shards

It packs the Fashion-MNIST training split into shards (`vlmkit data pack`), then trains the
`fashion-mnist` preset twice, one run after the other: as usual (the split decoded into
memory once) and with `data.shards` (decoded while training, by one reader process). Both
are scored on the same 10,000 test images. The sample order differs (a shuffle buffer over
shards against a permutation of rows), so the figures agree as two seeds would, not exactly.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from benchmarks.results import write_section
from vlmkit.data.shards import pack
from vlmkit.data.sources import build_source
from vlmkit.evaluation.hooks import ClipHooks
from vlmkit.presets import preset
from vlmkit.training.contrastive import train_clip

SHARD_SIZE = 5000


def _train(cfg, out: Path) -> tuple[dict, float, float]:
    """Results, wall minutes, and training samples per second (the run's own log, data included)."""
    started = time.perf_counter()
    run = train_clip(cfg, out, "overwrite", hooks=ClipHooks())
    minutes = (time.perf_counter() - started) / 60
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_per_s = [r["steps_per_s"] for r in rows if "steps_per_s" in r][-1]
    return run.results, minutes, steps_per_s * cfg.train.batch_size


def main(out: Path) -> None:
    shards = out / "fashion-mnist-shards"
    shutil.rmtree(shards, ignore_errors=True)
    started = time.perf_counter()
    index = pack(build_source("fashion_mnist", "train"), shards, SHARD_SIZE)
    pack_minutes = (time.perf_counter() - started) / 60

    cfg = preset("fashion-mnist")
    memory, memory_minutes, memory_rate = _train(cfg, out / "memory")
    streamed, streamed_minutes, streamed_rate = _train(cfg.override({"data.shards": str(shards)}), out / "shards")
    write_section("stage1-shards", "Stage 1 from webdataset shards vs from memory (preset `fashion-mnist`)", [
        ("zero-shot top-1, in memory (10,000 test images)", f"{memory['zero_shot/top1_accuracy']:.3f}"),
        ("zero-shot top-1, streamed from shards", f"{streamed['zero_shot/top1_accuracy']:.3f}"),
        ("zero-shot top-5, in memory", f"{memory['zero_shot/top5_accuracy']:.3f}"),
        ("zero-shot top-5, streamed from shards", f"{streamed['zero_shot/top5_accuracy']:.3f}"),
        ("training samples/s, in memory", f"{memory_rate:.0f}"),
        ("training samples/s, streamed from shards (1 reader process)", f"{streamed_rate:.0f}"),
        ("shards / memory, training samples/s", f"{streamed_rate / memory_rate:.2f}x"),
        ("wall time in memory, decode + training + evaluation (min)", f"{memory_minutes:.1f}"),
        ("wall time from shards, training + evaluation (min)", f"{streamed_minutes:.1f}"),
        (f"packing {index['samples']:,} pairs into {len(index['shards'])} shards (min)", f"{pack_minutes:.1f}"),
        ("training steps x batch size", f"{cfg.train.steps} x {cfg.train.batch_size}"),
    ], notes="The two runs ran one after the other on the same machine, not interleaved: their speeds carry "
             "this machine's drift (20-40% between runs). Shards hold PNGs: decoding them while training takes "
             "the reader process's share of the 2 cores; in memory, images are decoded once before training.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench", help="where the shards and runs are written")
    main(Path(parser.parse_args().out))
