"""Stage 1 recipe: train a CLIP-style dual encoder with a contrastive loss.

Data -> tokenizer -> model (optionally with a pretrained, locked text tower: LiT) ->
Trainer -> final checkpoint. Evaluation and pictures are hooks the caller attaches
(`vlmkit.evaluation.clip_eval.ClipHooks`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from vlmkit.config import ClipRunConfig
from vlmkit.data.augment import AUGMENTATIONS
from vlmkit.data.images import ImageTransform
from vlmkit.data.prepared import prepare
from vlmkit.data.sources import source_for
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.losses import infonce_loss, siglip_loss
from vlmkit.models.dual_encoder import DualEncoder
from vlmkit.training import distributed
from vlmkit.training.batches import BatchPlan
from vlmkit.training.run import (RunHooks, RunResult, TrainedModel, checkpoint_saver, finish_run, run_tokenizer,
                                 start_run, write_run_config)
from vlmkit.training.trainer import Trainer

log = logging.getLogger(__name__)


def train_clip(cfg: ClipRunConfig, out_dir: str | Path, existing: str = "continue",
               hooks: RunHooks | None = None) -> RunResult:
    """Train to cfg.train.steps in `out_dir`; a run already there resumes (see run.start_run's `existing`)."""
    out_dir = Path(out_dir)
    device = start_run(cfg.train.seed, out_dir, existing)
    transform = ImageTransform.for_data(cfg.data, cfg.model.vision.image_size)

    # ---- data
    train_source = source_for(cfg.data, cfg.data.train_split, cfg.data.train_size)
    train = prepare(train_source, transform, limit=cfg.data.train_size, max_bad_fraction=cfg.data.max_bad_fraction,
                    desc="train data")
    if cfg.data.keep_classes is not None:
        keep = [i for i, c in enumerate(train_source.classes or []) if c in cfg.data.keep_classes]
        if not keep:
            raise ValueError(f"data.keep_classes {cfg.data.keep_classes} matches none of {train_source.classes}")
        train = train.subset(torch.isin(train.labels, torch.tensor(keep)))
    if train.skipped:
        log.warning(f"skipped {train.skipped} unreadable training images")

    # ---- tokenizer and model (a pretrained text tower fixes both the text config and the vocabulary)
    model_cfg = cfg.model
    text_state = None
    if cfg.train.text_init:
        from vlmkit.convert.bert import load_bert

        text_cfg, text_state, tokenizer = load_bert(cfg.train.text_init, cfg.model.text.max_length)
        model_cfg = model_cfg.replace(text=text_cfg.to_dict())
    else:
        tokenizer = run_tokenizer(out_dir, lambda: Tokenizer.train(
            train.captions, kind="wordpiece", vocab_size=model_cfg.text.vocab_size), Tokenizer.from_pretrained)
        model_cfg = model_cfg.replace(text={**model_cfg.text.to_dict(), "vocab_size": tokenizer.vocab_size})
    model = DualEncoder(model_cfg)
    if text_state is not None:
        model.text.load_state_dict(text_state)
    model.text.requires_grad_(not cfg.train.lock_text)
    model.vision.requires_grad_(not cfg.train.lock_vision)
    model.to(device)

    ids, mask = tokenizer.encode(train.captions, max_length=model_cfg.text.max_length)
    text_cache = _locked_text_features(model, ids, mask, device) if cfg.train.lock_text else None
    neg_ids = neg_mask = neg_cache = None
    if cfg.train.hard_negatives:
        rows = train.rows.tolist() if train.rows is not None else range(len(train))
        negatives = [train_source.hard_negative_caption(int(r)) for r in rows]
        neg_ids, neg_mask = tokenizer.encode(negatives, max_length=model_cfg.text.max_length)
        neg_cache = _locked_text_features(model, neg_ids, neg_mask, device) if cfg.train.lock_text else None
    plan = BatchPlan(len(train), cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seed)
    augment = AUGMENTATIONS.get(cfg.train.augment)
    caption_ids = _caption_ids(train.captions) if cfg.train.dedupe_captions else None

    def batch_fn(step: int, micro: int):
        rows = plan(step, micro)
        pixels = train.pixels(rows)
        if augment is not None:  # seeded by the step, so a resumed run sees the same batches
            seed = np.random.SeedSequence([cfg.train.seed, step, micro, distributed.rank()]).generate_state(1)[0]
            rng = torch.Generator().manual_seed(int(seed))
            pixels = augment(pixels, rng)
        batch = {"pixels": pixels.to(device)}
        if caption_ids is not None:
            batch["caption_ids"] = caption_ids[rows].to(device)
        if text_cache is not None:
            batch["text_pooled"] = text_cache[rows].to(device)
            if neg_cache is not None:
                batch["text_pooled"] = torch.cat([batch["text_pooled"], neg_cache[rows].to(device)])
        else:
            # Hard negatives go through the text tower in the same forward call as the captions.
            b_ids, b_mask = (ids[rows], mask[rows]) if neg_ids is None else (
                torch.cat([ids[rows], neg_ids[rows]]), torch.cat([mask[rows], neg_mask[rows]]))
            width = int(b_mask.sum(1).max())  # trim padding to the longest caption in the batch
            batch["ids"], batch["mask"] = b_ids[:, :width].to(device), b_mask[:, :width].to(device)
        return batch

    def loss_fn(net, batch):
        image, text, scale, bias = net(batch["pixels"], batch.get("ids"), batch.get("mask"),
                                       text_pooled=batch.get("text_pooled"))
        scale = scale.float()
        ids = batch.get("caption_ids")
        text, negatives = text[: len(image)], (text[len(image):] if cfg.train.hard_negatives else None)
        if model_cfg.loss == "siglip":
            loss = siglip_loss(image, text, scale, bias, ids, negatives)
        else:
            loss = infonce_loss(image, text, scale, ids, negatives)
        return loss, {"logit_scale": scale.item()}

    run_config = {**cfg.to_dict(), "model": model_cfg.to_dict()}
    trained = TrainedModel(model, tokenizer, transform, cfg.replace(model=model_cfg.to_dict()), out_dir, device)
    save = checkpoint_saver(model, "dual_encoder", model_cfg.to_dict(), tokenizer, transform, run_config)
    eval_fn = (lambda net: hooks.evaluate(trained)) if hooks is not None else None
    trainer = Trainer(model, cfg.train, out_dir, batch_fn, loss_fn, save, eval_fn, device)
    write_run_config(out_dir, run_config, existing)
    trainer.resume()
    if trainer.fit() != "done":
        return RunResult(out_dir / "model", {}, "interrupted")
    return finish_run(trained, hooks, save, trainer.metrics_path, evaluate=trainer.evaluate)


def _caption_ids(captions: list[str]) -> torch.Tensor:
    """One integer per caption, equal for identical captions."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(c, len(index)) for c in captions], dtype=torch.long)


@torch.no_grad()
def _locked_text_features(model: DualEncoder, ids: torch.Tensor, mask: torch.Tensor, device) -> torch.Tensor:
    """A locked text tower maps each caption to a fixed vector: compute each distinct caption once."""
    rows = {}
    keys = [tuple(r[: int(m.sum())].tolist()) for r, m in zip(ids, mask)]
    for key in keys:
        rows.setdefault(key, len(rows))
    unique = list(rows)
    model.text.eval()
    pooled = []
    for i in range(0, len(unique), 256):
        chunk = unique[i: i + 256]
        width = max(map(len, chunk))
        u_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        u_mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, key in enumerate(chunk):
            u_ids[j, : len(key)] = torch.tensor(key)
            u_mask[j, : len(key)] = 1
        u_ids, u_mask = u_ids.to(device), u_mask.to(device)
        pooled.append(model.pool_text(model.text(u_ids, u_mask), u_mask).float().cpu())
    table = torch.cat(pooled)
    return table[torch.tensor([rows[k] for k in keys])]
