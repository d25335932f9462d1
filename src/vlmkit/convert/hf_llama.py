"""Hugging Face Llama-family causal LMs (`LlamaForCausalLM`, `Qwen2ForCausalLM`) <-> vlmkit DecoderLM.

DecoderLM is the Llama block: RMSNorm, rotate-half RoPE, SwiGLU MLP, grouped-query
attention. Qwen2's block differs only by biases on the Q, K and V projections (none on
the output projection), which is `DecoderConfig.attention_bias`. Mistral without a sliding
window is the same model again and is read too. Export writes `LlamaForCausalLM`, or
`Qwen2ForCausalLM` when the model has Q/K/V biases.

Two layout differences, both undone exactly (no arithmetic touches a weight):

* HF keeps `q_proj`, `k_proj`, `v_proj` apart; vlmkit fuses them into `attn.qkv` (rows q,
  then k, then v). Likewise `gate_proj` and `up_proj` become `mlp.gate_up` (gate rows first).
* With tied embeddings vlmkit's `lm_head.weight` is the embedding Parameter itself, so it
  is not a tensor of its own (as in `checkpoint.unique_state_dict`); transformers leaves
  `lm_head.weight` out of a tied checkpoint too.

Both directions read one table of key rules (`keymap`), which GGUF shares under llama.cpp's
names, so import and export cannot drift apart. The map is total: a missing tensor, a
leftover one or a wrong shape is a `ConversionError` naming the key and the shapes. Weights
are read from safetensors only (see `hf_io`). The `map_decoder_state` /
`decoder_state_to_hf` pair takes the key prefix, so the LLaVA converter reuses it for its
language model.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vlmkit.config import ConfigError, DecoderConfig
from vlmkit.convert import hf_io
from vlmkit.convert.hf_io import ConversionError
from vlmkit.convert.keymap import Rule, check, fused, pair, to_ours, to_theirs

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# transformers' defaults (configuration_llama.py, configuration_mistral.py,
# configuration_qwen2.py in 5.x): a key a config.json (or LLaVA's text_config) leaves out
# means this value. `num_key_value_heads` None means "as many as the query heads".
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_theta=10000.0, attention_bias=False, mlp_bias=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
                    max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    rope_theta=10000.0, sliding_window=4096),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
                  max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_theta=10000.0, use_sliding_window=False),
}
_ARCHITECTURE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Buffers older transformers versions saved: RoPE frequencies, recomputed from the config.
_IGNORED_SUFFIX = "rotary_emb.inv_freq"


# ----------------------------------------------------------------------------- config
def _rope_theta(hf: dict) -> float:
    """The RoPE base, refusing any scaling.

    transformers 5 writes `rope_parameters` ({"rope_type", "rope_theta", ...}); older
    files have a top-level `rope_theta` and `rope_scaling` (null, or {"type"/"rope_type",
    "factor", ...}). Models with per-layer-type RoPE nest one such dict per layer type.
    """
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if "full_attention" in rope and isinstance(rope["full_attention"], dict):
        rope = rope["full_attention"]
    where = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in (None, "default"):
        raise ConversionError(f"{where}.rope_type = {kind!r}: RoPE scaling is not supported "
                              "(supported: none / 'default')")
    factor = hf.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise ConversionError(f"partial_rotary_factor = {factor!r}: DecoderLM rotates the whole head")
    return float(rope.get("rope_theta", hf["rope_theta"]))


def _check_options(hf: dict, model_type: str, context: int) -> None:
    """Options that change the computation in ways DecoderLM has no switch for."""
    if hf["hidden_act"] != "silu":
        raise ConversionError(f"hidden_act = {hf['hidden_act']!r} is not supported; supported: silu (SwiGLU)")
    if model_type in ("llama", "mistral"):
        # Llama's attention_bias puts a bias on o_proj as well, which DecoderLM lacks.
        for option in ("attention_bias", "mlp_bias"):
            if hf.get(option):
                raise ConversionError(f"{model_type} {option} = true is not supported (DecoderLM's "
                                      f"{'output projection' if option == 'attention_bias' else 'MLP'} has no bias)")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ConversionError("qwen2 use_sliding_window = true is not supported "
                              "(DecoderLM attends to the whole context)")
    window = hf.get("sliding_window") if model_type == "mistral" else None
    if window is not None and window < context:
        # A window at least as long as the context never cuts anything off.
        raise ConversionError(f"mistral sliding_window = {window} (shorter than the context of {context} "
                              "tokens) is not supported")


def decoder_config_from_hf(hf: dict, max_positions: int | None = None) -> DecoderConfig:
    """A llama / mistral / qwen2 config.json (missing keys take transformers' defaults) -> DecoderConfig.

    `max_positions` caps the context below `max_position_embeddings` (RoPE tables and the
    largest KV cache are sized by it; the weights do not depend on it).
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"model_type {model_type!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    hf = {**HF_DEFAULTS[model_type], **hf}
    context = int(max_positions or hf["max_position_embeddings"])
    _check_options(hf, model_type, context)
    width, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is None:
        if width % heads:
            raise ConversionError(f"hidden_size {width} is not divisible by num_attention_heads {heads} "
                                  "and no head_dim is given")
        head_dim = width // heads
    try:
        return DecoderConfig(
            vocab_size=hf["vocab_size"], width=width, depth=hf["num_hidden_layers"], heads=heads,
            kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim, mlp_dim=hf["intermediate_size"],
            max_positions=context, rope_theta=_rope_theta(hf),
            norm_eps=float(hf["rms_norm_eps"]), tie_embeddings=bool(hf["tie_word_embeddings"]),
            attention_bias=model_type == "qwen2",
        )
    except ConfigError as e:
        raise ConversionError(f"{model_type} config: {e}") from None


def decoder_config_to_hf(cfg: DecoderConfig, **extra: Any) -> dict[str, Any]:
    """DecoderConfig -> a complete config.json for LlamaForCausalLM (Qwen2ForCausalLM with Q/K/V biases).

    `extra` adds or overrides keys (bos_token_id, eos_token_id, pad_token_id, ...); a None
    value is left out, so callers can pass ids they may not have.
    """
    model_type = "qwen2" if cfg.attention_bias else "llama"
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURE[model_type]], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.width, "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_positions,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        # transformers 5 reads rope_parameters; older readers (vLLM, transformers 4) rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "attention_dropout": 0.0, "initializer_range": cfg.init_std, "use_cache": True,
        "dtype": "float32", "torch_dtype": "float32",
    }
    if model_type == "llama":
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.depth)
    config.update({k: v for k, v in extra.items() if v is not None})
    return config


