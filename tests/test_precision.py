"""The fast inference paths: bf16 / int8 weights, loading without initialisation, the engine
on a text-only LM, incremental detokenisation, and a start-up that does not import torch."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vlmkit.checkpoint import load_model, save_checkpoint
from vlmkit.config import DecoderConfig
from vlmkit.convert.auto import convert
from vlmkit.convert.hf_io import ConversionError
from vlmkit.data.chat import encode_conversation
from vlmkit.data.images import ImageTransform
from vlmkit.data.lm_tokenizer import LMTokenizer
from vlmkit.inference.engine import Engine, SamplingParams
from vlmkit.inference.precision import for_inference, inference_precision
from vlmkit.models.decoder import DecoderLM
from vlmkit.models.quant import Bf16Linear, Int8Linear, KERNEL_ROWS, quantize_int8, quantized_layers
from vlmkit.runtime import native_bf16, resolve_precision
from test_vlm import CORPUS, tiny_vlm


@pytest.fixture(scope="module")
def tokenizer() -> LMTokenizer:
    return LMTokenizer.train(CORPUS, vocab_size=300, min_frequency=1)


def _decoder(seed: int = 0, tied: bool = True) -> DecoderLM:
    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=211, width=64, depth=2, heads=4, kv_heads=2, mlp_dim=128, max_positions=128,
                        tie_embeddings=tied, init_std=0.1)
    return DecoderLM(cfg).eval()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("rows", [1, KERNEL_ROWS + 3])
def test_int8_linear_is_close_to_the_float_one_on_both_paths(rows):
    """A few rows take the int8 kernel, many rows dequantise; both stay within int8's rounding."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80)
    x = torch.randn(rows, 96)
    q = Int8Linear.from_linear(linear)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() == 127
    with torch.no_grad():
        assert _relative_error(q(x), linear(x)) < 0.02
        assert _relative_error(Bf16Linear(linear)(x), linear(x)) < 0.01


def test_int8_and_bf16_models_answer_like_the_fp32_one(tokenizer):
    model = tiny_vlm(tokenizer, seed=5)
    prompt = encode_conversation([{"role": "user", "content": "<image>\nWhat colour is the circle?"}], tokenizer,
                                 model.cfg.image_tokens, 90, True).ids
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        reference = model(torch.tensor([prompt]), pixels=pixels)[0, -1]
    for precision in ("int8", "bf16"):
        fast = for_inference(tiny_vlm(tokenizer, seed=5), precision, "cpu")
        kinds = {type(m) for m in fast.language_model.modules()}
        if precision == "int8":
            assert Int8Linear in kinds
        else:   # bf16 weights computing in fp32, or (where bf16 is native) a bf16 model
            assert Bf16Linear in kinds or fast.language_model.embed.weight.dtype == torch.bfloat16
        assert not any(isinstance(m, (Int8Linear, Bf16Linear)) for m in fast.vision_tower.modules())
        with torch.no_grad():
            logits = fast(torch.tensor([prompt]), pixels=pixels)[0, -1].float()
        assert _relative_error(logits, reference) < 0.05
        # Greedy decoding through the cache still picks what a full pass over the same model picks.
        engine = Engine(fast, tokenizer.pad_id)
        out = engine.generate([prompt], [pixels], SamplingParams(max_new_tokens=6))[0]
        with torch.no_grad():
            full = fast(torch.tensor([prompt + out]), pixels=pixels)[0]
        assert full[len(prompt) - 1:-1].argmax(-1).tolist() == out


