"""Text tokenizer for BERT-style text encoders: a thin wrapper over Hugging Face `tokenizers`.

It trains small WordPiece or byte-level BPE vocabularies on a caption corpus, loads pretrained
BERT tokenizers (`tokenizer.json` or a bare `vocab.txt`), and encodes batches straight to the
`(input_ids, attention_mask)` tensors a text encoder takes. Every tokenizer it builds wraps a
sequence as `[CLS] ... [SEP]`, so a model never needs to know which kind it was given.

A pretrained `tokenizer.json` keeps its own post-processor (CLIP's `<|startoftext|> ...
<|endoftext|>`, SigLIP's `... </s>`); there the start/end tokens stand in for [CLS]/[SEP].
`pad_to_max_length` pads every batch to `max_length`, as SigLIP was trained.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

# Trainers give special tokens the first ids in list order, so this order fixes
# [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4 for every tokenizer trained here.
DEFAULT_SPECIAL_TOKENS: dict[str, str] = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
_REQUIRED = ("pad_token", "unk_token", "cls_token", "sep_token")  # [MASK] only matters for MLM


class Tokenizer:
    """Batch encoder/decoder with fixed special tokens; see the module docstring."""

    def __init__(self, backend: HFTokenizer, special_tokens: dict[str, str] | None = None,
                 lowercase: bool = True, model_max_length: int = 512, pad_to_max_length: bool = False) -> None:
        self._backend = backend
        self.special_tokens = {**DEFAULT_SPECIAL_TOKENS, **(special_tokens or {})}
        self.lowercase = lowercase
        self.model_max_length = model_max_length
        self.pad_to_max_length = pad_to_max_length
        # encode() sets padding/truncation per call; a saved file may carry its own
        # (MiniLM's tokenizer.json pads everything to 128), which would override ours.
        backend.no_padding()
        backend.no_truncation()
        missing = [self.special_tokens[k] for k in _REQUIRED if backend.token_to_id(self.special_tokens[k]) is None]
        if missing:
            raise ValueError(f"special tokens {missing} are not in the vocabulary")
        # Registering them as special keeps them whole in raw text and lets decode() drop them.
        present = [t for t in self.special_tokens.values() if backend.token_to_id(t) is not None]
        backend.add_special_tokens(present)

    @classmethod
    def train(cls, texts: Iterable[str], kind: str = "wordpiece", vocab_size: int = 1000,
              lowercase: bool = True, min_frequency: int = 1) -> "Tokenizer":
        """Train a "wordpiece" (BERT-like) or "bpe" (byte-level) tokenizer on `texts`."""
        corpus = [t for t in texts if t and t.strip()]
        if not corpus:
            raise ValueError("cannot train a tokenizer on an empty corpus")
        specials = list(DEFAULT_SPECIAL_TOKENS.values())
        unk = DEFAULT_SPECIAL_TOKENS["unk_token"]
        options = dict(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                       show_progress=False)
        if kind == "wordpiece":
            backend = HFTokenizer(models.WordPiece(unk_token=unk))
            backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
            backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            backend.decoder = decoders.WordPiece()
            backend.model = _train_wordpiece(backend, corpus, options, unk)
        elif kind == "bpe":
            backend = HFTokenizer(models.BPE(unk_token=unk))
            steps = [normalizers.NFC()] + ([normalizers.Lowercase()] if lowercase else [])
            backend.normalizer = normalizers.Sequence(steps)
            # A prefix space makes a word's first token the same at the start and mid-sentence.
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
            backend.decoder = decoders.ByteLevel()
            # The full byte alphabet means no input ever maps to [UNK].
            trainer = trainers.BpeTrainer(initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **options)
            backend.train_from_iterator(corpus, trainer=trainer)
        else:
            raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'wordpiece' or 'bpe'")
        backend.post_processor = _bert_template(backend, DEFAULT_SPECIAL_TOKENS)
        return cls(backend, lowercase=lowercase)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        """Load a `tokenizer.json`, a BERT `vocab.txt`, or a directory holding either."""
        path = Path(path)
        if path.is_dir():
            found = [path / n for n in ("tokenizer.json", "vocab.txt") if (path / n).is_file()]
            if not found:
                raise FileNotFoundError(f"no tokenizer.json or vocab.txt in directory {path}")
            path = found[0]
        elif not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path} "
                                    "(expected tokenizer.json, vocab.txt or a directory holding one)")

        config = _read_json(path.parent / "tokenizer_config.json", missing_ok=True)
        # Older configs store special tokens as serialised AddedToken dicts.
        named = {k: v["content"] if isinstance(v, dict) else str(v)
                 for k, v in config.items() if k in (*DEFAULT_SPECIAL_TOKENS, *_START_END) and v}
        specials = {**DEFAULT_SPECIAL_TOKENS, **_start_end_as_cls_sep(named)}
        if path.suffix == ".json":
            spec = _read_json(path)
            try:
                backend = HFTokenizer.from_str(json.dumps(spec))
            except Exception as e:  # the Rust side raises plain Exceptions
                raise ValueError(f"malformed tokenizer file {path}: {e}") from e
            lowercase = bool(config.get("do_lower_case", _lowercases(spec.get("normalizer"))))
        else:
            lowercase = bool(config.get("do_lower_case", True))
            backend = _wordpiece_from_vocab(path, specials["unk_token"], lowercase, config)
        try:
            if backend.post_processor is None:  # keep the [CLS] ... [SEP] contract for any file
                backend.post_processor = _bert_template(backend, specials)
            return cls(backend, specials, lowercase, int(config.get("model_max_length", 512)),
                       bool(config.get("pad_to_max_length", False)))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(directory / "tokenizer.json"))
        # The keys follow transformers' format, so AutoTokenizer can read the folder too.
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens,
                  "do_lower_case": self.lowercase, "model_max_length": self.model_max_length}
        if self.pad_to_max_length:
            config["pad_to_max_length"] = True
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return directory

    def encode(self, texts: str | Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(input_ids, attention_mask)`, both LongTensor [B, T], T <= max_length.

        T is the longest text's length, or exactly max_length with `pad_to_max_length`.
        """
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch:
            raise ValueError("encode() needs at least one text")
        if max_length <= self._backend.num_special_tokens_to_add(False):
            raise ValueError(f"max_length={max_length} leaves no room for text between [CLS] and [SEP]")
        # Truncation runs before the post-processor adds [CLS]/[SEP], so [SEP] stays last, as in HF.
        self._backend.enable_truncation(max_length)
        self._backend.enable_padding(pad_id=self.pad_id, pad_token=self.special_tokens["pad_token"],
                                     length=max_length if self.pad_to_max_length else None)
        try:
            encodings = self._backend.encode_batch(batch)
        finally:  # leave the backend clean so save() never writes per-call settings
            self._backend.no_padding()
            self._backend.no_truncation()
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Turn one sequence of ids back into text (padding is dropped with the special tokens)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode() takes one sequence (1-D ids), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        # Byte-level BPE decodes with the prefix space it added; strip it.
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens).strip()

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def _id(self, key: str) -> int:
        return self._backend.token_to_id(self.special_tokens[key])

    @property
    def pad_id(self) -> int:
        return self._id("pad_token")

    @property
    def unk_id(self) -> int:
        return self._id("unk_token")

    @property
    def cls_id(self) -> int:
        return self._id("cls_token")

    @property
    def sep_id(self) -> int:
        return self._id("sep_token")

    @property
    def backend(self) -> HFTokenizer:
        """The wrapped `tokenizers.Tokenizer`, for anything this class does not expose."""
        return self._backend


