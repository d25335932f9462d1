"""Stage 2 recipe (LLaVA): vision tower + projector + decoder LM, trained in two phases.

1. `align`: only the projector learns, on captions, so image tokens start to mean
   something to the (frozen) LM.
2. `instruct`: the projector and the LM (in full or through LoRA adapters) learn to
   answer questions; the vision tower stays frozen or trains with its own learning rate.

Each phase is a Trainer run in its own folder (`align/`, `instruct/`) with its own
checkpoints, so a run killed in either phase resumes where it stopped. The finished
model is written to `model/` with its tokenizer, and scored on held-out images.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from vlmkit.checkpoint import load_weights, read_config, save_checkpoint
from vlmkit.config import DualEncoderConfig, PhaseConfig, VisionConfig, VLMConfig, VlmRunConfig
from vlmkit.data.chat import Encoded, PromptTooLong, collate, encode_conversation
from vlmkit.data.images import ImageTransform
from vlmkit.data.lm_tokenizer import LMTokenizer, render_chatml
from vlmkit.data.prepared import DataError
from vlmkit.data.vqa_sets import ConversationSet, build_set, of_kinds, question_kinds, repeats
from vlmkit.evaluation.report import write_report
from vlmkit.evaluation.vlm_eval import evaluate_vlm, headline
from vlmkit.losses import answer_loss, answer_positions
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.training import distributed
from vlmkit.training.lora import inject_lora, merge_lora
from vlmkit.training.contrastive import BatchPlan
from vlmkit.training.trainer import Trainer, param_groups


@dataclass
class VlmRun:
    model_dir: Path
    results: dict
    status: str


def load_vision_tower(path: str | Path) -> tuple[VisionConfig, dict[str, torch.Tensor], dict]:
    """The vision config, vision weights and image preprocessing of a Stage 1 or Stage 2 checkpoint."""
    path = Path(path)
    config = read_config(path)
    if config["kind"] == "dual_encoder":
        vision, prefix = DualEncoderConfig.from_dict(config["model"], f"{path}/config.json model").vision, "vision."
    elif config["kind"] == "vlm":
        vision, prefix = VLMConfig.from_dict(config["model"], f"{path}/config.json model").vision, "vision_tower."
    else:
        raise ValueError(f"{path}: vision_init needs a dual_encoder or vlm checkpoint, got kind {config['kind']!r}")
    state = {k[len(prefix):]: v for k, v in load_file(str(path / "model.safetensors")).items() if k.startswith(prefix)}
    pre_file = path / "preprocessor.json"
    preprocessor = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
    return vision, state, preprocessor


def encode_all(data: ConversationSet, tokenizer: LMTokenizer, image_tokens: int, max_length: int) -> tuple[list[Encoded], int]:
    """Encode every conversation; too-long ones are skipped and counted, any other problem raises."""
    encoded, too_long = [], 0
    for i, c in enumerate(data.conversations):
        c.validate(f"conversation {i}")
        try:
            encoded.append(encode_conversation(c, tokenizer, image_tokens, max_length))
        except PromptTooLong:
            too_long += 1
            encoded.append(None)
    return encoded, too_long


def set_trainable(model: VisionLanguageModel, phase: PhaseConfig) -> None:
    model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    if phase.vision == "full":
        model.vision_tower.requires_grad_(True)
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


def train_vlm(cfg: VlmRunConfig, out_dir: str | Path, resume: bool = True, progress: bool = True) -> VlmRun:
    distributed.init_distributed()
    out_dir = Path(out_dir)
    device = distributed.default_device()
    torch.manual_seed(cfg.align.train.seed)
    model_cfg = cfg.model

    # ---- the eyes: a Stage 1 vision tower fixes the vision config and the preprocessing
    vision_state, data_cfg = None, cfg.data
    if cfg.vision_init:
        vision_cfg, vision_state, pre = load_vision_tower(cfg.vision_init)
        model_cfg = model_cfg.replace(vision=vision_cfg.to_dict())
        data_cfg = data_cfg.replace(image_size=pre.get("size", vision_cfg.image_size),
                                    resize_mode=pre.get("resize_mode", data_cfg.resize_mode),
                                    mean=pre.get("mean", data_cfg.mean), std=pre.get("std", data_cfg.std))
    if vision_state is not None and pre:
        # The tower's own preprocessing, whole: an imported CLIP also carries its
        # shortest-edge resize and rescale factor, which the data config has no fields for.
        transform = ImageTransform.from_dict(pre)
    else:
        transform = ImageTransform(size=data_cfg.image_size or model_cfg.vision.image_size,
                                   resize_mode=data_cfg.resize_mode, mean=data_cfg.mean, std=data_cfg.std)

    # ---- data
    train_set = build_set(data_cfg, "train", data_cfg.train_size, transform)
    eval_set = build_set(data_cfg, "test", data_cfg.eval_size, transform, source=data_cfg.eval_source)
    for name, s in (("training", train_set), ("evaluation", eval_set)):
        if s.dropped:
            print(f"[vlmkit] {s.dropped} {name} conversations dropped: their images could not be read")

    # ---- the brain: a pretrained LM (its tokenizer comes with it) or a small one from scratch
    lm_state = None
    if cfg.lm_init:
        from vlmkit.convert.auto import load_decoder

        lm, tokenizer = load_decoder(cfg.lm_init, max_positions=model_cfg.decoder.max_positions)
        decoder_cfg, lm_state = lm.cfg, lm.state_dict()
        del lm
    else:
        tokenizer = LMTokenizer.train([render_chatml(c.messages) for c in train_set.conversations],
                                      vocab_size=cfg.tokenizer_vocab)
        decoder_cfg = model_cfg.decoder.replace(vocab_size=tokenizer.vocab_size)
    model_cfg = model_cfg.replace(decoder=decoder_cfg.to_dict(), image_token_id=tokenizer.image_id)
    model = VisionLanguageModel(model_cfg)
    if vision_state is not None:
        model.vision_tower.load_state_dict(vision_state)
    if lm_state is not None:
        model.language_model.load_state_dict(lm_state)
    model.to(device)

    max_length = min(data_cfg.max_length, decoder_cfg.max_positions)
    encoded, too_long = encode_all(train_set, tokenizer, model_cfg.image_tokens, max_length)
    if too_long:
        print(f"[vlmkit] {too_long} training conversations skipped: longer than data.max_length={max_length} tokens")
    preprocessor = transform.to_dict()
    run_config = {**cfg.to_dict(), "model": model_cfg.to_dict(), "data": data_cfg.to_dict()}
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "run_config.json").write_text(json.dumps(run_config, indent=2) + "\n")

    def save_model(path: Path, state: dict | None = None):
        save_checkpoint(path, model, "vlm", model_cfg.to_dict(), tokenizer, preprocessor, state,
                        extra_files={"metrics.jsonl": path.parent.parent / "metrics.jsonl"} if state else None)

    eval_probe = list(range(0, len(eval_set), max(1, len(eval_set) // 300)))[:300]

    def eval_fn(net):
        results, _ = evaluate_vlm(model, tokenizer, _subset(eval_set, eval_probe), progress=False)
        return headline(results)

    if not (resume and any((out_dir / n / "checkpoints").is_dir() or (out_dir / n / "model").is_dir()
                           for n in ("align", "instruct"))):
        _calibrate_projector(model, train_set, device)

    # ---- the two phases
    for name in ("align", "instruct"):
        phase: PhaseConfig = getattr(cfg, name)
        phase_dir = out_dir / name
        if phase.skip:
            continue
        if resume and (phase_dir / "model" / "model.safetensors").is_file():
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

        def batch_fn(step: int, micro: int, rows=rows, plan=plan, cached=cached):
            chosen = [rows[i] for i in plan(step, micro).tolist()]
            batch = collate([encoded[i] for i in chosen], tokenizer.pad_id)
            image_rows = torch.tensor([r for i in chosen for r in train_set.conversations[i].images], dtype=torch.long)
            batch = {k: v.to(device) for k, v in batch.items()}
            if cached is not None:
                batch["vision_tokens"] = cached[image_rows].to(device)
            else:
                batch["pixels"] = train_set.images.pixels(image_rows).to(device)
            return batch

        def loss_fn(net, batch):
            where = answer_positions(batch["labels"])
            logits = net(batch["ids"], pixels=batch.get("pixels"), vision_tokens=batch.get("vision_tokens"),
                         positions=batch["positions"], logits_at=where)
            return answer_loss(logits, batch["labels"]), {"answer_tokens": float(where.sum())}

        trainer = Trainer(model, phase.train, phase_dir, batch_fn, loss_fn, save_model, eval_fn, device,
                          groups=optimizer_groups(model, phase))
        trainer.log(f"phase {name}: {len(rows)} conversations per epoch, "
                    f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters")
        if resume:
            trainer.resume()
        status = trainer.fit()
        if status != "done":
            return VlmRun(out_dir / "model", {}, status)
        merge_lora(model)
        if distributed.is_main():
            save_model(phase_dir / "model")

    # ---- the finished model, scored on held-out images
    model.eval()
    results, records = evaluate_vlm(model, tokenizer, eval_set, progress=progress)
    if distributed.is_main():
        save_model(out_dir / "model")
        write_report(results, out_dir, "eval", "Stage 2 evaluation (held-out images)")
        with open(out_dir / "answers.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return VlmRun(out_dir / "model", results, "done")


@torch.no_grad()
def _calibrate_projector(model: VisionLanguageModel, data: ConversationSet, device, images: int = 512) -> None:
    """Standardise the projector's input on a sample of training images (see Projector.calibrate)."""
    rows = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(0))[:images]
    model.multi_modal_projector.calibrate(model.vision_tokens(data.images.pixels(rows).to(device)))


@torch.no_grad()
def _frozen_vision_tokens(model: VisionLanguageModel, data: ConversationSet, rows: list[int], device,
                          progress: bool, budget_bytes: int = 4 << 30) -> torch.Tensor | None:
    """A frozen tower maps each training image to fixed tokens: compute them once, not every step.

    Returns [n_images, N, D_vision] on the CPU (rows of images no conversation in `rows`
    uses stay zero), or None when that would not fit in `budget_bytes`.
    """
    needed = sorted({r for i in rows for r in data.conversations[i].images})
    cache = None
    for start in tqdm(range(0, len(needed), 256), desc="vision tokens", unit="batch", leave=False,
                      disable=not (progress and distributed.is_main())):
        chunk = torch.tensor(needed[start: start + 256], dtype=torch.long)
        tokens = model.vision_tokens(data.images.pixels(chunk).to(device)).float().cpu()
        if cache is None:
            if len(data.images) * tokens[0].numel() * 4 > budget_bytes:
                return None
            cache = torch.zeros(len(data.images), *tokens.shape[1:])
        cache[chunk] = tokens
    return cache


def _subset(data: ConversationSet, indices: list[int]) -> ConversationSet:
    return ConversationSet(data.images, [data.conversations[i] for i in indices], data.dropped)
