"""A run killed with SIGKILL at any moment, rerun with the same command, ends bit for bit
where an uninterrupted run ends.

Two kinds of kill, on the real command line: at random steps (as soon as the metrics log
shows the step: mid-training, between checkpoints), and inside a checkpoint write (a
wrapper kills the process in the middle of its N-th atomic write, after the files are
written and before they are swapped in). After every kill the partial write must never be
loaded, the metrics log must hold each step once, and no temporary folder may be left behind.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

STAGE1 = ["train.steps=12", "train.batch_size=32", "train.log_every=1", "train.save_every=2", "train.eval_every=4",
          "data.train_size=256", "data.eval_size=32"]
STAGE2 = ["data.train_size=64", "data.eval_size=8", "align.train.steps=4", "align.train.batch_size=8",
          "align.train.log_every=1", "align.train.save_every=2", "instruct.train.steps=6",
          "instruct.train.batch_size=8", "instruct.train.log_every=1", "instruct.train.save_every=2"]

# Runs the CLI, but SIGKILLs itself inside its N-th atomic directory write (KILL_IN_WRITE=N):
# the new files are complete in their temporary folder and not yet moved into place.
KILL_IN_WRITE = """
import os, signal, sys
import vlmkit.checkpoint as checkpoint
count, target, fsync = [0], int(os.environ["KILL_IN_WRITE"]), checkpoint._fsync_tree
def fsync_then_die(path):
    fsync(path)
    count[0] += 1
    if count[0] == target:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint._fsync_tree = fsync_then_die
from vlmkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def command(kind: str, out: Path, sets: list[str]) -> list[str]:
    return ["train", kind, "--preset", "tiny", "--out", str(out), "--set", *sets]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}   # one thread: the same arithmetic in every run


def run_to_end(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "vlmkit", *args], capture_output=True, text=True, env=env(),
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


def kill_steps_later(args: list[str], phase: Path, steps: int, later: int) -> bool:
    """Start the command and SIGKILL it as soon as its metrics log the step `later` steps past the
    phase's newest checkpoint (where it resumes); False if the phase is done or the run ends first."""
    done = [int(p.name.split("-")[1]) for p in (phase / "checkpoints").glob("step-*")]
    target = max(done, default=0) + later
    if target > steps or (phase / "model").is_dir():
        return False
    process = subprocess.Popen([sys.executable, "-m", "vlmkit", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env())
    metrics = phase / "metrics.jsonl"
    while process.poll() is None:
        if metrics.is_file() and target in logged_steps(metrics):
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.01)
    return False


def kill_in_write(args: list[str], n: int) -> bool:
    """Run the command, killed inside its n-th atomic write; False if it finished first."""
    result = subprocess.run([sys.executable, "-c", KILL_IN_WRITE, *args], capture_output=True, text=True,
                            env={**env(), "KILL_IN_WRITE": str(n)}, timeout=900)
    if result.returncode == 0:
        return False
    assert result.returncode == -signal.SIGKILL, result.stderr[-4000:]
    return True


def logged_steps(metrics: Path) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in line]


def assert_identical(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def no_leftovers(run: Path) -> None:
    left = [p for p in run.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not left, left


def _kill_repeatedly(kind: str, sets: list[str], phases: dict[str, int], tmp_path: Path,
                     seed: int) -> tuple[Path, Path, int]:
    """An uninterrupted run, and the same command killed at random steps of each phase and inside
    its 2nd, 1st, 3rd and 5th atomic writes (the tokenizer, checkpoints, phase models, the final
    model), each kill followed by a rerun that resumes; then run to the end. Returns the two
    run folders and how many kills landed."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_to_end(command(kind, straight, sets))
    args = command(kind, killed, sets)
    rng = random.Random(seed)
    kills = 0
    # First inside the first checkpoint's write (the tokenizer is the 1st): no complete
    # checkpoint exists yet, only its folder, and the rerun must start from scratch, all of it.
    for n in (2, 1, 3, 5):
        kills += kill_in_write(args, n)
        for folder, steps in phases.items():
            kills += kill_steps_later(args, killed / folder, steps, rng.randint(1, 3))
    run_to_end(args)
    return straight, killed, kills


def test_stage1_killed_anywhere_ends_bit_for_bit_equal(tmp_path):
    straight, killed, kills = _kill_repeatedly("clip", STAGE1, {".": 12}, tmp_path, seed=1)
    assert kills >= 6, kills
    assert_identical(straight / "model", killed / "model")
    assert logged_steps(killed / "metrics.jsonl") == logged_steps(straight / "metrics.jsonl") == list(range(1, 13))
    assert (killed / "tokenizer" / "tokenizer.json").read_bytes() == \
           (killed / "model" / "tokenizer.json").read_bytes()
    no_leftovers(killed)


def test_stage2_killed_anywhere_in_both_phases_ends_bit_for_bit_equal(tmp_path):
    straight, killed, kills = _kill_repeatedly("vlm", STAGE2, {"align": 4, "instruct": 6}, tmp_path, seed=2)
    assert kills >= 6, kills
    assert_identical(straight / "model", killed / "model")
    for phase, steps in (("align", 4), ("instruct", 6)):
        assert logged_steps(killed / phase / "metrics.jsonl") == list(range(1, steps + 1))
    no_leftovers(killed)
