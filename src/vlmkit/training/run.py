"""What every recipe does around its training loop: set up, save, and hand over to hooks.

A recipe (`contrastive.py`, `instruct.py`) builds data, model and loss; this module holds
the rest. Measurement and pictures live above training (`vlmkit.evaluation`), so a recipe
never imports them: the caller (the CLI, the demo, a benchmark, a test) attaches them as
`RunHooks`. The final model is saved before any hook runs, so a metric that fails cannot
lose the trained weights.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from vlmkit.checkpoint import atomic_dir, recover_partial_writes, save_checkpoint
from vlmkit.data.images import ImageTransform
from vlmkit.runtime import default_device
from vlmkit.training import distributed

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a recipe returns: where the final model is, what the hooks measured, and
    "done" or "interrupted" (a checkpoint was saved; the same call resumes)."""

    model_dir: Path
    results: dict
    status: str


@dataclass
class TrainedModel:
    """What hooks see of a run: the model and how to feed it, where the run writes."""

    model: torch.nn.Module
    tokenizer: Any
    transform: ImageTransform
    config: Any          # the run config, with what set-up resolved (vocabulary, vision tower...)
    out_dir: Path
    device: torch.device
    progress: bool = True


class RunHooks:
    """Attached by the caller; the defaults measure and draw nothing."""

    def evaluate(self, run: TrainedModel) -> dict[str, float]:
        """Figures for the training log, every `train.eval_every` steps."""
        return {}

    def finish(self, run: TrainedModel, results: dict) -> dict:
        """After the final model is saved: the final evaluation, reports and pictures.
        `results` holds the recipe's last `evaluate` figures, if it took them; returns the
        results the recipe hands back (and writes to results.json)."""
        return results


# What a rerun may change with `existing="resume"` (the CLI's --resume): how long to train,
# how often to log, evaluate and save, and DDP or FSDP (their checkpoints are the same files).
# Anything else would make the resumed run a different run from the one its checkpoints come from.
SAFE_ON_RESUME = ("steps", "log_every", "eval_every", "save_every", "keep_checkpoints", "distributed")
EXISTING = ("continue", "resume", "overwrite")


class RunConfigChanged(ValueError):
    """A rerun into an existing run folder asked for a different config."""


def start_run(seed: int, out_dir: Path, existing: str = "continue") -> torch.device:
    """Join the torchrun group if there is one, get OUT ready, seed, and pick this process's device.

    existing: what to do with a run already in `out_dir`. "continue" resumes it if the config
    is the same (a different one is an error, see `write_run_config`); "resume" also accepts
    changes to SAFE_ON_RESUME keys; "overwrite" deletes it and starts again.
    """
    if existing not in EXISTING:
        raise ValueError(f"existing={existing!r}: choose one of {', '.join(EXISTING)}")
    distributed.init_distributed()
    if distributed.is_main():
        if existing == "overwrite" and out_dir.is_dir() and any(out_dir.iterdir()):
            if not (out_dir / "run_config.json").is_file():
                raise ValueError(f"--overwrite: {out_dir} has files but no run_config.json, so it is not a vlmkit "
                                 f"run folder; nothing was deleted")
            shutil.rmtree(out_dir)
            log.info(f"deleted the earlier run in {out_dir}")
        recover_partial_writes(out_dir)   # no other process writes here yet
    distributed.barrier()
    torch.manual_seed(seed)
    return default_device()


def run_tokenizer(out_dir: Path, train: Callable[[], Any], load: Callable[[Path], Any]):
    """The run's own tokenizer, trained once and kept in `OUT/tokenizer/`.

    Training is deterministic, but one vocabulary is also one file: a resumed run and every
    torchrun rank read the one the main process trained at the start, so no change to the
    data or the library between runs can give a run two vocabularies.
    """
    saved = out_dir / "tokenizer"
    fresh = None
    if distributed.is_main() and not (saved / "tokenizer.json").is_file():
        fresh = train()
        with atomic_dir(saved) as tmp:
            fresh.save(tmp)
    distributed.barrier()
    return fresh if fresh is not None else load(saved)


def write_run_config(out_dir: Path, run_config: dict, existing: str = "continue") -> None:
    """`OUT/run_config.json`: the whole resolved config, so `--config` repeats the run.

    A run already in `out_dir` must have asked for the same config, or it would resume the old
    run (its weights, optimizer and learning-rate schedule) under a file that says otherwise:
    a difference is a RunConfigChanged naming the keys, unless every differing key is one
    of SAFE_ON_RESUME and `existing` is "resume".
    """
    saved_file = out_dir / "run_config.json"
    if saved_file.is_file():
        # Compared as JSON has them (a tuple is a list there).
        changed = config_changes(json.loads(saved_file.read_text()), json.loads(json.dumps(run_config)))
        unsafe = [key for key in changed if key.rsplit(".", 1)[-1] not in SAFE_ON_RESUME]
        if changed and (existing != "resume" or unsafe):
            what = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
            fix = ("--resume continues it with the new values" if not unsafe else
                   f"only {', '.join(f'*.{k}' for k in SAFE_ON_RESUME)} may change in a resumed run")
            raise RunConfigChanged(f"{out_dir} holds a run with another config ({what}). Use another --out, or "
                                   f"--overwrite to delete that run and start again; {fix}")
        if changed:
            log.info(f"resuming with changed {', '.join(changed)}")
    distributed.barrier()   # every rank has read the old file before rank 0 replaces it
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "run_config.json").write_text(json.dumps(run_config, indent=2) + "\n")


def config_changes(old: dict, new: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old value, new value) for every leaf that differs."""
    changes = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.update(config_changes(a, b, f"{prefix}{key}."))
        elif a != b:
            changes[f"{prefix}{key}"] = (a, b)
    return changes


def checkpoint_saver(model: torch.nn.Module, kind: str, model_config: dict, tokenizer, transform: ImageTransform,
                     run_config: dict) -> Callable[[Path, dict | None, Path | None], None]:
    """save(path, trainer_state, metrics_file): a complete, loadable checkpoint directory,
    written atomically, with the run config beside the weights."""

    def save(path: Path, state: dict | None = None, metrics: Path | None = None) -> None:
        extra = {"metrics.jsonl": metrics} if metrics is not None else None
        save_checkpoint(path, model, kind, model_config, tokenizer, transform.to_dict(), state, extra_files=extra,
                        run_config=run_config)

    return save


def finish_run(run: TrainedModel, hooks: RunHooks | None, save: Callable[..., None], metrics: Path | None = None,
               evaluate: Callable[[], dict] | None = None) -> RunResult:
    """Save the final model, then measure it (`evaluate`: the trainer's last evaluation, logged
    with the metrics) and let the hooks report and draw."""
    model_dir = run.out_dir / "model"
    results: dict = {}
    if distributed.is_main():
        save(model_dir, None, metrics)
        log.info(f"saved {model_dir}")
        if hooks is not None:
            results = evaluate() if evaluate is not None else {}
            run.model.eval()
            results = hooks.finish(run, results)
            (run.out_dir / "results.json").write_text(json.dumps(results, indent=2, default=_jsonable) + "\n")
    return RunResult(model_dir, results, "done")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
