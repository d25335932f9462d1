"""Hugging Face CLIPModel / SiglipModel <-> vlmkit DualEncoder: same numbers both ways.

Small random transformers models are saved, converted and compared at fp32 tolerance;
nothing is downloaded.
"""
import json
import math

import pytest
import torch

from vlmkit.checkpoint import load_model
from vlmkit.config import DualEncoderConfig, TextConfig, VisionConfig
from vlmkit.convert.hf_io import ConversionError
from vlmkit.convert.hf_clip import (import_hf_dual_encoder, load_hf_dual_encoder, map_vision_state,
                                    save_hf_clip, vision_config_from_hf, vision_config_to_hf,
                                    vision_state_to_hf)
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.models.dual_encoder import DualEncoder
from vlmkit.models.layers import Attention
from vlmkit.models.vit import VisionTransformer

transformers = pytest.importorskip("transformers")
TOL = dict(atol=1e-4, rtol=1e-4)
CLIP_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def _hf_processor_available() -> bool:
    try:
        import vlmkit.convert.hf_processor  # noqa: F401
    except ImportError:
        return False
    return True


NEEDS_HF_PROCESSOR = pytest.mark.skipif(not _hf_processor_available(),
                                        reason="vlmkit.convert.hf_processor (image preprocessing) is not written yet")


# ----------------------------------------------------------------------------- helpers
def _clip(tmp_path, text: dict, vision: dict, projection_dim: int = 24, tokenizer=None):
    torch.manual_seed(0)
    eos = text["vocab_size"] - 1 if tokenizer is None else 1
    cfg = transformers.CLIPConfig(
        text_config=dict(max_position_embeddings=20, eos_token_id=eos, bos_token_id=0, pad_token_id=eos, **text),
        vision_config=vision, projection_dim=projection_dim,
        logit_scale_init_value=5.0)  # above vlmkit's default clamp, log(100): must not be clamped
    ref = transformers.CLIPModel(cfg).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp_path)
    return ref, eos


def _siglip(tmp_path, text: dict, vision: dict):
    torch.manual_seed(0)
    cfg = transformers.SiglipConfig(text_config=dict(max_position_embeddings=12, projection_size=vision["hidden_size"],
                                                     **text), vision_config=vision)
    ref = transformers.SiglipModel(cfg).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    return ref


def _ours(path):
    cfg, state, tokenizer, transform = load_hf_dual_encoder(path)
    model = DualEncoder(cfg).eval()
    model.load_state_dict(state)
    return model, tokenizer, transform


def _clip_texts(eos: int, vocab: int, lengths=(9, 6, 4)):
    """Right-padded ids (padded with EOS, as CLIP's tokenizer does), each ending in EOS."""
    T = max(lengths)
    ids = torch.randint(2, vocab - 1, (len(lengths), T))
    for row, n in enumerate(lengths):
        ids[row, n - 1:] = eos
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def _compare(ours: DualEncoder, ref, pixels, ids, mask, hf_mask=True):
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=pixels, attention_mask=mask if hf_mask else None,
                  output_hidden_states=True)
        image, text = ours.encode_image(pixels), ours.encode_text(ids, mask)
        scale, bias = ours.scale_and_bias()
        logits = scale * image @ text.T + (0 if bias is None else bias)
        torch.testing.assert_close(image, out.image_embeds, **TOL)
        torch.testing.assert_close(text, out.text_embeds, **TOL)
        torch.testing.assert_close(logits, out.logits_per_image, **TOL)
        hidden = out.vision_model_output.hidden_states
        torch.testing.assert_close(ours.vision(pixels, layer=-1), hidden[-1], **TOL)
        torch.testing.assert_close(ours.vision(pixels, layer=-2), hidden[-2], **TOL)


def _small_clip_tokenizer():
    """A real transformers CLIPTokenizer over letters, so no vocabulary is downloaded."""
    vocab = {tok: i for i, tok in enumerate(CLIP_SPECIALS)}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    merges = [("t", "h"), ("th", "e</w>"), ("a", "t</w>")]
    for merged in ("th", "the</w>", "at</w>"):
        vocab[merged] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


CLIP_CASES = [
    (dict(vocab_size=99, hidden_size=36, intermediate_size=70, num_hidden_layers=2, num_attention_heads=3,
          hidden_act="quick_gelu"),
     dict(hidden_size=52, intermediate_size=100, num_hidden_layers=3, num_attention_heads=4, image_size=30,
          patch_size=6, hidden_act="gelu")),
    (dict(vocab_size=64, hidden_size=40, intermediate_size=64, num_hidden_layers=1, num_attention_heads=5,
          hidden_act="gelu"),
     dict(hidden_size=36, intermediate_size=50, num_hidden_layers=2, num_attention_heads=6, image_size=32,
          patch_size=8, hidden_act="quick_gelu", num_channels=3)),
]


