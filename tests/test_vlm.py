"""Stage 2 models and generation: KV cache, batching, sampling, chat labels, image slots, LoRA, save/load."""
from __future__ import annotations

import json

import pytest
import torch

from vlmkit.checkpoint import save_checkpoint
from vlmkit.config import ConfigError, DecoderConfig, VLMConfig
from vlmkit.data.chat import IGNORE, PromptTooLong, collate, encode_conversation
from vlmkit.data.conversation import Conversation, Message
from vlmkit.data.images import ImageTransform
from vlmkit.data.lm_tokenizer import LMTokenizer
from vlmkit.inference.engine import Engine, SamplingParams, filter_logits
from vlmkit.models.decoder import DecoderLM, KVCache
from vlmkit.models.projector import pixel_shuffle
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.models.lora import inject_lora, merge_lora

CORPUS = ["What colour is the circle?", "red", "blue", "a small red circle at the top left.",
          "Is there a green square in the image?", "yes", "no", "Describe the image.", "How many shapes are there?",
          "2", "[12, 40, 35, 62]"] * 5


@pytest.fixture(scope="module")
def tokenizer() -> LMTokenizer:
    return LMTokenizer.train(CORPUS, vocab_size=300, min_frequency=1)


def tiny_vlm(tokenizer: LMTokenizer, projector: dict | None = None, seed: int = 0,
             image_positions: str = "sequential") -> VisionLanguageModel:
    torch.manual_seed(seed)
    cfg = VLMConfig.from_dict({
        "image_positions": image_positions,
        "vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 4, "mlp_dim": 64},
        "projector": projector or {"kind": "mlp"},
        "decoder": {"vocab_size": tokenizer.vocab_size, "width": 48, "depth": 2, "heads": 6, "kv_heads": 2,
                    "mlp_dim": 96, "max_positions": 96, "tie_embeddings": False},
        "image_token_id": tokenizer.image_id,
    })
    return VisionLanguageModel(cfg).eval()


# ----------------------------------------------------------------------------- decoder
@pytest.mark.parametrize("tied", [True, False])
def test_kv_cache_decoding_equals_full_forward(tied):
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=97, width=40, depth=3, heads=4, kv_heads=2, head_dim=12, mlp_dim=72,
                        max_positions=64, tie_embeddings=tied)
    model = DecoderLM(cfg).eval()
    ids = torch.randint(0, 97, (3, 17))
    full = model(ids)
    cache = KVCache(cfg, 3, 17)
    steps = [model(ids[:, :5], cache=cache)]
    steps.append(model(ids[:, 5:9], cache=cache))            # a multi-token chunk after a filled cache
    steps += [model(ids[:, t:t + 1], cache=cache) for t in range(9, 17)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_rows_match_unpadded():
    torch.manual_seed(1)
    cfg = DecoderConfig(vocab_size=50, width=32, depth=2, heads=4, kv_heads=1, mlp_dim=64, max_positions=32)
    model = DecoderLM(cfg).eval()
    short, long = torch.randint(0, 50, (1, 6)), torch.randint(0, 50, (1, 10))
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0
    out = model(ids, positions=(mask.cumsum(1) - 1).clamp(min=0), key_mask=mask)
    torch.testing.assert_close(out[0, 4:], model(short)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], model(long)[0], atol=1e-5, rtol=1e-5)


def test_decoder_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="not a multiple of kv_heads"):
        DecoderConfig(heads=6, kv_heads=4)
    with pytest.raises(ConfigError, match="unknown key 'depht'"):
        DecoderConfig.from_dict({"depht": 2})
    with pytest.raises(ValueError, match="past the model's context"):
        DecoderLM(DecoderConfig(vocab_size=10, width=16, depth=1, heads=2, kv_heads=1, mlp_dim=16,
                                max_positions=8))(torch.zeros(1, 9, dtype=torch.long))