# ----------------------------------------------------------------------------- key table
# DecoderLM's parts by role, as transformers names them (layers under `{prefix}layers.i.`).
HF_NAMES = {"embed": "embed_tokens", "layers": "layers", "norm1": "input_layernorm", "q": "self_attn.q_proj",
            "k": "self_attn.k_proj", "v": "self_attn.v_proj", "out": "self_attn.o_proj",
            "norm2": "post_attention_layernorm", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
            "down": "mlp.down_proj", "norm": "norm"}


def decoder_rules(cfg: DecoderConfig, prefix: str, head_key: str, names: Mapping[str, str] = HF_NAMES) -> list[Rule]:
    """DecoderLM's tensors (tied lm_head absent) under a format's `names` for its parts."""
    D, F, V = cfg.width, cfg.mlp_dim, cfg.vocab_size
    q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    qkv = (("q", q), ("k", kv), ("v", kv))
    rules = [pair("embed.weight", f"{prefix}{names['embed']}.weight", (V, D))]
    for i in range(cfg.depth):
        s, d = f"{prefix}{names['layers']}.{i}.", f"blocks.{i}."
        rules += [pair(d + "norm1.weight", f"{s}{names['norm1']}.weight", (D,)),
                  fused(d + "attn.qkv.weight", [(f"{s}{names[n]}.weight", (rows, D)) for n, rows in qkv])]
        if cfg.attention_bias:
            rules.append(fused(d + "attn.qkv.bias", [(f"{s}{names[n]}.bias", (rows,)) for n, rows in qkv]))
        rules += [pair(d + "attn.out.weight", f"{s}{names['out']}.weight", (D, q)),
                  pair(d + "norm2.weight", f"{s}{names['norm2']}.weight", (D,)),
                  fused(d + "mlp.gate_up.weight", [(f"{s}{names['gate']}.weight", (F, D)),
                                                   (f"{s}{names['up']}.weight", (F, D))]),
                  pair(d + "mlp.down.weight", f"{s}{names['down']}.weight", (D, F))]
    rules.append(pair("norm.weight", f"{prefix}{names['norm']}.weight", (D,)))
    if not cfg.tie_embeddings:
        rules.append(pair("lm_head.weight", head_key, (V, D), note="tie_word_embeddings is false"))
    return rules


