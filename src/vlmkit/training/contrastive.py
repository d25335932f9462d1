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
from vlmkit.data.shards import ShardIndex, ShardStream
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

    # ---- data: decoded into memory, or streamed from shards
    stream = train = None
    if cfg.data.shards:
        stream = _shard_stream(cfg, transform)
        captions = stream.index.captions()
    else:
        train_source = source_for(cfg.data, cfg.data.train_split, cfg.data.train_size)
        train = prepare(train_source, transform, limit=cfg.data.train_size,
                        max_bad_fraction=cfg.data.max_bad_fraction, desc="train data")
        if cfg.data.keep_classes is not None:
            keep = [i for i, c in enumerate(train_source.classes or []) if c in cfg.data.keep_classes]
            if not keep:
                raise ValueError(f"data.keep_classes {cfg.data.keep_classes} matches none of {train_source.classes}")
            train = train.subset(torch.isin(train.labels, torch.tensor(keep)))
        if train.skipped:
            log.warning(f"skipped {train.skipped} unreadable training images")
        captions = train.captions

    # ---- tokenizer and model (a pretrained text tower fixes both the text config and the vocabulary)
    model_cfg = cfg.model
    text_state = None
    if cfg.train.text_init:
        from vlmkit.convert.bert import load_bert

        text_cfg, text_state, tokenizer = load_bert(cfg.train.text_init, cfg.model.text.max_length)
        model_cfg = model_cfg.replace(text=text_cfg.to_dict())
    else:
        tokenizer = run_tokenizer(out_dir, lambda: Tokenizer.train(
            captions, kind="wordpiece", vocab_size=model_cfg.text.vocab_size), Tokenizer.from_pretrained)
        model_cfg = model_cfg.replace(text={**model_cfg.text.to_dict(), "vocab_size": tokenizer.vocab_size})
    model = DualEncoder(model_cfg)
    if text_state is not None:
        model.text.load_state_dict(text_state)
    model.text.requires_grad_(not cfg.train.lock_text)
    model.vision.requires_grad_(not cfg.train.lock_vision)
    model.to(device)

    augment = AUGMENTATIONS.get(cfg.train.augment)
    caption_index = _caption_index(captions) if cfg.train.dedupe_captions else None
    max_length = model_cfg.text.max_length
    if stream is not None:
        def batch_fn(step: int, micro: int):
            read = stream.next(step * cfg.train.grad_accum + micro)
            batch = _text_batch(tokenizer.encode(read["captions"], max_length=max_length), device)
            batch["pixels"] = _augmented(stream.normalise(read["images"]), augment, cfg.train.seed, step, micro).to(device)
            if caption_index is not None:
                batch["caption_ids"] = torch.tensor([caption_index[c] for c in read["captions"]]).to(device)
            return batch
    else:
        batch_fn = _memory_batches(cfg, model, train, train_source, tokenizer, caption_index, augment, device)

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
    trainer = Trainer(model, cfg.train, out_dir, batch_fn, loss_fn, save, eval_fn, device, data=stream)
    write_run_config(out_dir, run_config, existing)
    trainer.resume()
    status = trainer.fit()
    if stream is not None:
        skipped = distributed.gather_objects(sum(stream.bad))
        if any(skipped):
            log.warning(f"skipped streamed samples that could not be read, per rank: {skipped}")
    if status != "done":
        return RunResult(out_dir / "model", {}, "interrupted")
    return finish_run(trained, hooks, save, trainer.metrics_path, evaluate=trainer.evaluate)


def _memory_batches(cfg: ClipRunConfig, model: DualEncoder, train, train_source, tokenizer,
                    caption_index: dict[str, int] | None, augment, device):
    """batch_fn over decoded data: each step's rows are a pure function of the step (BatchPlan)."""
    model_cfg = model.cfg
    ids, mask = tokenizer.encode(train.captions, max_length=model_cfg.text.max_length)
    text_cache = _locked_text_features(model, ids, mask, device) if cfg.train.lock_text else None
    neg_ids = neg_mask = neg_cache = None
    if cfg.train.hard_negatives:
        rows = train.rows.tolist() if train.rows is not None else range(len(train))
        negatives = [train_source.hard_negative_caption(int(r)) for r in rows]
        neg_ids, neg_mask = tokenizer.encode(negatives, max_length=model_cfg.text.max_length)
        neg_cache = _locked_text_features(model, neg_ids, neg_mask, device) if cfg.train.lock_text else None
    plan = BatchPlan(len(train), cfg.train.batch_size, cfg.train.grad_accum, cfg.train.seed)
    caption_ids = None if caption_index is None else torch.tensor([caption_index[c] for c in train.captions])

    def batch_fn(step: int, micro: int):
        rows = plan(step, micro)
        batch = {"pixels": _augmented(train.pixels(rows), augment, cfg.train.seed, step, micro).to(device)}
        if caption_ids is not None:
            batch["caption_ids"] = caption_ids[rows].to(device)
        if text_cache is not None:
            batch["text_pooled"] = text_cache[rows].to(device)
            if neg_cache is not None:
                batch["text_pooled"] = torch.cat([batch["text_pooled"], neg_cache[rows].to(device)])
        else:
            # Hard negatives go through the text tower in the same forward call as the captions.
            batch.update(_text_batch((ids[rows], mask[rows]) if neg_ids is None else (
                torch.cat([ids[rows], neg_ids[rows]]), torch.cat([mask[rows], neg_mask[rows]])), device))
        return batch

    return batch_fn


def _text_batch(encoded: tuple[torch.Tensor, torch.Tensor], device) -> dict[str, torch.Tensor]:
    ids, mask = encoded
    width = int(mask.sum(1).max())  # trim padding to the longest caption in the batch
    return {"ids": ids[:, :width].to(device), "mask": mask[:, :width].to(device)}


def _augmented(pixels: torch.Tensor, augment, seed: int, step: int, micro: int) -> torch.Tensor:
    if augment is None:
        return pixels
    # Seeded by the step, so a resumed run sees the same batches.
    state = np.random.SeedSequence([seed, step, micro, distributed.rank()]).generate_state(1)[0]
    return augment(pixels, torch.Generator().manual_seed(int(state)))


def _shard_stream(cfg: ClipRunConfig, transform) -> ShardStream:
    unsupported = [name for name, on in (("data.keep_classes", cfg.data.keep_classes is not None),
                                         ("train.hard_negatives", cfg.train.hard_negatives),
                                         ("train.lock_text", cfg.train.lock_text)) if on]
    if unsupported:
        raise ValueError(f"data.shards streams the training pairs; {', '.join(unsupported)} needs them decoded "
                         f"in memory (leave data.shards unset)")
    world = distributed.world_size()
    if cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} does not divide among {world} processes")
    return ShardStream(ShardIndex.load(cfg.data.shards), transform, cfg.train.batch_size // world,
                       distributed.rank(), world, cfg.data.workers, cfg.train.seed, cfg.data.shuffle_buffer,
                       cfg.data.max_bad_fraction)


def _caption_index(captions: list[str]) -> dict[str, int]:
    """One integer per distinct caption, in order of first appearance."""
    index: dict[str, int] = {}
    for c in captions:
        index.setdefault(c, len(index))
    return index


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