# ----------------------------------------------------------------------------- chat template and labels
def test_labels_unmask_exactly_the_assistant_turns(tokenizer):
    conv = Conversation([Message("system", "Be brief."), Message("user", "<image>\nWhat colour is the circle?"),
                         Message("assistant", "red"), Message("user", "Is there a green square in the image?"),
                         Message("assistant", "no")], images=[0])
    enc = encode_conversation(conv, tokenizer, image_tokens=4, max_length=200)
    assert enc.images == 1 and enc.ids.count(tokenizer.image_id) == 4
    answer_ids = [i for i, label in zip(enc.ids, enc.labels) if label != IGNORE]
    assert [label for label in enc.labels if label != IGNORE] == answer_ids
    eos = tokenizer.eos_id
    # Each turn's answer is its text followed by the end-of-turn token, and nothing else.
    turns, current = [], []
    for i in answer_ids:
        current.append(i)
        if i == eos:
            turns.append(tokenizer.decode(current))
            current = []
    assert turns == ["red", "no"] and not current
    assert tokenizer.decode(enc.ids, skip_special_tokens=False).startswith("<|im_start|>system\nBe brief.")


def test_generation_prompt_and_collate(tokenizer):
    enc = encode_conversation([{"role": "user", "content": "<image>\nDescribe the image."}], tokenizer, 4, 100,
                              add_generation_prompt=True)
    assert tokenizer.decode(enc.ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert all(label == IGNORE for label in enc.labels)
    batch = collate([enc, encode_conversation([{"role": "user", "content": "Hi"}], tokenizer, 4, 100, True)],
                    tokenizer.pad_id, left_pad=True)
    assert batch["mask"][1, 0] == 0 and batch["positions"][1, -1] == batch["mask"][1].sum() - 1


def test_overlong_and_malformed_conversations_are_clear_errors(tokenizer):
    with pytest.raises(PromptTooLong, match=r"is \d+ tokens .* more than the limit of 10"):
        encode_conversation([{"role": "user", "content": "<image>\nDescribe the image."}], tokenizer, 8, 10)
    with pytest.raises(ValueError, match="assistant message contains the image placeholder"):
        encode_conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<image>"}],
                            tokenizer, 4, 100)
    with pytest.raises(ValueError, match="no messages"):
        encode_conversation([], tokenizer, 4, 100)
    with pytest.raises(ValueError, match="placeholder"):
        Conversation([Message("user", "<image> <image> hi"), Message("assistant", "x")], images=[0]).validate()


# ----------------------------------------------------------------------------- the VLM
def test_image_slot_mismatch_names_both_counts(tokenizer):
    model = tiny_vlm(tokenizer)
    K = model.cfg.image_tokens
    ids = torch.tensor([[5] + [tokenizer.image_id] * K + [6]])
    with pytest.raises(ValueError, match=rf"{K} image slots \(1 images of {K} tokens\) but 2 images"):
        model(ids, pixels=torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="0 images were given"):
        model(ids)
    assert model(ids, pixels=torch.randn(1, 3, 32, 32)).shape == (1, K + 2, tokenizer.vocab_size)


def test_images_fill_their_own_slots(tokenizer):
    """Two images in one sequence: swapping them changes the output; same image twice does not matter where."""
    model = tiny_vlm(tokenizer)
    K = model.cfg.image_tokens
    ids = torch.tensor([[5] + [tokenizer.image_id] * K + [6] + [tokenizer.image_id] * K + [7]])
    a, b = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    out_ab = model(ids, pixels=torch.cat([a, b]))
    out_ba = model(ids, pixels=torch.cat([b, a]))
    assert not torch.allclose(out_ab[0, -1], out_ba[0, -1])
    feats = model.image_features(torch.cat([a, b]))
    torch.testing.assert_close(model(ids, image_features=feats), out_ab)
    torch.testing.assert_close(model(ids, vision_tokens=model.vision_tokens(torch.cat([a, b]))), out_ab)


@pytest.mark.parametrize("projector, tokens", [({"kind": "mlp"}, 16), ({"kind": "pixel_shuffle", "shuffle_factor": 2}, 4),
                                               ({"kind": "resampler", "queries": 5, "heads": 4}, 5)])
def test_projectors_give_the_configured_token_count(tokenizer, projector, tokens):
    model = tiny_vlm(tokenizer, projector)
    assert model.cfg.image_tokens == tokens
    assert model.image_features(torch.randn(2, 3, 32, 32)).shape == (2, tokens, 48)


