"""Stage 2 recipe (LLaVA): vision tower + projector + decoder LM, trained in two phases.

1. `align`: only the projector learns, on captions, so image tokens start to mean
   something to the (frozen) LM.
2. `instruct`: the projector and the LM (in full or through LoRA adapters) learn to
   answer questions; the vision tower stays frozen or trains with its own learning rate.

Each phase is a Trainer run in its own folder (`align/`, `instruct/`) with its own
checkpoints, so a run killed in either phase resumes where it stopped. The finished
model is written to `model/` with its tokenizer; scoring it on held-out images is a hook
the caller attaches (`vlmkit.evaluation.hooks.VlmHooks`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from vlmkit.checkpoint import latest_checkpoint, load_weights, read_config, read_vision_tower
from vlmkit.config import DecoderConfig, PhaseConfig, VlmDataConfig, VlmRunConfig, VLMConfig
from vlmkit.data.chat import IGNORE, Encoded, PromptTooLong, collate, encode_conversation
from vlmkit.data.conversation import Conversation, Message
from vlmkit.data.image_prompt import MAX_GRID, ImagePrompt, tile_markers
from vlmkit.data.images import ImageTransform
from vlmkit.data.lm_tokenizer import LMTokenizer, render_chatml
from vlmkit.data.prepared import DataError
from vlmkit.data.text_replay import replay_prompts
from vlmkit.data.vqa_sets import ConversationSet, build_set, of_kinds, question_kinds, repeats
from vlmkit.inference.engine import Engine, SamplingParams
from vlmkit.losses import answer_loss, answer_positions
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.training import distributed
from vlmkit.training.batches import BatchPlan
from vlmkit.models.lora import inject_lora, merge_lora, restore_lora
from vlmkit.training.run import (RunHooks, RunResult, TrainedModel, checkpoint_saver, finish_run, run_tokenizer,
                                 start_run, write_run_config)
from vlmkit.training.trainer import Trainer, param_groups

log = logging.getLogger(__name__)


def encode_all(data: ConversationSet, tokenizer: LMTokenizer, prompt: ImagePrompt,
               max_length: int) -> tuple[list[Encoded], int]:
    """Encode every conversation; too-long ones are skipped and counted, any other problem raises."""
    encoded, too_long = [], 0
    for i, c in enumerate(data.conversations):
        c.validate(f"conversation {i}")
        try:
            expansions = [prompt.ids(*data.images.grid(r)) for r in c.images]
            encoded.append(encode_conversation(c, tokenizer, expansions, max_length))
        except PromptTooLong:
            too_long += 1
            encoded.append(None)
    return encoded, too_long


def set_trainable(model: VisionLanguageModel, phase: PhaseConfig) -> None:
    model.requires_grad_(False)
    if phase.projector == "full":
        model.multi_modal_projector.requires_grad_(True)
    if phase.vision == "full":
        model.vision_tower.requires_grad_(True)
        # Blocks past the layer the projector reads (and the final norm) never run: they would
        # get no gradient, which DDP takes for an error and AdamW would leave untouched anyway.
        for part in model.vision_tower.unused_after(model.cfg.vision_layer):
            part.requires_grad_(False)
    if phase.language_model == "full":
        model.language_model.requires_grad_(True)
    elif phase.language_model == "lora":
        inject_lora(model.language_model.blocks, phase.lora_rank, phase.lora_alpha)


def optimizer_groups(model: VisionLanguageModel, phase: PhaseConfig) -> list[dict]:
    wd = phase.train.weight_decay
    groups = param_groups(model.multi_modal_projector, wd) + param_groups(model.language_model, wd)
    vision = param_groups(model.vision_tower, wd)
    for g in vision:
        g["lr"] = phase.vision_lr or phase.train.lr
    return [g for g in groups + vision if g["params"]]


def train_vlm(cfg: VlmRunConfig, out_dir: str | Path, existing: str = "continue", progress: bool = True,
              hooks: RunHooks | None = None) -> RunResult:
    """Both phases in `out_dir`; a run already there resumes (see run.start_run's `existing`)."""
    out_dir = Path(out_dir)
    device = start_run(cfg.align.train.seed, out_dir, existing)
    data_cfg = cfg.data
    if cfg.init:   # a whole VLM: eyes, brain, tokenizer and preprocessing as they are
        if cfg.vision_init or cfg.lm_init or data_cfg.split_longest_edge:
            raise ValueError("init gives the whole model; leave vision_init, lm_init and data.split_longest_edge "
                             "unset")
        from vlmkit.convert.auto import load_vlm

        model_cfg, state, tokenizer, transform = load_vlm(cfg.init)
        train_set = _training_set(data_cfg, transform)
        model = VisionLanguageModel(model_cfg)
        model.load_state_dict(state, strict=False)   # a tied lm_head is an alias, absent from `state`
    else:
        model_cfg, data_cfg, transform, vision_state = _eyes(cfg)
        train_set = _training_set(data_cfg, transform)
        model_cfg, tokenizer, lm_state = _brain(cfg, model_cfg, train_set, out_dir)
        model = VisionLanguageModel(model_cfg)
        if vision_state is not None:
            model.vision_tower.load_state_dict(vision_state)
        if lm_state is not None:
            model.language_model.load_state_dict(lm_state)
    model.to(device)
    decoder_cfg = model_cfg.decoder

    if data_cfg.text_replay:   # before any phase: the answers are the untrained LM's own
        before = len(train_set)
        train_set = _with_text_replay(model, tokenizer, train_set, data_cfg)
        if distributed.is_main():   # kept for reading: what the LM is held to
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "text_replay.jsonl").write_text("".join(
                json.dumps({"prompt": c.messages[0].content, "answer": c.messages[1].content}) + "\n"
                for c in train_set.conversations[before:]))
    max_length = min(data_cfg.max_length, decoder_cfg.max_positions)
    prompt = ImagePrompt(tokenizer, model_cfg.image_prompt, model_cfg.image_tokens, model_cfg.image_token)
    encoded, too_long = encode_all(train_set, tokenizer, prompt, max_length)
    answers = [0 if e is None else sum(label != IGNORE for label in e.labels[1:]) for e in encoded]
    if too_long:
        log.warning(f"{too_long} training conversations skipped: longer than data.max_length={max_length} tokens")
    run_config = {**cfg.to_dict(), "model": model_cfg.to_dict(), "data": data_cfg.to_dict()}
    write_run_config(out_dir, run_config, existing)
    trained = TrainedModel(model, tokenizer, transform, VlmRunConfig.from_dict(run_config, "run config"), out_dir,
                           device, progress)
    save = checkpoint_saver(model, "vlm", model_cfg.to_dict(), tokenizer, transform, run_config)
    eval_fn = (lambda net: hooks.evaluate(trained)) if hooks is not None else None

    # A complete checkpoint holds the calibrated projector; a folder alone may be a killed first save.
    started = any(latest_checkpoint(out_dir / n / "checkpoints") is not None or _finished(out_dir / n)
                  for n in ("align", "instruct"))
    if not (started or cfg.init):   # a published model's projector is trained already
        _calibrate_projector(model, train_set, device)

    # ---- the two phases
    for name in ("align", "instruct"):
        phase: PhaseConfig = getattr(cfg, name)
        phase_dir = out_dir / name
        if phase.skip:
            continue
        if _finished(phase_dir):
            lora = read_config(phase_dir / "model").get("lora")
            if lora:   # it kept its adapters unmerged
                restore_lora(model, lora)
            load_weights(model, phase_dir / "model")   # this phase finished in an earlier run
            continue
        rows = [i for i, e in enumerate(encoded) if e is not None and of_kinds(train_set.conversations[i], phase.tasks)]
        if not rows:
            raise DataError(f"phase {name!r}: no training conversations of kinds {phase.tasks}; "
                            f"the data has {dict(train_set.kinds())}")
        absent = sorted(set(phase.task_repeats) - {k for i in rows for k in question_kinds(train_set.conversations[i])})
        if absent:
            raise DataError(f"phase {name!r}: task_repeats names kinds {absent} that its training data lacks; "
                            f"the data has {dict(train_set.kinds())}")
        rows = [i for i in rows for _ in range(repeats(train_set.conversations[i], phase.task_repeats))]
        set_trainable(model, phase)
        cached = _frozen_vision_tokens(model, train_set, rows, device, progress) if phase.vision == "frozen" else None
        # A phase with fewer conversations than a batch (a small LLaVA file) trains on all of them each step.
        plan = BatchPlan(len(rows), min(phase.train.batch_size, len(rows)), phase.train.grad_accum, phase.train.seed)

        def batch_fn(step: int, micro: int, rows=rows, plan=plan, cached=cached, accum=phase.train.grad_accum):
            chosen = [rows[i] for i in plan(step, micro).tolist()]
            batch = collate([encoded[i] for i in chosen], tokenizer.pad_id)
            # The loss is the mean over every answer token of the whole step, all micro-batches
            # and ranks together, as one process on the whole batch computes it. The Trainer
            # averages micro-batches and DDP averages ranks: each share is scaled back up for that.
            step_answers = sum(answers[rows[i]] for m in range(accum) for i in plan.global_rows(step, m))
            if not step_answers:
                raise DataError(f"phase {name!r}, step {step}: no answer tokens in the batch to learn from")
            batch["denominator"] = step_answers / (accum * distributed.world_size())
            images = [r for i in chosen for r in train_set.conversations[i].images]
            views = torch.tensor(train_set.images.view_rows(images), dtype=torch.long)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            if cached is not None:
                batch["vision_tokens"] = cached[views].to(device)
            else:
                batch["pixels"] = train_set.images.view_pixels(views).to(device)
            return batch

        def loss_fn(net, batch):
            where = answer_positions(batch["labels"])
            logits = net(batch["ids"], pixels=batch.get("pixels"), vision_tokens=batch.get("vision_tokens"),
                         positions=batch["positions"], logits_at=where)
            return answer_loss(logits, batch["labels"], batch["denominator"]), {"answer_tokens": float(where.sum())}

        trainer = Trainer(model, phase.train, phase_dir, batch_fn, loss_fn, save, eval_fn, device,
                          groups=lambda net, phase=phase: optimizer_groups(net, phase))
        trainer.log(f"phase {name}: {len(rows)} conversations per epoch, "
                    f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters")
        trainer.resume()
        if trainer.fit() != "done":
            return RunResult(out_dir / "model", {}, "interrupted")
        if phase.merge_lora:
            merge_lora(model)
        if distributed.is_main():
            save(phase_dir / "model")

    return finish_run(trained, hooks, save)


def _finished(phase_dir: Path) -> bool:
    """A phase whose final model was saved (written atomically: present means complete)."""
    return (phase_dir / "model" / "model.safetensors").is_file()


def _eyes(cfg: VlmRunConfig) -> tuple[VLMConfig, VlmDataConfig, ImageTransform, dict | None]:
    """A Stage 1 vision tower (if any) fixes the vision config and the preprocessing."""
    model_cfg, data_cfg, vision_state, pre = cfg.model, cfg.data, None, None
    if cfg.vision_init:
        vision_cfg, vision_state, pre = read_vision_tower(cfg.vision_init)
        model_cfg = model_cfg.replace(vision=vision_cfg.to_dict())
        data_cfg = data_cfg.replace(image_size=pre.get("size", vision_cfg.image_size),
                                    resize_mode=pre.get("resize_mode", data_cfg.resize_mode),
                                    mean=pre.get("mean", data_cfg.mean), std=pre.get("std", data_cfg.std))
    if vision_state is not None and pre:
        # The tower's own preprocessing, whole: an imported CLIP also carries its
        # shortest-edge resize and rescale factor, which the data config has no fields for.
        transform = ImageTransform.from_dict({**pre, "tile_longest_edge": data_cfg.split_longest_edge})
    else:
        transform = ImageTransform.for_data(data_cfg, model_cfg.vision.image_size)
    if transform.tiled:   # the LM must be told where each tile sits
        model_cfg = model_cfg.replace(image_prompt="idefics3")
        if transform.tile_longest_edge > MAX_GRID * transform.size:
            raise ValueError(f"data.split_longest_edge {transform.tile_longest_edge} would cut more than {MAX_GRID} "
                             f"tiles of {transform.size} px along a side; the row/column markers stop at {MAX_GRID}")
    return model_cfg, data_cfg, transform, vision_state


def _training_set(data_cfg: VlmDataConfig, transform: ImageTransform) -> ConversationSet:
    train_set = build_set(data_cfg, "train", data_cfg.train_size, transform)
    if train_set.dropped:
        log.warning(f"{train_set.dropped} training conversations dropped: their images could not be read")
    return train_set


def _brain(cfg: VlmRunConfig, model_cfg: VLMConfig, train_set: ConversationSet,
           out_dir: Path) -> tuple[VLMConfig, LMTokenizer, dict | None]:
    """A pretrained LM (its tokenizer comes with it) or a small one from scratch."""
    lm_state = None
    if cfg.lm_init:
        from vlmkit.convert.auto import load_decoder

        lm, tokenizer = load_decoder(cfg.lm_init, max_positions=model_cfg.decoder.max_positions)
        decoder_cfg, lm_state = lm.cfg, lm.state_dict()
        del lm
        if model_cfg.image_prompt == "idefics3":   # the tile markers become new, trainable words
            tokenizer = tokenizer.with_tokens(tile_markers())
            decoder_cfg, lm_state = grow_vocabulary(decoder_cfg, lm_state, tokenizer.vocab_size)
    else:
        markers = tile_markers() if model_cfg.image_prompt == "idefics3" else ()
        tokenizer = run_tokenizer(out_dir, lambda: LMTokenizer.train(
            [render_chatml(c.messages) for c in train_set.conversations], vocab_size=cfg.tokenizer_vocab,
            extra_tokens=markers), LMTokenizer.from_pretrained)
        decoder_cfg = model_cfg.decoder.replace(vocab_size=tokenizer.vocab_size)
    return model_cfg.replace(decoder=decoder_cfg.to_dict(), image_token_id=tokenizer.image_id), tokenizer, lm_state


@torch.no_grad()
def _with_text_replay(model: VisionLanguageModel, tokenizer: LMTokenizer, data: ConversationSet,
                      data_cfg: VlmDataConfig, batch_size: int = 64) -> ConversationSet:
    """`data` plus plain-text conversations answered by the model as it is now (see data/text_replay.py)."""
    prompts = replay_prompts(data_cfg.text_replay)
    limit = model.cfg.decoder.max_positions - data_cfg.text_replay_tokens
    ids = [encode_conversation([{"role": "user", "content": p}], tokenizer, 0, limit, add_generation_prompt=True).ids
           for p in prompts]
    engine, stops = Engine(model, tokenizer.pad_id), set(tokenizer.stop_ids)
    params = SamplingParams(max_new_tokens=data_cfg.text_replay_tokens, stop_ids=tuple(stops))
    was_training = model.training
    model.eval()
    added = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        for prompt, out in zip(prompts[start:], engine.generate(chunk, [None] * len(chunk), params)):
            finished = bool(out) and out[-1] in stops
            answer = tokenizer.decode(out[:-1] if finished else out).strip()
            end = max(answer.rfind(c) for c in ".!?")
            if not finished and end >= 0:   # cut at the last full sentence: the end-of-turn then follows one
                answer = answer[: end + 1]
            if answer:
                added.append(Conversation([Message("user", prompt), Message("assistant", answer)], [],
                                          {"kind": "text", "answer": answer}))
    model.train(was_training)
    log.info(f"text replay: {len(added)} plain-text conversations answered by the LM itself")
    return ConversationSet(data.images, data.conversations + added, data.dropped)


def grow_vocabulary(cfg: DecoderConfig, state: dict[str, torch.Tensor], size: int) -> tuple[DecoderConfig, dict]:
    """A pretrained LM's embeddings (and untied output rows) extended to `size` tokens.

    New rows start as the mean of the existing ones: words the LM has never seen, placed
    where an average word is, so they neither dominate nor vanish before training.
    """
    if size <= cfg.vocab_size:
        return cfg, state
    state = dict(state)
    for key in ("embed.weight", "lm_head.weight"):
        if key in state:
            table = state[key]
            state[key] = torch.cat([table, table.mean(0, keepdim=True).expand(size - len(table), -1)])
    if cfg.tie_embeddings and "lm_head.weight" in state:   # one table under two names
        state["lm_head.weight"] = state["embed.weight"]
    return cfg.replace(vocab_size=size), state


@torch.no_grad()
def _calibrate_projector(model: VisionLanguageModel, data: ConversationSet, device, images: int = 512) -> None:
    """Standardise the projector's input on a sample of training images (see Projector.calibrate)."""
    rows = torch.randperm(data.images.num_views, generator=torch.Generator().manual_seed(0))[:images]
    model.multi_modal_projector.calibrate(model.vision_tokens(data.images.view_pixels(rows).to(device)))


@torch.no_grad()
def _frozen_vision_tokens(model: VisionLanguageModel, data: ConversationSet, rows: list[int], device,
                          progress: bool, budget_bytes: int = 4 << 30) -> torch.Tensor | None:
    """A frozen tower maps each training view to fixed tokens: compute them once, not every step.

    Returns [n_views, N, D_vision] on the CPU (rows of views no conversation in `rows` uses
    stay zero), or None when that would not fit in `budget_bytes`. A view is an image, or
    one of its tiles when images are split.
    """
    needed = sorted(set(data.images.view_rows({r for i in rows for r in data.conversations[i].images})))
    cache = None
    for start in tqdm(range(0, len(needed), 256), desc="vision tokens", unit="batch", leave=False,
                      disable=not (progress and distributed.is_main())):
        chunk = torch.tensor(needed[start: start + 256], dtype=torch.long)
        tokens = model.vision_tokens(data.images.view_pixels(chunk).to(device)).float().cpu()
        if cache is None:
            if data.images.num_views * tokens[0].numel() * 4 > budget_bytes:
                return None
            cache = torch.zeros(data.images.num_views, *tokens.shape[1:])
        cache[chunk] = tokens
    return cache

