"""Zero-shot classification accuracy of a CLIP-style model.

`zero_shot_accuracy` scores image embeddings against a classifier's rows (one text embedding
per class, from `vlmkit.inference.zero_shot.build_classifier`) and reports top-k accuracy,
per-class accuracy and a confusion matrix.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


@torch.no_grad()
def zero_shot_accuracy(
    image_emb: Tensor,
    labels: Tensor,
    classifier: Tensor,
    ks: Sequence[int] = (1, 5),
    class_subset: Sequence[int] | None = None,
    classnames: Sequence[str] | None = None,
) -> dict:
    """Top-k accuracy of `image_emb` [N, E] (true classes `labels` [N]) against `classifier` [C, E].

    `class_subset` limits the candidates to those class indices (labels stay in full indexing and
    must all lie in the subset). A tie with the true class counts as a miss. Returns
    "top{k}_accuracy" (k capped at the number of candidates), "mean_per_class_accuracy",
    "per_class_accuracy" {class name or index: top-1 accuracy, classes with samples only},
    "confusion_matrix" (rows: true, columns: predicted, ordered as "confusion_classes") and
    "num_samples".
    """
    if image_emb.dim() != 2 or classifier.dim() != 2 or image_emb.shape[1] != classifier.shape[1]:
        raise ValueError(f"expected image_emb [N, E] and classifier [C, E], "
                         f"got {tuple(image_emb.shape)} and {tuple(classifier.shape)}")
    labels = torch.as_tensor(labels, dtype=torch.long).to(image_emb.device)
    if labels.shape != (len(image_emb),) or len(labels) == 0:
        raise ValueError(f"need one label per image and at least one image, "
                         f"got labels {tuple(labels.shape)} for {len(image_emb)} images")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    num_classes = len(classifier)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), "
                         f"got range [{labels.min().item()}, {labels.max().item()}]")
    if classnames is not None and len(classnames) != num_classes:
        raise ValueError(f"got {len(classnames)} class names for {num_classes} classifier rows")

    candidates = list(range(num_classes)) if class_subset is None else [int(c) for c in class_subset]
    if not candidates or len(set(candidates)) != len(candidates) or not all(0 <= c < num_classes for c in candidates):
        raise ValueError(f"class_subset must be distinct class indices in [0, {num_classes}), got {class_subset}")
    # Map full class indices to positions among the candidates (-1: not a candidate).
    position = torch.full((num_classes,), -1, dtype=torch.long, device=labels.device)
    position[torch.tensor(candidates, device=labels.device)] = torch.arange(len(candidates), device=labels.device)
    target = position[labels]
    if (target < 0).any():
        outside = sorted(set(labels[target < 0].tolist()))
        raise ValueError(f"labels {outside[:10]} are not in class_subset")

    logits = image_emb.float() @ classifier[candidates].float().T  # [N, C']
    correct = logits.gather(1, target[:, None])
    # Pessimistic rank: every other candidate scoring >= the true class goes ahead of it.
    rank = (logits >= correct).sum(dim=1) - 1
    predicted = logits.argmax(dim=1)

    results: dict = {"num_samples": len(labels)}
    for k in ks:
        results[f"top{k}_accuracy"] = (rank < min(int(k), len(candidates))).double().mean().item()

    n = len(candidates)
    confusion = torch.bincount(target * n + predicted, minlength=n * n).view(n, n).cpu()
    hits = (rank == 0).double()
    per_class = {}
    for pos, cls in enumerate(candidates):
        members = target == pos
        if members.any():  # classes without test images have no accuracy to report
            per_class[classnames[cls] if classnames is not None else cls] = hits[members].mean().item()
    results["mean_per_class_accuracy"] = sum(per_class.values()) / len(per_class)
    results["per_class_accuracy"] = per_class
    results["confusion_matrix"] = confusion.tolist()
    results["confusion_classes"] = candidates
    return results
