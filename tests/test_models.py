import math

import pytest
import torch

from vlmkit.config import DualEncoderConfig, TextConfig, VisionConfig
from vlmkit.models.dual_encoder import DualEncoder
from vlmkit.models.layers import Attention
from vlmkit.models.text_encoder import TextEncoder
from vlmkit.models.vit import VisionTransformer

VISION = VisionConfig(image_size=32, patch_size=8, width=48, depth=2, heads=3, mlp_dim=96)
TEXT = TextConfig(vocab_size=50, width=40, depth=2, heads=4, mlp_dim=80, max_positions=16, max_length=16)


def test_attention_matches_the_textbook_formula():
    torch.manual_seed(0)
    attn = Attention(24, heads=3)
    x = torch.randn(2, 5, 24)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    q, k, v = attn.qkv(x).view(2, 5, 3, 3, 8).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    expected = attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 24))
    torch.testing.assert_close(attn(x, mask), expected)


def test_vit_returns_a_token_per_patch():
    vit = VisionTransformer(VISION)
    tokens = vit(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 1 + 16, 48)  # class token + 4x4 patches
    no_cls = VisionTransformer(VISION.replace(class_token=False))
    assert no_cls(torch.randn(2, 3, 32, 32)).shape == (2, 16, 48)


def test_vit_interpolates_positions_for_other_resolutions():
    vit = VisionTransformer(VISION)
    assert vit(torch.randn(1, 3, 48, 64)).shape == (1, 1 + 6 * 8, 48)
    # at the training resolution the interpolation is the identity
    torch.testing.assert_close(vit.position_embedding(4, 4), vit.pos_embed)


def test_vit_intermediate_layer():
    vit = VisionTransformer(VISION)
    x = torch.randn(1, 3, 32, 32)
    last_raw = vit(x, layer=-1)
    torch.testing.assert_close(vit.norm(last_raw), vit(x))
    assert not torch.allclose(vit(x, layer=0), last_raw)


def test_vit_rejects_bad_pixels():
    vit = VisionTransformer(VISION)
    with pytest.raises(ValueError, match="expected pixels"):
        vit(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        vit(torch.randn(1, 3, 30, 32))


def test_text_encoder_ignores_padding():
    enc = TextEncoder(TEXT).eval()
    model = DualEncoder(DualEncoderConfig(vision=VISION, text=TEXT, embed_dim=16, vision_pool="mean"))
    model.text = enc
    ids = torch.tensor([[2, 7, 9, 3]])
    padded = torch.tensor([[2, 7, 9, 3, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    torch.testing.assert_close(model.encode_text(ids), model.encode_text(padded, mask), atol=1e-5, rtol=1e-5)


def test_text_encoder_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="out of range"):
        TextEncoder(TEXT)(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match="exceeds max_positions"):
        TextEncoder(TEXT)(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("loss", ["infonce", "siglip"])
def test_dual_encoder_outputs(loss):
    cfg = DualEncoderConfig(vision=VISION, text=TEXT, embed_dim=16, loss=loss, max_logit_scale=math.log(50))
    model = DualEncoder(cfg)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # far beyond the clamp
    img, txt, scale, bias = model(torch.randn(3, 3, 32, 32), torch.randint(0, 50, (3, 6)))
    assert img.shape == txt.shape == (3, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    assert scale.item() == pytest.approx(50.0)
    assert (bias is None) == (loss == "infonce")


def test_mean_and_cls_pooling_differ():
    cfg = DualEncoderConfig(vision=VISION, text=TEXT, embed_dim=16, vision_pool="cls")
    model = DualEncoder(cfg)
    tokens = model.vision(torch.randn(1, 3, 32, 32))
    torch.testing.assert_close(model.pool_image(tokens), tokens[:, 0])
    model.cfg = cfg.replace(vision_pool="mean")
    torch.testing.assert_close(model.pool_image(tokens), tokens[:, 1:].mean(1))
