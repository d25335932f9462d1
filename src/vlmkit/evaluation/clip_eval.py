"""Evaluate a dual encoder: cross-modal retrieval and zero-shot classification."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkit.data.prepared import PreparedPairs, prepare
from vlmkit.data.sources import build_source
from vlmkit.evaluation.retrieval import retrieval_metrics
from vlmkit.evaluation.zero_shot import zero_shot_accuracy
from vlmkit.inference.zero_shot import build_classifier


@dataclass
class ZeroShotSet:
    """Images with class labels, and the class names / prompt templates to classify them by."""

    name: str
    data: PreparedPairs
    classes: list[str]
    templates: list[str]
    class_subset: list[int] | None = None   # restrict the candidates (e.g. held-out classes only)


def zero_shot_sets(source, data: PreparedPairs, transform, size: int, source_options: dict | None = None,
                   keep_classes: list[str] | None = None) -> list[ZeroShotSet]:
    """The zero-shot tests that make sense for `source` (whose evaluation split `data` holds)."""
    sets = []
    if source.name == "shapes":  # compositional: single objects whose colour-shape pair training never showed
        options = {**(source_options or {}), "size": size, "min_objects": 1, "max_objects": 1}
        heldout = build_source("shapes", "heldout", **options)
        sets.append(ZeroShotSet("heldout_combos", prepare(heldout, transform, desc="held-out"),
                                heldout.classes, heldout.templates))
    elif source.classes:
        data = data.subset(data.labels >= 0)  # images whose class the source does not know (-1) cannot be scored
        sets.append(ZeroShotSet("zero_shot", data, source.classes, source.templates))
        if keep_classes:  # classes whose names training never paired with an image
            unseen = [i for i, c in enumerate(source.classes) if c not in keep_classes]
            is_unseen = torch.isin(data.labels, torch.tensor(unseen))
            unseen_data = data.subset(is_unseen)
            sets += [ZeroShotSet("unseen_classes", unseen_data, source.classes, source.templates),  # all compete
                     ZeroShotSet("unseen_only", unseen_data, source.classes, source.templates, unseen),
                     ZeroShotSet("seen_classes", data.subset(~is_unseen), source.classes, source.templates)]
    return sets


@torch.no_grad()
def encode_images(model, data: PreparedPairs, batch_size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    out = [model.encode_image(data.pixels(slice(i, i + batch_size)).to(device)).float().cpu()
           for i in range(0, len(data), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str], batch_size: int = 256,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = tokenizer.encode(texts[i: i + batch_size], max_length=model.cfg.text.max_length)
        out.append(model.encode_text(ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(out)


def evaluate_dual_encoder(model, tokenizer, pairs: PreparedPairs | None, zero_shot: list[ZeroShotSet] = (),
                          device: str | torch.device = "cpu", retrieval_size: int | None = None) -> dict[str, float]:
    """Retrieval R@K on up to `retrieval_size` pairs with distinct captions (row i image <-> row i
    caption), and top-1/top-5 accuracy per zero-shot set."""
    results: dict[str, float] = {}
    if pairs is not None:
        pairs = pairs.distinct_captions(retrieval_size)
        results["retrieval_pairs"] = float(len(pairs))
        image = encode_images(model, pairs, device=device)
        text = encode_texts(model, tokenizer, pairs.captions, device=device)
        results.update(retrieval_metrics(image, text))
    for zs in zero_shot:
        classifier = build_classifier(lambda t: encode_texts(model, tokenizer, t, device=device),
                                      zs.classes, zs.templates)
        image = encode_images(model, zs.data, device=device)
        acc = zero_shot_accuracy(image, zs.data.labels, classifier, class_subset=zs.class_subset)
        for key, value in acc.items():
            if isinstance(value, float):
                results[f"{zs.name}/{key}"] = value
    return results