# --------------------------------------------------------------------- helpers
_START_END = ("bos_token", "eos_token")


def _start_end_as_cls_sep(named: dict[str, str]) -> dict[str, str]:
    """CLIP- and SigLIP-style configs name bos/eos, not cls/sep: let those fill the roles.

    A tokenizer with no start token at all (SigLIP: `... </s>`) uses its end token for both;
    its own post-processor, not these names, decides what an encoding holds.
    """
    out = {k: v for k, v in named.items() if k in DEFAULT_SPECIAL_TOKENS}
    start, end = named.get("bos_token"), named.get("eos_token")
    if end and "sep_token" not in out:
        out["sep_token"] = end
    if "cls_token" not in out and (start or end):
        out["cls_token"] = start or end
    return out


def _train_wordpiece(backend: HFTokenizer, corpus: list[str], options: dict, unk: str) -> models.WordPiece:
    """A WordPiece vocabulary learnt as the `tokenizers` WordPiece trainer does, but the same in every process.

    That trainer is BPE over words whose inner characters carry a "##" prefix, and it numbers
    those "##" characters in hash-map order, which changes from process to process; merges
    of equal count are then ordered by those numbers, so two runs on the same captions gave
    different vocabularies. Here every inner character is first replaced by a character of
    its own from Unicode's private-use plane, so plain BPE sees one sorted alphabet and
    breaks every tie the same way; the learnt pieces are then spelled back ("##" for a piece
    from inside a word). Characters already in that plane are left out of training (they
    encode as [UNK]).
    """
    words = [[w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))]
             for text in corpus]
    alphabet = sorted({c for line in words for w in line for c in w if ord(c) < _INNER})
    inner = {c: chr(_INNER + i) for i, c in enumerate(alphabet)}
    spelled = {v: k for k, v in inner.items()}
    marked = [" ".join(w[0] + "".join(inner[c] for c in w[1:]) for w in line
                       if all(ord(c) < _INNER for c in w)) for line in words]
    bpe = HFTokenizer(models.BPE(unk_token=unk))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Every character also as a word's start, as the WordPiece trainer keeps it: a word may
    # start with a letter no training word started with, and must not become [UNK].
    bpe.train_from_iterator(marked, trainers.BpeTrainer(initial_alphabet=alphabet, **options))
    vocab = bpe.get_vocab()
    pieces = {("##" if piece[0] in spelled else "") + "".join(spelled.get(c, c) for c in piece): i
              for piece, i in vocab.items()}
    return models.WordPiece(pieces, unk_token=unk)