# ----------------------------------------------------------------------------- import matches transformers
@pytest.mark.parametrize("text, vision", CLIP_CASES)
def test_clip_matches_transformers(tmp_path, text, vision):
    ref, eos = _clip(tmp_path, text, vision)
    ours, _, _ = _ours(tmp_path)
    assert ours.cfg.text.causal and ours.cfg.text_pool == "eos" and ours.cfg.vision.norm_pre
    ids, mask = _clip_texts(eos, text["vocab_size"])
    size = vision["image_size"]
    _compare(ours, ref, torch.randn(2, 3, size, size), ids, mask)


@pytest.mark.parametrize("text, vision", [
    (dict(vocab_size=80, hidden_size=36, intermediate_size=72, num_hidden_layers=2, num_attention_heads=3),
     dict(hidden_size=52, intermediate_size=90, num_hidden_layers=2, num_attention_heads=4, image_size=32,
          patch_size=8)),
    (dict(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
          hidden_act="gelu"),
     dict(hidden_size=36, intermediate_size=60, num_hidden_layers=3, num_attention_heads=3, image_size=30,
          patch_size=6, hidden_act="gelu")),
])
def test_siglip_matches_transformers(tmp_path, text, vision):
    ref = _siglip(tmp_path, text, vision)
    ours, _, _ = _ours(tmp_path)
    assert ours.cfg.vision_pool == "map" and ours.cfg.text_pool == "last" and ours.logit_bias is not None
    size = vision["image_size"]
    pixels = torch.randn(2, 3, size, size)
    ids = torch.randint(0, text["vocab_size"], (3, 12))  # full length, as SigLIP is trained
    _compare(ours, ref, pixels, ids, torch.ones_like(ids))
    # Padded to full length: the padding is attended to (HF called without a mask), whatever the mask says.
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    _compare(ours, ref, pixels, ids, mask, hf_mask=False)


