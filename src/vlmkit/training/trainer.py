"""The training loop shared by every recipe.

It knows nothing of models or data: a recipe hands it a model, a function that builds
the batch for (step, micro_step), a loss function, an evaluation function and a save
function (`run.checkpoint_saver`). Batches are a pure function of the step, so a resumed run sees exactly the
data an uninterrupted run would have seen, and reaches the same loss.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from vlmkit.checkpoint import latest_checkpoint, load_trainer_state, load_weights
from vlmkit.config import TrainConfig
from vlmkit.runtime import default_device, resolve_precision
from vlmkit.training import distributed

logger = logging.getLogger(__name__)
LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to min_lr_ratio of the peak."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, embeddings tables of 1-D shape and the logit scale/bias."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        cfg: TrainConfig,
        out_dir: str | Path,
        batch_fn: Callable[[int, int], Any],
        loss_fn: LossFn,
        save_fn: Callable[[Path, dict | None, Path | None], None],
        eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
        device: torch.device | None = None,
        groups: Callable[[torch.nn.Module], list[dict]] | None = None,
        data: Any = None,
    ):
        self.model, self.cfg, self.out_dir = model, cfg, Path(out_dir)
        # A data stream with a position to keep (a shard stream: `state_dict`/`load_state_dict`),
        # saved per rank in each checkpoint; in-memory data needs none (batches follow the step).
        self.data = data
        self.batch_fn, self.loss_fn, self.save_fn, self.eval_fn = batch_fn, loss_fn, save_fn, eval_fn
        self.device = device or default_device()
        # What the loop runs: `model`, DDP around it, or (FSDP) a sharded copy; `model` is what
        # the recipe saves and evaluates, kept up to date from the copy by `_sync_model`.
        self.wrapped = distributed.wrap_model(model, cfg.distributed)
        self.sharded = distributed.is_sharded(self.wrapped)
        self.trained = self.wrapped if self.sharded else model   # whose parameters the optimizer steps
        if self.sharded:
            held = sum(distributed.local_size(p) for p in self.wrapped.parameters())
            self.log(f"FSDP: this process holds {held:,} of {sum(p.numel() for p in model.parameters()):,} weights")
        # `groups` lets a recipe give parts of the model their own learning rate.
        # Fused: one kernel updates every tensor, instead of a dozen elementwise passes each.
        chosen = groups(self.trained) if groups is not None else param_groups(self.trained, cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(chosen, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-6, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.step = 0
        self.synced_at: int | None = None   # the step `model` was last brought up to date at (FSDP)
        self.stop_requested = False
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.checkpoint_dir = self.out_dir / "checkpoints"

    # ---- state -----------------------------------------------------------------
    def state(self) -> dict:
        """What a checkpoint needs besides the weights. Every rank calls it: a sharded optimizer
        state and the ranks' data positions are gathered to rank 0."""
        state = {
            "step": self.step,
            # Keyed by parameter name and whole, so it resumes at any world size, DDP or FSDP.
            "optimizer": distributed.optimizer_state(self.trained, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        if self.data is not None:
            state["data"] = distributed.gather_objects(self.data.state_dict())
        return state

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint under out_dir, if any.

        Without one, the run starts at step 0, and log lines an earlier, killed attempt wrote
        before its first checkpoint are dropped, so no step is logged twice.
        """
        last = latest_checkpoint(self.checkpoint_dir)
        state = load_trainer_state(last) if last is not None else None
        if state is None:
            self._truncate_metrics(0)
            return False
        load_weights(self.model, last)
        if self.sharded:
            distributed.copy_from(self.wrapped, self.model)
        distributed.load_optimizer_state(self.trained, self.optimizer, state["optimizer"])
        if self.data is not None:
            if len(state["data"]) != distributed.world_size():
                raise ValueError(f"{last} was saved by {len(state['data'])} processes reading a data stream; "
                                 f"resume it with as many (this run has {distributed.world_size()})")
            self.data.load_state_dict(state["data"][distributed.rank()])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self._truncate_metrics(self.step)
        self.log(f"resumed from {last} at step {self.step}")
        return True

    def save(self) -> Path | None:
        self._sync_model()     # gathering sharded weights, optimizer and data state takes every rank
        state = self.state()
        if not distributed.is_main():
            return None
        path = self.checkpoint_dir / f"step-{self.step:07d}"
        self.save_fn(path, state, self.metrics_path)
        old = sorted(p for p in self.checkpoint_dir.glob("step-*") if p.is_dir())[: -self.cfg.keep_checkpoints]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
        return path

    # ---- logging ---------------------------------------------------------------
    def log(self, message: str) -> None:
        if distributed.is_main():
            logger.info(message)

    def record(self, entry: dict[str, Any]) -> None:
        if distributed.is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """After a resume, drop log lines written past the checkpoint so curves don't repeat."""
        if not self.metrics_path.exists() or not distributed.is_main():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    # ---- the loop --------------------------------------------------------------
    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True
        self.log(f"signal {signum}: saving a checkpoint after this step")

    def _sync_model(self) -> None:
        """`model` made equal to the sharded copy the loop trains (collective)."""
        if self.sharded and self.synced_at != self.step:
            distributed.copy_into(self.model, self.wrapped)
            self.synced_at = self.step

    def _train_mode(self, training: bool) -> None:
        self.model.train(training)
        self.wrapped.train(training)

    def evaluate(self) -> dict[str, float]:
        """Rank 0 measures; the other ranks get {}. Every rank calls it (a sharded run gathers first)."""
        if self.eval_fn is None:
            return {}
        self._sync_model()
        if not distributed.is_main():
            return {}
        self._train_mode(False)
        with torch.no_grad(), self.autocast():
            results = self.eval_fn(self.model)
        self._train_mode(True)
        self.record({"step": self.step, **{f"eval/{k}": v for k, v in results.items()}})
        return results

    def autocast(self):
        if resolve_precision(self.cfg.precision, self.device) == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def fit(self) -> str:
        """Train to cfg.steps; returns "done" or "interrupted" (a checkpoint was saved)."""
        cfg = self.cfg
        handlers = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._request_stop)
        except ValueError:  # not the main thread: signals stay with the caller
            pass
        self._train_mode(True)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not distributed.is_main(),
                   dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30)  # logs stay short
        started, seen = time.perf_counter(), 0
        try:
            while self.step < cfg.steps:
                logs = self.train_step()
                self.step += 1
                seen += 1
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    elapsed = time.perf_counter() - started
                    self.record({"step": self.step, "lr": self.scheduler.get_last_lr()[0],
                                 "steps_per_s": seen / max(elapsed, 1e-9), **logs})
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self.log(f"step {self.step}: {format_metrics(self.evaluate())}")
                    distributed.barrier()   # the other ranks wait for rank 0 rather than run ahead
                if distributed.any_rank(self.stop_requested):
                    self.save()
                    return "interrupted"
                if self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save()
        finally:
            bar.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        self.save()
        return "done"   # (a sharded run's `model` holds the final weights: save() synced it)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over cfg.grad_accum micro-batches on every rank.

        The gradient is the mean of the micro-batch losses' gradients over micro-batches and
        ranks (DDP averages over ranks), so a recipe whose loss is a mean over a global
        quantity scales each micro-batch's share to suit (see instruct.py's answer loss).
        """
        cfg = self.cfg
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = self.batch_fn(self.step, micro)
            last = micro == cfg.grad_accum - 1
            with self._gradient_sync(last):
                with self.autocast():
                    loss, logs = self.loss_fn(self.wrapped, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at step {self.step}; lower train.lr?")
                (loss / cfg.grad_accum).backward()
            for k, v in {"loss": loss.item(), **logs}.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
        totals = distributed.mean_over_ranks(totals)   # what is logged is the whole step's, not rank 0's share
        if self.sharded:
            distributed.average_unsharded_gradients(self.wrapped)
        if cfg.clip_grad > 0 and self.sharded:
            totals["grad_norm"] = distributed.clip_sharded_gradients(self.wrapped, cfg.clip_grad)
        elif cfg.clip_grad > 0:
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return totals

    def _gradient_sync(self, last: bool):
        """Gradients are exchanged between ranks once per step, after the last micro-batch."""
        if self.wrapped is self.model or last:
            return nullcontext()
        if self.sharded:
            return _fsdp_no_sync(self.wrapped)
        return self.wrapped.no_sync()


@contextmanager
def _fsdp_no_sync(module) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def format_metrics(results: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in results.items() if isinstance(v, (int, float)))