def test_position_embedding_tells_the_slots_apart(tokenizer):
    plain, marked = tiny_vlm(tokenizer), tiny_vlm(tokenizer, {"kind": "mlp", "position_embedding": True})
    marked.multi_modal_projector.calibrate(torch.randn(4, 16, 32))
    same = torch.randn(1, 1, 32).expand(2, 16, 32)  # one patch token in every slot of two images
    assert torch.allclose(plain.multi_modal_projector(same)[0, 0], plain.multi_modal_projector(same)[0, 5])
    out = marked.multi_modal_projector(same)
    assert not torch.allclose(out[0, 0], out[0, 5], atol=1e-3)  # each slot adds its own vector
    torch.testing.assert_close(out[0], out[1])                # the same one in every image
    # Calibration starts the slot vectors at the size of the image content they are added to.
    content = (out - marked.multi_modal_projector.position).std()
    assert 0.5 < marked.multi_modal_projector.position.std() / content < 2


def test_pixel_shuffle_groups_neighbouring_patches():
    x = torch.arange(16).float().view(1, 16, 1)            # a 4x4 grid, values = patch index
    y = pixel_shuffle(x, 2)
    assert y.shape == (1, 4, 4)
    assert y[0, 0].tolist() == [0, 1, 4, 5] and y[0, 3].tolist() == [10, 11, 14, 15]
    with pytest.raises(ConfigError, match="not divisible by projector.shuffle_factor"):
        VLMConfig.from_dict({"vision": {"image_size": 48, "patch_size": 16}, "projector": {"kind": "pixel_shuffle"}})


# ----------------------------------------------------------------------------- generation
def _prompts(tokenizer, K):
    texts = ["What colour is the circle?", "Describe the image.", "Is there a green square in the image?"]
    return [encode_conversation([{"role": "user", "content": "<image>\n" + t}], tokenizer, K, 90, True).ids
            for t in texts]


def test_shared_image_positions(tokenizer):
    model = tiny_vlm(tokenizer, image_positions="shared")
    K, I = model.cfg.image_tokens, tokenizer.image_id
    ids = torch.tensor([[5, 6] + [I] * K + [7] + [I] * K + [I] * K + [8, 9]])   # the last two images touch
    got = model.shared_image_positions(ids, None, None)[0].tolist()
    first, second, third = 2, 3 + K, 3 + 2 * K
    assert got == [0, 1] + [first] * K + [2 + K] + [second] * K + [third] * K + [3 + 3 * K, 4 + 3 * K]
    # Greedy decoding through the KV cache picks what a full forward pass over the whole text picks.
    prompt = _prompts(tokenizer, K)[0]
    pixels = torch.randn(1, 3, 32, 32)
    out = Engine(model, tokenizer.pad_id).generate([prompt], [pixels], SamplingParams(max_new_tokens=6))[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out]), pixels=pixels)[0]
    assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == out


@pytest.mark.parametrize("image_positions", ["sequential", "shared"])
def test_batched_generation_equals_one_at_a_time(tokenizer, image_positions):
    model = tiny_vlm(tokenizer, seed=3, image_positions=image_positions)
    engine = Engine(model, tokenizer.pad_id)
    prompts = _prompts(tokenizer, model.cfg.image_tokens)
    prompts[1] = prompts[1][:-3] + prompts[1][-3:]
    pixels = [torch.randn(1, 3, 32, 32) for _ in prompts]
    assert len({len(p) for p in prompts}) > 1            # really left-padded
    for params in (SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=12, temperature=1.0, top_k=20,
                                                                     top_p=0.9, repetition_penalty=1.3, seed=7)):
        batched = engine.generate(prompts, pixels, params)
        alone = [engine.generate([p], [x], params)[0] for p, x in zip(prompts, pixels)]
        assert batched == alone
        assert all(len(out) == 12 for out in batched)


def test_rows_with_their_own_seeds_sample_as_they_would_alone(tokenizer):
    model = tiny_vlm(tokenizer, seed=3)
    engine = Engine(model, tokenizer.pad_id)
    prompts = _prompts(tokenizer, model.cfg.image_tokens)
    pixels = [torch.randn(1, 3, 32, 32) for _ in prompts]
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    seeds = [11, 12, 13]
    batched = engine.generate(prompts, pixels, params, seeds=seeds)
    alone = [engine.generate([p], [x], SamplingParams(max_new_tokens=10, temperature=1.0, seed=s))[0]
             for p, x, s in zip(prompts, pixels, seeds)]
    assert batched == alone
    same_prompt = engine.generate([prompts[0]] * 3, [pixels[0]] * 3, params, seeds=seeds)
    assert len({tuple(o) for o in same_prompt}) > 1       # the seeds, not the rows, decide