def test_sparse_config_takes_transformers_defaults(tmp_path):
    # Everything not given here is transformers' default, and is then dropped from config.json.
    text = dict(vocab_size=99, hidden_size=36, intermediate_size=70, num_hidden_layers=2, num_attention_heads=3)
    vision = dict(hidden_size=52, intermediate_size=100, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    ref, eos = _clip(tmp_path, text, vision)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"] = {**text, "max_position_embeddings": 20}
    config["vision_config"] = vision
    config.pop("logit_scale_init_value", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours, _, _ = _ours(tmp_path)
    assert ours.cfg.vision.act == ours.cfg.text.act == "quick_gelu"
    assert ours.cfg.vision.norm_eps == ours.cfg.text.norm_eps == 1e-5
    _compare(ours, ref, torch.randn(2, 3, 32, 32), *_clip_texts(eos, 99))
    # Old CLIP files carry *_config_dict, which transformers lets win; so do we.
    config["vision_config_dict"] = {"hidden_act": "gelu"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_hf_dual_encoder(tmp_path)[0].vision.act == "gelu"


def test_vision_tower_pieces_for_llava():
    hf = dict(hidden_size=36, intermediate_size=50, num_hidden_layers=2, num_attention_heads=3, image_size=32,
              patch_size=8, model_type="siglip_vision_model")
    for model_type, prefix in (("clip_vision_model", "vision_tower.vision_model."), ("siglip", "")):
        cfg = vision_config_from_hf(hf, model_type)
        assert vision_config_from_hf(vision_config_to_hf(cfg, model_type), model_type) == cfg
        state = VisionTransformer(cfg).state_dict()
        hf_state = vision_state_to_hf(state, cfg, prefix, model_type)
        hf_state[prefix + "head.probe"] = torch.zeros(1)  # a SigLIP head is not the tower's to take
        back = map_vision_state(hf_state, cfg, prefix, model_type)
        assert list(hf_state) == [prefix + "head.probe"]
        assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


# ----------------------------------------------------------------------------- export
def _clip_shaped(patch_bias: bool = False) -> DualEncoder:
    torch.manual_seed(1)
    cfg = DualEncoderConfig(
        vision=VisionConfig(image_size=30, patch_size=6, width=36, depth=2, heads=3, mlp_dim=72, norm_pre=True,
                            patch_bias=patch_bias, act="quick_gelu", norm_eps=1e-5),
        text=TextConfig(vocab_size=len(_small_clip_tokenizer()), width=40, depth=2, heads=4, mlp_dim=80,
                        max_positions=16, max_length=16, layout="pre_norm", causal=True, act="gelu", norm_eps=1e-5),
        embed_dim=20, vision_pool="cls", text_pool="eos", init_logit_scale=math.log(30.0))
    model = DualEncoder(cfg).eval()
    with torch.no_grad():  # no parameter left at an exact 0 / 1 init, so nothing matches by luck
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def test_export_round_trip(tmp_path):
    ours = _clip_shaped()
    tokenizer = Tokenizer(_small_clip_tokenizer().backend_tokenizer,
                          {"cls_token": CLIP_SPECIALS[0], "sep_token": CLIP_SPECIALS[1],
                           "pad_token": CLIP_SPECIALS[1], "unk_token": CLIP_SPECIALS[1]})
    save_hf_clip(ours, tmp_path / "hf", tokenizer=tokenizer)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["CLIPModel"] and config["model_type"] == "clip"
    ref, info = transformers.CLIPModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    texts = ["the cat sat", "a hat", "zebra"]
    ids, mask = tokenizer.encode(texts, max_length=16)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok(texts, padding=True, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    _compare(ours, ref.eval(), torch.randn(2, 3, 30, 30), ids, mask)
    back, back_tokenizer, _ = _ours(tmp_path / "hf")
    state = ours.state_dict()
    assert back.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in back.state_dict().items())
    assert back_tokenizer.encode(texts, 16)[0].tolist() == ids.tolist()


def test_export_folds_patch_bias_into_positions(tmp_path):
    ours = _clip_shaped(patch_bias=True)
    save_hf_clip(ours, tmp_path, eos_token_id=1)
    ref = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    _compare(ours, ref, torch.randn(2, 3, 30, 30), *_clip_texts(1, ours.cfg.text.vocab_size))


def test_export_refuses_what_clip_cannot_hold(tmp_path):
    bert_text = DualEncoder(DualEncoderConfig(
        vision=VisionConfig(image_size=16, patch_size=8, width=8, depth=1, heads=2, mlp_dim=8),
        text=TextConfig(vocab_size=10, width=8, depth=1, heads=2, mlp_dim=8, max_positions=8, max_length=8),
        embed_dim=4))
    with pytest.raises(ConversionError, match=r"vision.norm_pre = false.*text.layout = 'bert'"):
        save_hf_clip(bert_text, tmp_path, eos_token_id=1)
    with pytest.raises(ConversionError, match="eos_token_id"):
        save_hf_clip(_clip_shaped(), tmp_path)
    siglip_vision = VisionConfig(image_size=16, patch_size=8, width=8, depth=1, heads=2, mlp_dim=8, class_token=False)
    with pytest.raises(ConversionError, match="vision.class_token = false"):
        vision_config_to_hf(siglip_vision, "clip")


# ----------------------------------------------------------------------------- checkpoints, tokenizers
def test_import_writes_a_loadable_checkpoint(tmp_path):
    hf_tok = _small_clip_tokenizer()
    text = dict(vocab_size=len(hf_tok), hidden_size=36, intermediate_size=70, num_hidden_layers=2,
                num_attention_heads=3)
    vision = dict(hidden_size=36, intermediate_size=50, num_hidden_layers=2, num_attention_heads=3, image_size=32,
                  patch_size=8)
    ref, _ = _clip(tmp_path / "hf", text, vision, tokenizer=hf_tok)
    out = import_hf_dual_encoder(tmp_path / "hf", tmp_path / "ckpt")
    model = load_model(out)
    tokenizer = Tokenizer.from_pretrained(out)
    texts = ["the cat at the zoo", "hat"]
    ids, mask = tokenizer.encode(texts, max_length=model.cfg.text.max_length)
    expected = hf_tok(texts, padding=True, return_tensors="pt")
    assert ids.tolist() == expected["input_ids"].tolist() and mask.tolist() == expected["attention_mask"].tolist()
    _compare(model, ref, torch.randn(1, 3, 32, 32), ids, mask)


@NEEDS_HF_PROCESSOR
def test_image_processor_travels_both_ways(tmp_path):
    from vlmkit.inference.api import load

    hf_tok = _small_clip_tokenizer()
    text = dict(vocab_size=len(hf_tok), hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                num_attention_heads=2)
    vision = dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    ref, _ = _clip(tmp_path / "hf", text, vision, tokenizer=hf_tok)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "hf")
    _, _, transform = _ours(tmp_path / "hf")
    assert transform is not None and transform.size == 32
    out = import_hf_dual_encoder(tmp_path / "hf", tmp_path / "ckpt")
    assert json.loads((out / "preprocessor.json").read_text())["size"] == 32
    api = load(out, device="cpu")  # tokenizer, transform and weights: the whole inference path
    with torch.no_grad():
        expected = ref.get_text_features(**hf_tok(["the cat"], return_tensors="pt")).pooler_output
    torch.testing.assert_close(api.embed_texts(["the cat"]), torch.nn.functional.normalize(expected, dim=-1), **TOL)
    save_hf_clip(out, tmp_path / "back")  # a checkpoint directory brings its tokenizer and processor along
    assert (tmp_path / "back" / "preprocessor_config.json").is_file()
    transformers.CLIPImageProcessor.from_pretrained(tmp_path / "back")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "back")("the cat")["input_ids"] == \
        hf_tok("the cat")["input_ids"]


def test_siglip_tokenizer_pads_to_full_length(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, processors

    words = ["<pad>", "</s>", "<unk>", "a", "cat", "on", "the", "mat"]
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    _siglip(tmp_path, dict(vocab_size=len(words), hidden_size=16, intermediate_size=20, num_hidden_layers=1,
                           num_attention_heads=2),
            dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                 patch_size=8))
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>", "model_max_length": 12}))
    out = import_hf_dual_encoder(tmp_path, tmp_path / "ckpt")
    tokenizer = Tokenizer.from_pretrained(out)
    ids, mask = tokenizer.encode(["a cat on the mat", "the cat"], max_length=load_model(out).cfg.text.max_length)
    assert ids.shape == (2, 12) and ids[1].tolist() == [6, 4, 1] + [1] * 9 and mask[1].sum() == 3


# ----------------------------------------------------------------------------- errors name what is wrong
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    _clip(path, *CLIP_CASES[0])
    return path


def _rewrite_weights(src, dst, change):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(src / "model.safetensors"))
    change(weights)
    save_file(weights, str(dst / "model.safetensors"))


