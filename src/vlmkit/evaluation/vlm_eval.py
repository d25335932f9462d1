"""Score a VisionLanguageModel on a `ConversationSet` by generating its answers.

Every question is answered greedily by the real generation engine (left-padded batches),
and the text is scored by kind: exact match for short answers, POPE statistics for
existence probes, IoU for boxes, BLEU/CIDEr for captions.
"""
from __future__ import annotations

import logging
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from vlmkit.data.chat import encode_conversation
from vlmkit.data.conversation import Conversation
from vlmkit.data.image_prompt import ImagePrompt
from vlmkit.data.lm_tokenizer import LMTokenizer
from vlmkit.data.vqa_sets import ConversationSet
from vlmkit.evaluation.captions import caption_scores
from vlmkit.evaluation.grounding import grounding_scores
from vlmkit.evaluation.pope import pope_scores
from vlmkit.evaluation.vqa import vqa_accuracy
from vlmkit.inference.engine import Engine, SamplingParams
from vlmkit.runtime import missing_dependency

log = logging.getLogger(__name__)

# "chat": conversations from a LLaVA file, scored by exact match against their last answer.
SHORT_ANSWER_KINDS = ("colour", "shape", "count", "position", "relation", "exists", "yes/no", "chat")
# Exact match too, but a list of objects, not a short answer: scored on its own line, so the
# VQA figure keeps its question kinds.
LIST_KINDS = ("order",)


def reference(conversation: Conversation) -> str:
    """The expected answer: `meta["answer"]`, else the conversation's last message."""
    return conversation.meta.get("answer", conversation.messages[-1].content)


def prompt_of(conversation: Conversation) -> list:
    """The messages up to (not including) the last assistant answer."""
    messages = list(conversation.messages)
    return messages[:-1] if messages and messages[-1].role == "assistant" else messages


@torch.no_grad()
def generate_answers(model, tokenizer: LMTokenizer, data: ConversationSet, indices: list[int],
                     max_new_tokens: int = 32, batch_size: int = 64, progress: bool = True) -> list[str]:
    """Greedy answers to the last question of each chosen conversation."""
    engine = Engine(model, tokenizer.pad_id)
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_ids=tokenizer.stop_ids)
    cfg, limit = model.cfg, model.cfg.decoder.max_positions
    prompt = ImagePrompt(tokenizer, cfg.image_prompt, cfg.image_tokens, cfg.image_token)
    answers: list[str] = []
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(indices), desc="answering", leave=False, disable=not progress)
    for start in range(0, len(indices), batch_size):
        chunk = [data.conversations[i] for i in indices[start:start + batch_size]]
        prompts = [encode_conversation(prompt_of(c), tokenizer, [prompt.ids(*data.images.grid(r)) for r in c.images],
                                       limit, add_generation_prompt=True).ids for c in chunk]
        pixels = [data.images.view_pixels(torch.tensor(data.images.view_rows(c.images), dtype=torch.long))
                  if c.images else None for c in chunk]
        for out in engine.generate(prompts, pixels, params):
            answers.append(tokenizer.decode(out).strip())
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return answers


def evaluate_vlm(model, tokenizer: LMTokenizer, data: ConversationSet, limit: int | None = None,
                 max_new_tokens: int = 40, progress: bool = True) -> tuple[dict, list[dict]]:
    """Scores per kind and overall, plus the individual answers (for inspection)."""
    indices = list(range(len(data)))[:limit]
    predictions = generate_answers(model, tokenizer, data, indices, max_new_tokens, progress=progress)
    by_kind: dict[str, list[tuple[int, str]]] = defaultdict(list)
    records = []
    for i, prediction in zip(indices, predictions):
        c = data.conversations[i]
        kind = c.meta.get("kind", "chat")
        by_kind[kind].append((i, prediction))
        records.append({"question": c.messages[-2].content if len(c.messages) > 1 else "",
                        "answer": reference(c), "prediction": prediction, "kind": kind})

    results: dict = {}
    short = [(i, p) for k in SHORT_ANSWER_KINDS for i, p in by_kind.get(k, [])]
    if short:
        results["vqa"] = vqa_accuracy([p for _, p in short], [reference(data.conversations[i]) for i, _ in short],
                                      [data.conversations[i].meta.get("kind", "chat") for i, _ in short])
    for kind in LIST_KINDS:
        if by_kind.get(kind):
            pairs = by_kind[kind]
            results[kind] = vqa_accuracy([p for _, p in pairs], [reference(data.conversations[i]) for i, _ in pairs])
    for kind in ("exists", "yes/no"):
        if by_kind.get(kind):
            pairs = by_kind[kind]
            results["pope" if kind == "exists" else "yes_no"] = pope_scores(
                [p for _, p in pairs], [reference(data.conversations[i]) for i, _ in pairs])
    if by_kind.get("grounding"):
        pairs = by_kind["grounding"]
        metas = [data.conversations[i].meta for i, _ in pairs]
        results["grounding"] = grounding_scores([p for _, p in pairs], [m["box"] for m in metas],
                                                [m["image_size"] for m in metas], [m["image_size"] for m in metas])
    if by_kind.get("caption"):
        pairs = by_kind["caption"]
        try:
            results["caption"] = caption_scores([p for _, p in pairs],
                                                [[reference(data.conversations[i])] for i, _ in pairs])
        except ModuleNotFoundError as e:  # an optional extra: the other figures still count
            results["caption"] = {"count": len(pairs), "skipped": missing_dependency(e)}
            log.warning(f"caption metrics skipped: {missing_dependency(e)}")
    return results, records


def headline(results: dict) -> dict[str, float]:
    """The few numbers worth a log line."""
    out = {}
    if "vqa" in results:
        out["vqa_accuracy"] = results["vqa"]["accuracy"]
    if "pope" in results:
        out["pope_f1"] = results["pope"]["f1"]
        out["pope_yes_ratio"] = results["pope"]["yes_ratio"]
    if "grounding" in results:
        out["grounding_acc@0.5"] = results["grounding"]["accuracy@0.5"]
    if "cider" in results.get("caption", {}):
        out["cider"] = results["caption"]["cider"]
    return out