def test_stop_ids_end_rows_independently(tokenizer):
    model = tiny_vlm(tokenizer, seed=4)
    engine = Engine(model, tokenizer.pad_id)
    prompts = _prompts(tokenizer, model.cfg.image_tokens)
    pixels = [torch.randn(1, 3, 32, 32) for _ in prompts]
    free = engine.generate(prompts, pixels, SamplingParams(max_new_tokens=10))
    stop = free[0][2]                                     # the third token row 0 emits becomes a stop id
    stopped = engine.generate(prompts, pixels, SamplingParams(max_new_tokens=10, stop_ids=(stop,)))
    assert stopped[0] == free[0][: free[0].index(stop) + 1]
    for got, full in zip(stopped, free):
        assert got == (full[: full.index(stop) + 1] if stop in full else full)


def test_sampling_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2, top_p=1.0)).tolist() == [[True, False, False, True]]
    probs = logits.softmax(-1)[0]                         # [0.09, 0.64, 0.24, 0.03]
    kept = ~torch.isinf(filter_logits(logits, top_k=0, top_p=0.7))
    assert kept.tolist() == [[False, True, True, False]] and probs[1] < 0.7
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


# ----------------------------------------------------------------------------- LoRA, save and load
def test_lora_starts_at_base_and_merges_exactly(tokenizer):
    model = tiny_vlm(tokenizer)
    ids = torch.randint(0, 50, (2, 7))
    before = model.language_model(ids)
    assert inject_lora(model.language_model.blocks, rank=4, alpha=8) == 8
    torch.testing.assert_close(model.language_model(ids), before)
    trainable = [n for n, p in model.language_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "embed" in n or "norm" in n or "lm_head" in n for n in trainable)
    with torch.no_grad():
        for name, p in model.language_model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.1)
    adapted = model.language_model(ids)
    assert not torch.allclose(adapted, before)
    assert merge_lora(model) == 8
    torch.testing.assert_close(model.language_model(ids), adapted, atol=1e-5, rtol=1e-5)
    assert "blocks.0.attn.qkv.weight" in model.language_model.state_dict()


def test_unmerged_adapters_save_reload_and_merge_later(tokenizer, tmp_path):
    from vlmkit.checkpoint import CheckpointError, load_model, merge_checkpoint
    from vlmkit.cli import main

    model = tiny_vlm(tokenizer)
    inject_lora(model.language_model.blocks, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.1)
    ids = torch.randint(0, 50, (2, 7))
    adapted = model.language_model(ids)
    save_checkpoint(tmp_path / "m", model, "vlm", model.cfg.to_dict(), tokenizer, ImageTransform(size=32).to_dict())
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["lora"]
    assert saved["rank"] == 4 and saved["alpha"] == 8 and len(saved["layers"]) == 8
    kept = load_model(tmp_path / "m", merge=False)
    assert sum(".lora_a" in k for k in kept.state_dict()) == 8
    torch.testing.assert_close(kept.language_model(ids), adapted)
    torch.testing.assert_close(load_model(tmp_path / "m").language_model(ids), adapted, atol=1e-5, rtol=1e-5)
    assert main(["merge", str(tmp_path / "m"), str(tmp_path / "merged")]) == 0
    assert "lora" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    torch.testing.assert_close(load_model(tmp_path / "merged").language_model(ids), adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointError, match="no unmerged LoRA adapters"):
        merge_checkpoint(tmp_path / "merged", tmp_path / "again")