def test_int8_checkpoints_save_reload_and_convert(tokenizer, tmp_path):
    model = tiny_vlm(tokenizer, seed=6)
    transform = ImageTransform(size=32)
    save_checkpoint(tmp_path / "fp32", model, "vlm", model.cfg.to_dict(), tokenizer, transform.to_dict())
    done, _ = convert(tmp_path / "fp32", tmp_path / "int8", quantize="int8")
    assert done == "quantized vlmkit vlm -> int8 weights"
    config = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert config["int8"] and all(name.startswith("language_model.") for name in config["int8"])
    assert (tmp_path / "int8" / "tokenizer.json").is_file() and (tmp_path / "int8" / "preprocessor.json").is_file()
    size = {name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("fp32", "int8")}
    assert size["int8"] < 0.6 * size["fp32"]
    direct = tiny_vlm(tokenizer, seed=6)
    quantize_int8(direct, prefix="language_model")
    loaded = load_model(tmp_path / "int8")
    assert quantized_layers(loaded) == quantized_layers(direct)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.language_model(ids), direct.language_model(ids))
    # Whatever precision is asked for, an int8 checkpoint runs in int8.
    assert quantized_layers(for_inference(load_model(tmp_path / "int8"), "fp32", "cpu"))
    with pytest.raises(ConversionError, match="int8 weights"):
        convert(tmp_path / "int8", tmp_path / "hf")


def test_loading_skips_initialisation_and_keeps_ties(tmp_path, monkeypatch):
    """Built on the meta device: no random initialisation runs, tensors are the file's, ties stay ties."""
    model = _decoder(tied=True)
    save_checkpoint(tmp_path / "m", model, "decoder", model.cfg.to_dict())
    calls = []
    monkeypatch.setattr(torch.nn.init, "normal_", lambda tensor, *a, **k: calls.append(tensor.device.type))
    loaded = load_model(tmp_path / "m")
    assert calls and set(calls) == {"meta"}   # the initialiser runs on shapes only: no memory, no random draws
    assert loaded.lm_head.weight is loaded.embed.weight
    assert not any(t.is_meta for t in loaded.state_dict().values())
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_the_engine_serves_a_text_only_language_model():
    model = _decoder(seed=2, tied=False)
    engine = Engine(model, pad_id=0)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    out = engine.generate(prompts, [None, None], SamplingParams(max_new_tokens=7))
    for prompt, got in zip(prompts, out):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + got]))[0]
        assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == got
    assert out == [engine.generate([p], [None], SamplingParams(max_new_tokens=7))[0] for p in prompts]
    with pytest.raises(ValueError, match="text-only language model"):
        engine.generate([[5, 6]], [torch.randn(1, 3, 8, 8)], SamplingParams(max_new_tokens=2))


def test_incremental_decoding_joins_to_the_whole_decode(tokenizer):
    """One token at a time gives the same text as decoding all ids, multi-byte characters included."""
    texts = ["a small red circle at the top left.", "naïve café — 多 emoji 🙂 end", "yes no 2 [12, 40]"]
    rich = LMTokenizer.train(CORPUS + texts * 3, vocab_size=400, min_frequency=1)
    torch.manual_seed(0)
    for tok in (tokenizer, rich):
        streams = [tok.encode(t) for t in texts] + [torch.randint(0, tok.vocab_size, (40,)).tolist()]
        for ids in streams:
            step = tok.stream_decoder()
            pieces = "".join(step(i) for i in ids)
            whole = tok.decode(ids)
            assert whole.startswith(pieces) and whole[len(pieces):].strip("\ufffd") == ""


def test_precision_names_and_the_tests_override(monkeypatch):
    assert resolve_precision("auto", "cpu") == "fp32"          # conftest sets VLMKIT_PRECISION=fp32
    assert inference_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("int8", "cpu") == "int8"
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        resolve_precision("fp16", "cpu")
    monkeypatch.delenv("VLMKIT_PRECISION")
    # Inference on a CPU reads bf16 weights (half the bytes per token) with or without bf16
    # arithmetic; training's "auto" wants bf16 arithmetic, so it follows the CPU's flags.
    assert inference_precision("auto", torch.device("cpu")) == "bf16"
    # An encoder only (a Stage 1 model) is bound by arithmetic: bf16 weights would only add casts.
    assert inference_precision("auto", torch.device("cpu"), decodes=False) == resolve_precision("auto", "cpu")
    assert resolve_precision("auto", "cpu") == ("bf16" if native_bf16("cpu") else "fp32")
    monkeypatch.setenv("VLMKIT_PRECISION", "int8")
    with pytest.raises(ValueError, match="VLMKIT_PRECISION='int8'"):
        resolve_precision("auto", "cpu")


def test_the_command_line_starts_without_torch():
    code = ("import sys, vlmkit, vlmkit.cli; vlmkit.cli.build_parser().format_help(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