def expected_shapes(cfg: DecoderConfig) -> dict[str, torch.Size]:
    """DecoderLM's tensors for `cfg` (tied lm_head absent, as in unique_state_dict).

    Built on the meta device: shapes only, no memory, whatever the model's size.
    """
    from vlmkit.models.decoder import DecoderLM

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DecoderLM(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def map_decoder_state(src: dict[str, torch.Tensor], cfg: DecoderConfig, prefix: str = "model.",
                      head_key: str = "lm_head.weight") -> dict[str, torch.Tensor]:
    """HF tensors -> DecoderLM state (tied lm_head absent). Pops what it uses from `src`.

    What stays in `src` is the caller's to judge (the LLaVA converter holds the other
    towers' tensors there). RoPE `inv_freq` buffers under `prefix` are dropped, and so is
    `head_key` in a tied model: transformers ties it to the embedding whatever the file says.
    """
    for key in [k for k in src if k.startswith(prefix) and k.endswith(_IGNORED_SUFFIX)]:
        del src[key]
    if cfg.tie_embeddings:
        src.pop(head_key, None)
    return to_ours(decoder_rules(cfg, prefix, head_key), src, "language model")


def decoder_state_to_hf(state: dict[str, torch.Tensor], cfg: DecoderConfig, prefix: str = "model.",
                        head_key: str = "lm_head.weight") -> dict[str, torch.Tensor]:
    """DecoderLM state -> HF tensors (no lm_head when tied). `state` may hold the tied alias."""
    state = dict(state)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)   # the embedding itself under a second name
    return to_theirs(decoder_rules(cfg, prefix, head_key), state, "DecoderLM state")


# ----------------------------------------------------------------------------- import
def _tokenizer(path: Path):
    if not (path / "tokenizer.json").is_file():
        return None
    from vlmkit.data.lm_tokenizer import LMTokenizer

    try:
        return LMTokenizer.from_pretrained(path)
    except ValueError as e:
        raise ConversionError(f"{path}: tokenizer not usable ({e})") from None


def load_hf_decoder(path: str | Path, max_positions: int | None = None):
    """A local llama / mistral / qwen2 directory -> (DecoderConfig, fp32 state, LMTokenizer or None).

    The state has no `lm_head.weight` when the embeddings are tied (load it with
    `strict=False`, or add the alias); the tokenizer is read when tokenizer.json is there.
    """
    path = hf_io.resolve_source(path)
    hf = hf_io.read_config(path)
    cfg = decoder_config_from_hf(hf, max_positions)
    src = hf_io.read_weights(path)
    state = map_decoder_state(src, cfg)
    if src:
        leftover = sorted(src)
        raise ConversionError(f"unexpected tensors for a {cfg.depth}-layer {hf['model_type']} model: "
                              + ", ".join(f"{k} {list(src[k].shape)}" for k in leftover[:5])
                              + (f" and {len(leftover) - 5} more" if len(leftover) > 5 else ""))
    check(state, expected_shapes(cfg), f"{path} (as a vlmkit DecoderLM)")
    # bf16 / fp16 checkpoints become fp32, the dtype DecoderLM computes in.
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return cfg, state, _tokenizer(path)