def test_saved_model_reloads_to_the_same_answers(tokenizer, tmp_path):
    import vlmkit
    from PIL import Image

    model = tiny_vlm(tokenizer, seed=5)
    transform = ImageTransform(size=32)
    save_checkpoint(tmp_path / "m", model, "vlm", model.cfg.to_dict(), tokenizer, transform.to_dict())
    loaded = vlmkit.load(tmp_path / "m", device="cpu")
    image = Image.new("RGB", (40, 30), (200, 20, 20))
    question = "What colour is the circle?"
    expected = Engine(model, tokenizer.pad_id).generate(
        [encode_conversation([{"role": "user", "content": "<image>\n" + question}], tokenizer, 16, 90, True).ids],
        [transform(image)[None]], SamplingParams(max_new_tokens=8, stop_ids=(tokenizer.eos_id,)))[0]
    answer = loaded.ask(image, question, max_new_tokens=8)
    assert answer == tokenizer.decode(expected)
    assert "".join(loaded.ask(image, question, stream=True, max_new_tokens=8)) == answer

    # By hand, with full forward passes of the model that was saved (no KV cache, no Engine).
    pixels = transform(image)[None]
    prompt = lambda q: encode_conversation([{"role": "user", "content": "<image>\n" + q}],  # noqa: E731
                                           tokenizer, 16, 90, True).ids
    ids, greedy = prompt("Describe the image."), []
    with torch.no_grad():
        while len(greedy) < 4 and tokenizer.eos_id not in greedy:
            greedy.append(int(model(torch.tensor([ids + greedy]), pixels=pixels)[0, -1].argmax()))
    assert loaded.caption(image, max_new_tokens=4) == tokenizer.decode(greedy)
    # classify: a softmax over the labels of each answer's log-likelihood (its tokens, then end of turn).
    ids, labels = prompt("What is in the image?"), ["red", "no", "2", "blue"]   # "blue" is 3 tokens
    scores = []
    for label in labels:
        answer = tokenizer.encode(label) + [tokenizer.eos_id]
        with torch.no_grad():
            logp = model(torch.tensor([ids + answer]), pixels=pixels)[0, len(ids) - 1:-1].log_softmax(-1)
        scores.append(logp.gather(1, torch.tensor(answer)[:, None]).sum())
    expected = sorted(zip(labels, torch.stack(scores).softmax(0).tolist()), key=lambda p: -p[1])
    got = loaded.classify(image, labels)
    assert [label for label, _ in got] == [label for label, _ in expected]
    assert [p for _, p in got] == pytest.approx([p for _, p in expected], rel=1e-4)
    assert loaded.embed([image, image]).shape == (2, 32)


def test_assistant_rejects_bad_requests(tokenizer, tmp_path):
    import vlmkit
    from PIL import Image

    model = tiny_vlm(tokenizer)
    save_checkpoint(tmp_path / "m", model, "vlm", model.cfg.to_dict(), tokenizer, ImageTransform(size=32).to_dict())
    m = vlmkit.load(tmp_path / "m", device="cpu")
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="question is empty"):
        m.ask(image, "  ")
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
        m.chat([{"role": "user", "content": "<image><image> hi"}], [image])
    with pytest.raises(ValueError, match="more than the limit"):
        m.ask(image, "red " * 200)
    with pytest.raises(ValueError, match="role must be"):
        m.chat([{"role": "robot", "content": "hi"}])
    from vlmkit.data.images import ImageDecodeError
    with pytest.raises(ImageDecodeError):
        m.ask(b"not an image", "What colour is the circle?")


def test_stop_strings_cut_the_text(tokenizer, tmp_path):
    import vlmkit
    from PIL import Image

    model = tiny_vlm(tokenizer, seed=6)
    save_checkpoint(tmp_path / "m", model, "vlm", model.cfg.to_dict(), tokenizer, ImageTransform(size=32).to_dict())
    m = vlmkit.load(tmp_path / "m", device="cpu")
    image = Image.new("RGB", (8, 8), (0, 0, 255))
    free = m.ask(image, "Describe the image.", max_new_tokens=12, temperature=1.0, seed=1)
    assert len(free) > 3
    stop = free[2:4]
    cut = m.ask(image, "Describe the image.", max_new_tokens=12, temperature=1.0, seed=1, stop=[stop])
    assert cut == free[: free.index(stop)]


def test_explain_writes_a_heatmap_and_refuses_an_empty_answer(tokenizer, tmp_path):
    import vlmkit
    from PIL import Image

    model = tiny_vlm(tokenizer, seed=7)
    save_checkpoint(tmp_path / "m", model, "vlm", model.cfg.to_dict(), tokenizer, ImageTransform(size=32).to_dict())
    m = vlmkit.load(tmp_path / "m", device="cpu")
    image = Image.new("RGB", (32, 32), (0, 200, 0))
    tokens, attn = m.attention(image, "What colour is the circle?", answer="red")
    assert tokens == ["red"] and attn.shape == (1, 16)
    torch.testing.assert_close(attn.sum(), attn.sum().clamp(max=1.0))   # a share of the attention, at most all
    assert m.explain(image, "What colour is the circle?", tmp_path / "h.png", answer="red").is_file()
    with pytest.raises(ValueError, match="answer is empty"):
        m.explain(image, "What colour is the circle?", tmp_path / "e.png", answer="")
