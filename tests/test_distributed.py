"""Training under torchrun: two gloo processes on the CPU end where one process does,
with DDP and with FSDP2 (`train.distributed=fsdp`).

Each run is the real command line (`torchrun ... -m vlmkit train ...` against
`python -m vlmkit train ...`) on a tiny preset, with one thread per process. The global
batch is the same in both, split over the ranks in one, so the losses and final weights
must agree up to float rounding: the ranks add partial gradients in another order than one
process does. Measured on an AVX2 machine: at most 2.9e-6 (Stage 1, 6 steps) and 9.6e-7
(Stage 2, 7 steps) apart on any weight. The tolerance, 5e-5, leaves room for other CPUs'
rounding and stays far below what a real fault gives: a per-rank mean of the answer loss
put Stage 2 1e-2 apart, and two ranks' different vocabularies change everything.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vlmkit"]
ONE = [sys.executable, "-m", "vlmkit"]
TOLERANCE = 5e-5

STAGE1 = ["train.steps=6", "train.batch_size=32", "train.log_every=1", "train.save_every=3", "train.eval_every=4",
          "data.train_size=256", "data.eval_size=32"]
STAGE2 = ["data.train_size=64", "data.eval_size=8", "model.vision_layer=-1",
          "align.train.steps=3", "align.train.batch_size=8", "align.train.log_every=1", "align.train.save_every=2",
          "instruct.train.steps=4", "instruct.train.batch_size=8", "instruct.train.grad_accum=2",
          "instruct.train.log_every=1", "instruct.train.save_every=2"]


FSDP1 = ["train.distributed=fsdp"]
FSDP2 = ["align.train.distributed=fsdp", "instruct.train.distributed=fsdp"]


def train(launcher: list[str], kind: str, out: Path, sets: list[str], *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, "train", kind, "--preset", "tiny", "--out", str(out), *flags, "--set", *sets],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(metrics: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=TOLERANCE, atol=TOLERANCE, msg=key)


def assert_same_losses(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> None:
    assert [s for s, _ in a] == [s for s, _ in b]
    assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=TOLERANCE, abs=TOLERANCE)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    runs = tmp_path_factory.mktemp("stage1")
    return {name: (runs / name, train(launcher, "clip", runs / name, STAGE1 + sets))
            for name, launcher, sets in (("one", ONE, []), ("two", TORCHRUN, []), ("fsdp", TORCHRUN, FSDP1))}


@pytest.fixture(scope="module")
def stage2(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The whole tower trains, read at its last block: its final norm is unused, which DDP
    used to take for an error. Micro-batches (grad_accum 2) with different numbers of answer
    tokens must weigh as in one process's mean over the global batch."""
    runs = tmp_path_factory.mktemp("stage2")
    return {name: (runs / name, train(launcher, "vlm", runs / name, STAGE2 + sets))
            for name, launcher, sets in (("one", ONE, []), ("two", TORCHRUN, []), ("fsdp", TORCHRUN, FSDP2))}


def test_stage1_on_two_processes_equals_one(stage1):
    (one, one_output), (two, two_output) = stage1["one"], stage1["two"]
    assert_same_losses(losses(one / "metrics.jsonl"), losses(two / "metrics.jsonl"))
    assert_same_weights(one / "model", two / "model")
    # One vocabulary for both ranks and for the single process: the same file, byte for byte.
    assert (one / "tokenizer" / "tokenizer.json").read_bytes() == (two / "tokenizer" / "tokenizer.json").read_bytes()
    # Only rank 0 talks: one status report, one set of log lines.
    assert one_output.stdout.count('"status"') == two_output.stdout.count('"status"') == 1
    assert two_output.stderr.count("[vlmkit] saved") == 1


def test_stage2_on_two_processes_equals_one_with_the_tower_trained(stage2):
    (one, _), (two, _) = stage2["one"], stage2["two"]
    for phase in ("align", "instruct"):
        assert_same_losses(losses(one / phase / "metrics.jsonl"), losses(two / phase / "metrics.jsonl"))
    assert_same_weights(one / "model", two / "model")