_INNER = 0xF0000   # Unicode's supplementary private-use plane A: 65,534 code points no text should use


def _bert_template(backend: HFTokenizer, specials: dict[str, str]) -> processors.TemplateProcessing:
    cls_tok, sep_tok = specials["cls_token"], specials["sep_token"]
    cls_id, sep_id = backend.token_to_id(cls_tok), backend.token_to_id(sep_tok)
    if cls_id is None or sep_id is None:
        raise ValueError(f"vocabulary lacks {cls_tok} or {sep_tok}")
    return processors.TemplateProcessing(
        single=f"{cls_tok} $A {sep_tok}",
        pair=f"{cls_tok} $A {sep_tok} $B:1 {sep_tok}:1",
        special_tokens=[(cls_tok, cls_id), (sep_tok, sep_id)],
    )


def _wordpiece_from_vocab(path: Path, unk_token: str, lowercase: bool, config: dict) -> HFTokenizer:
    """Build the same pipeline as transformers' BertTokenizerFast from a `vocab.txt`."""
    try:
        vocab = models.WordPiece.read_file(str(path))
    except Exception as e:
        raise ValueError(f"malformed vocab file {path}: {e}") from e
    if not vocab:
        raise ValueError(f"vocab file {path} is empty")
    backend = HFTokenizer(models.WordPiece(vocab, unk_token=unk_token, max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
        strip_accents=config.get("strip_accents"),  # None: strip exactly when lowercasing, as BERT does
        lowercase=lowercase,
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend  # from_pretrained adds the [CLS] ... [SEP] template


def _read_json(path: Path, missing_ok: bool = False) -> dict[str, Any]:
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed JSON in {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"malformed {path}: expected a JSON object")
    return data


def _lowercases(normalizer: dict | None) -> bool:
    """Whether a serialised normalizer lowercases its input (looks inside Sequences)."""
    if not normalizer:
        return False
    if normalizer.get("type") == "Sequence":
        return any(_lowercases(n) for n in normalizer.get("normalizers", []))
    return normalizer.get("type") == "Lowercase" or bool(normalizer.get("lowercase", False))
