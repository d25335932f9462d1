"""Caption metrics: corpus BLEU-1..4 and CIDEr (the COCO toolkit's CIDEr-D) via pycocoevalcap.

Only the pure-Python BLEU and CIDEr scorers are used. The COCO toolkit's PTBTokenizer needs
Java, so captions are tokenized here instead (lowercase, apostrophes dropped, other
punctuation as spaces); scores are therefore close to, not identical with, published
COCO numbers.

Quirks of the scorers worth knowing when reading the numbers:
- CIDEr weights n-grams by IDF over the *evaluated* references, so it is a corpus metric:
  with a single sample every weight is log(1) - log(1) = 0 and CIDEr is 0.
- BLEU smooths empty n-gram counts with 1e-15 / 1e-9, so a hypothesis shorter than n words
  gets a small positive BLEU-n (about 0.03 for BLEU-4 of an exact 3-word match), not 0.
"""
from __future__ import annotations

import contextlib
import io
import re
from typing import Sequence

_APOSTROPHES = re.compile(r"['\u2019]")
_PUNCT = re.compile(r"[^\w\s]|_")


def tokenize(text: str) -> str:
    """Lowercase, drop apostrophes ("don't" -> "dont"), turn other punctuation into spaces.

    Returns the tokens joined by single spaces, the form the scorers split on.
    """
    return " ".join(_PUNCT.sub(" ", _APOSTROPHES.sub("", text.lower())).split())


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """BLEU-1..4 and CIDEr of one predicted caption per sample against its reference captions.

    Returns {"bleu1", "bleu2", "bleu3", "bleu4", "cider", "count"}.
    """
    # Optional (the `metrics` extra); ModuleNotFoundError names it for the caller to report.
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        raise ValueError("caption_scores needs at least one prediction")
    gts: dict[int, list[str]] = {}
    res: dict[int, list[str]] = {}
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        # A bare string is a Sequence[str] of characters: catch it rather than score letters.
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise ValueError(f"references[{i}] must be a list of caption strings, got {type(refs).__name__}")
        if not refs:
            raise ValueError(f"references[{i}] is empty; every sample needs at least one reference")
        if not isinstance(pred, str) or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"sample {i}: predictions and references must be strings")
        tokenized = [tokenize(r) for r in refs]
        if not any(tokenized):
            # CIDEr's document frequencies would be empty (and crash) for an all-blank corpus.
            raise ValueError(f"references[{i}] has no words after tokenization: {list(refs)!r}")
        gts[i], res[i] = tokenized, [tokenize(pred)]

    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its internal counts
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        cider, _ = Cider().compute_score(gts, res)
    scores = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    scores["cider"] = float(cider)
    scores["count"] = len(predictions)
    return scores