def test_fsdp_shards_the_weights_and_still_equals_one_process(stage1, stage2):
    for run in (stage1, stage2):
        (one, _), (fsdp, output) = run["one"], run["fsdp"]
        held, total = _sharded_share(output.stderr)
        assert 0.4 * total < held < 0.6 * total   # each of two ranks holds about half
        for metrics in sorted(one.rglob("metrics.jsonl")):
            if metrics.parent.name != "model" and "checkpoints" not in metrics.parts:
                assert_same_losses(losses(metrics), losses(fsdp / metrics.relative_to(one)))
        assert_same_weights(one / "model", fsdp / "model")
    # Every rank's evaluation and the saved checkpoint see the gathered weights, not a shard.
    assert "eval/" in (stage1["fsdp"][0] / "metrics.jsonl").read_text()


def _sharded_share(log: str) -> tuple[int, int]:
    found = re.search(r"FSDP: this process holds ([\d,]+) of ([\d,]+) weights", log)
    assert found, log[-2000:]
    return int(found[1].replace(",", "")), int(found[2].replace(",", ""))


def _cut_back_to(run: Path, phase: Path, step: int) -> None:
    """What a kill just after checkpoint `step` of `phase` leaves: later checkpoints and the models gone."""
    for later in (phase / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    for model in {run / "model", phase / "model"}:
        shutil.rmtree(model, ignore_errors=True)


def finish_from(saved: Path, run: Path, phase: str, step: int, launcher: list[str], kind: str, sets: list[str],
                *flags: str) -> Path:
    """A copy of run `saved`, cut back to checkpoint `step` of `phase` ("" for Stage 1), then
    finished by `launcher`."""
    shutil.copytree(saved, run)
    _cut_back_to(run, run / phase, step)
    train(launcher, kind, run, sets, *flags)
    return run


def assert_same_run(a: Path, b: Path, phase: str = "") -> None:
    assert_same_losses(losses(a / phase / "metrics.jsonl"), losses(b / phase / "metrics.jsonl"))
    assert_same_weights(a / "model", b / "model")


def test_checkpoints_resume_across_world_sizes(stage1, stage2, tmp_path):
    """Stage 1 saved by two processes finishes in one; Stage 2 saved by one finishes in two."""
    run = finish_from(stage1["two"][0], tmp_path / "two-then-one", "", 3, ONE, "clip", STAGE1)
    assert_same_run(stage1["one"][0], run)
    run = finish_from(stage2["one"][0], tmp_path / "one-then-two", "instruct", 2, TORCHRUN, "vlm", STAGE2)
    assert_same_run(stage2["one"][0], run, "instruct")


def test_checkpoints_move_between_fsdp_and_one_process(stage1, stage2, tmp_path):
    """A sharded run's checkpoint holds whole weights and name-keyed optimizer state: one
    process finishes it, and an FSDP run finishes a single process's checkpoint."""
    run = finish_from(stage1["fsdp"][0], tmp_path / "fsdp-then-one", "", 3, ONE, "clip", STAGE1, "--resume")
    assert_same_run(stage1["one"][0], run)
    run = finish_from(stage2["one"][0], tmp_path / "one-then-fsdp", "instruct", 2, TORCHRUN, "vlm",
                      STAGE2 + FSDP2, "--resume")
    assert_same_run(stage2["one"][0], run, "instruct")


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*TORCHRUN, "train", "clip", "--preset", "tiny", "--out", str(tmp_path / "odd"),
                             "--set", *STAGE1, "train.batch_size=33"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode != 0
    assert "train.batch_size 33 does not divide among 2 processes" in result.stderr


def test_shard_streams_resume_on_every_rank_at_their_sample(tmp_path):
    """Each rank reads its own shards and keeps its own position; a checkpoint holds both."""
    shards = tmp_path / "shards"
    subprocess.run([*ONE, "data", "pack", "shapes", str(shards), "--limit", "256", "--shard-size", "32",
                    "--set", "image_size=48"], check=True, capture_output=True)
    sets = STAGE1 + [f"data.shards={shards}", "data.workers=1"]
    train(TORCHRUN, "clip", tmp_path / "whole", sets)
    run = finish_from(tmp_path / "whole", tmp_path / "cut", "", 3, TORCHRUN, "clip", sets)
    a, b = load_file(tmp_path / "whole" / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "whole" / "metrics.jsonl") == losses(run / "metrics.jsonl")