def _build(cfg: DecoderConfig, state: dict[str, torch.Tensor]):
    from vlmkit.models.decoder import DecoderLM

    model = DecoderLM(cfg)
    if cfg.tie_embeddings:   # the alias lets the load be strict: every parameter is covered
        state = {**state, "lm_head.weight": state["embed.weight"]}
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_hf_decoder_model(path: str | Path, max_positions: int | None = None):
    """(DecoderLM in fp32 and eval mode, LMTokenizer or None) from a local HF directory."""
    cfg, state, tokenizer = load_hf_decoder(path, max_positions)
    return _build(cfg, state), tokenizer


def import_hf_decoder(path: str | Path, out_dir: str | Path, max_positions: int | None = None) -> Path:
    """Convert an HF llama / mistral / qwen2 directory into a vlmkit checkpoint (kind "decoder")."""
    from vlmkit.checkpoint import load_model, save_checkpoint

    model, tokenizer = load_hf_decoder_model(path, max_positions)
    out = save_checkpoint(out_dir, model, "decoder", model.cfg.to_dict(), tokenizer)
    load_model(out)   # the written weights load strictly into the model the config describes
    return out


# ----------------------------------------------------------------------------- export
def hf_tokenizer_files(tokenizer, extra: dict[str, Any] | None = None) -> dict[str, dict | str]:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja for an LMTokenizer.

    transformers' AutoTokenizer reads tokenizer.json as it is (PreTrainedTokenizerFast) and
    takes the special tokens and the chat template from tokenizer_config.json; transformers
    5 prefers chat_template.jinja, so the template is written in both places.
    """
    from vlmkit.data.lm_tokenizer import IMAGE_TOKEN

    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer.special_tokens,
              "chat_template": tokenizer.chat_template, "model_max_length": tokenizer.model_max_length,
              "image_token": IMAGE_TOKEN, **(extra or {})}
    return {"tokenizer.json": tokenizer.backend.to_str(pretty=True), "tokenizer_config.json": config,
            "chat_template.jinja": tokenizer.chat_template}


def _export_source(source, tokenizer):
    """(DecoderLM, tokenizer or None) from a model or a vlmkit decoder checkpoint directory."""
    from vlmkit.models.decoder import DecoderLM

    if isinstance(source, torch.nn.Module):
        if not isinstance(source, DecoderLM):
            raise ConversionError(f"{type(source).__name__} is not a DecoderLM; only decoders export "
                                  "to LlamaForCausalLM / Qwen2ForCausalLM")
        return source, tokenizer
    from vlmkit.data.lm_tokenizer import LMTokenizer

    path = Path(source)
    model = hf_io.load_vlmkit(path, "decoder")
    if tokenizer is None and (path / "tokenizer.json").is_file():
        tokenizer = LMTokenizer.from_pretrained(path)
    return model, tokenizer


def save_hf_decoder(model_or_checkpoint_dir, out_dir: str | Path, tokenizer=None) -> Path:
    """Write a DecoderLM (or vlmkit decoder checkpoint directory) as a transformers directory.

    config.json + model.safetensors (fp32) + generation_config.json, plus the tokenizer
    files when a tokenizer is given (or the checkpoint has one), so that
    `AutoModelForCausalLM` and `AutoTokenizer.from_pretrained(out_dir)` both load it.
    """
    model, tokenizer = _export_source(model_or_checkpoint_dir, tokenizer)
    cfg: DecoderConfig = model.cfg
    ids: dict[str, int | None] = {}
    side_files: dict[str, dict | str] = {}
    if tokenizer is not None:
        bos = tokenizer.special_tokens.get("bos_token")
        ids = {"bos_token_id": tokenizer.token_id(bos) if bos else None,
               "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
        side_files.update(hf_tokenizer_files(tokenizer))
    ids = {k: v for k, v in ids.items() if v is not None}
    side_files["generation_config.json"] = {**ids, "do_sample": False}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return hf_io.write_dir(out_dir, decoder_config_to_hf(cfg, **ids), decoder_state_to_hf(state, cfg), side_files)
