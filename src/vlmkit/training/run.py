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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from vlmkit.checkpoint import atomic_dir, save_checkpoint
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


def start_run(seed: int) -> torch.device:
    """Join the torchrun group if there is one, seed, and pick this process's device."""
    distributed.init_distributed()
    torch.manual_seed(seed)
    return default_device()


def run_tokenizer(out_dir: Path, resume: bool, train: Callable[[], Any], load: Callable[[Path], Any]):
    """The run's own tokenizer, trained once and kept in `OUT/tokenizer/`.

    Training one again is not the same tokenizer: the `tokenizers` trainers break ties in hash
    order, which changes from process to process. So a resumed run (a new process) and every
    torchrun rank read the vocabulary the main process trained at the start.
    """
    saved = out_dir / "tokenizer"
    fresh = None
    if distributed.is_main() and not (resume and (saved / "tokenizer.json").is_file()):
        fresh = train()
        with atomic_dir(saved) as tmp:
            fresh.save(tmp)
    distributed.barrier()
    return fresh if fresh is not None else load(saved)


def write_run_config(out_dir: Path, run_config: dict) -> None:
    """`OUT/run_config.json`: the whole resolved config, so `--config` repeats the run."""
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "run_config.json").write_text(json.dumps(run_config, indent=2) + "\n")


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