def test_missing_unexpected_and_misshaped_tensors_are_named(clip_dir, tmp_path):
    key = "vision_model.encoder.layers.1.self_attn.k_proj.weight"
    _rewrite_weights(clip_dir, tmp_path / "missing", lambda w: w.pop(key))
    with pytest.raises(ConversionError, match=f"missing tensor {key}"):
        load_hf_dual_encoder(tmp_path / "missing")
    _rewrite_weights(clip_dir, tmp_path / "extra", lambda w: w.update({"text_model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ConversionError, match=r"unexpected CLIPModel tensors \['text_model.extra.weight'\]"):
        load_hf_dual_encoder(tmp_path / "extra")
    _rewrite_weights(clip_dir, tmp_path / "shape", lambda w: w.update({key: torch.zeros(52, 51)}))
    with pytest.raises(ConversionError, match=rf"{key} has shape \[52, 51\], the config expects \[52, 52\]"):
        load_hf_dual_encoder(tmp_path / "shape")


def test_unsupported_configs_are_named(clip_dir, tmp_path):
    config = json.loads((clip_dir / "config.json").read_text())

    def load_with(**changes):
        (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))
        load_hf_dual_encoder(tmp_path)

    with pytest.raises(ConversionError, match="supported: clip, siglip"):
        load_with(model_type="blip")
    with pytest.raises(ConversionError, match="vision_config.hidden_act 'relu'"):
        load_with(vision_config={**config["vision_config"], "hidden_act": "relu"})
    siglip = {"model_type": "siglip", "vision_config": {"vision_use_head": False}}
    with pytest.raises(ConversionError, match="vision_use_head = false"):
        load_with(**siglip)


# ----------------------------------------------------------------------------- model pieces
def test_causal_attention_with_padding_matches_the_textbook():
    torch.manual_seed(0)
    attn = Attention(24, heads=3)
    x = torch.randn(2, 5, 24)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]]).bool()  # right and left padding
    q, k, v = attn.qkv(x).view(2, 5, 3, 3, 8).permute(2, 0, 3, 1, 4)
    allowed = mask[:, None, None, :] & torch.ones(5, 5, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~allowed, float("-inf"))
    expected = attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 24))
    got = attn(x, mask, causal=True)
    torch.testing.assert_close(got[mask], expected[mask])
    assert torch.isfinite(got).all()  # left-padding rows see themselves instead of nothing
    torch.testing.assert_close(attn(x, None, causal=True), attn(x, torch.ones(2, 5), causal=True))


def test_eos_pooling_takes_the_last_real_token():
    model = _clip_shaped()
    tokens = torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]])  # right and left padding
    torch.testing.assert_close(model.pool_text(tokens, mask), tokens[[0, 1], [2, 5]])
    torch.testing.assert_close(model.pool_text(tokens, None), tokens[:, -1])
