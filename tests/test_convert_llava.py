"""LLaVA <-> vlmkit VLM: transformers' own LlavaForConditionalGeneration is the reference.

Small random models with the layouts LLaVA checkpoints come in (CLIP / SigLIP / ViT vision
towers, Llama / Qwen2 language models, both feature-select strategies, negative and positive
feature layers), compared at fp32 tolerance: logits, greedy generations, and the processor's
token ids and pixels against vlmkit's own preprocessing.
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from vlmkit.checkpoint import load_model, save_checkpoint  # noqa: E402
from vlmkit.config import VLMConfig  # noqa: E402
from vlmkit.convert.auto import convert  # noqa: E402
from vlmkit.convert.hf_io import ConversionError  # noqa: E402
from vlmkit.convert.hf_llava import load_hf_llava  # noqa: E402
from vlmkit.data.chat import encode_conversation  # noqa: E402
from vlmkit.data.images import ImageTransform  # noqa: E402
from vlmkit.data.lm_tokenizer import LMTokenizer  # noqa: E402
from vlmkit.inference.engine import Engine, SamplingParams  # noqa: E402
from vlmkit.models.vlm import VisionLanguageModel  # noqa: E402

CORPUS = ["What colour is the circle?", "red", "blue", "a small red circle at the top left.",
          "Is there a green square in the image?", "yes", "no", "Describe the image."] * 5
TOL = dict(atol=1e-4, rtol=1e-4)
QUESTION = "What colour is the circle?"


@pytest.fixture(scope="module")
def tokenizer() -> LMTokenizer:
    return LMTokenizer.train(CORPUS, vocab_size=300, min_frequency=1)


def _vision(kind: str) -> transformers.PretrainedConfig:
    common = dict(image_size=32, patch_size=8, hidden_size=36, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=52)
    if kind == "clip":
        return transformers.CLIPVisionConfig(**common, hidden_act="quick_gelu")
    if kind == "siglip":
        return transformers.SiglipVisionConfig(**common, vision_use_head=False)
    return transformers.ViTConfig(**common, layer_norm_eps=1e-6)


def _text(kind: str, vocab: int) -> transformers.PretrainedConfig:
    if kind == "qwen2":
        return transformers.Qwen2Config(vocab_size=vocab, hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                                        num_key_value_heads=1, intermediate_size=72, tie_word_embeddings=True,
                                        max_position_embeddings=128)
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, intermediate_size=80,
                                    tie_word_embeddings=False, rope_theta=5000.0, max_position_embeddings=128)


def _hf_llava(tmp_path, tokenizer, vision: str, text: str, layer: int, strategy: str, **config):
    torch.manual_seed(0)
    vc = _vision(vision)
    tokens = 16 + (1 if vision != "siglip" and strategy == "full" else 0)
    config = {"image_seq_length": tokens, **config}
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=_text(text, tokenizer.vocab_size),
                                   image_token_index=tokenizer.image_id, vision_feature_layer=layer,
                                   vision_feature_select_strategy=strategy, **config)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    path = tmp_path / f"hf-{vision}-{text}"
    model.save_pretrained(path)
    tokenizer.save(path)
    mean, std = ([0.5] * 3, [0.5] * 3) if vision == "siglip" else ([0.48, 0.46, 0.41], [0.27, 0.26, 0.28])
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "resample": 3, "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": mean, "image_std": std, "do_convert_rgb": True}))
    return model, path, tokens


def _prompt_ids(tokenizer, image_tokens: int) -> list[int]:
    messages = [{"role": "user", "content": "<image>\n" + QUESTION}]
    return encode_conversation(messages, tokenizer, image_tokens, 100, add_generation_prompt=True).ids


@pytest.mark.parametrize("vision,text,layer,strategy", [
    ("clip", "llama", -2, "default"),
    ("siglip", "qwen2", 2, "full"),
    ("vit", "llama", -1, "full"),
])
def test_imported_llava_matches_transformers(tmp_path, tokenizer, vision, text, layer, strategy):
    hf, path, tokens = _hf_llava(tmp_path, tokenizer, vision, text, layer, strategy)
    _check_imported_matches(tmp_path, tokenizer, hf, path, tokens)


def test_image_seq_length_is_not_read(tmp_path, tokenizer):
    """LlavaConfig's default 576 stays in configs whose tower gives other counts; transformers never reads it."""
    hf, path, tokens = _hf_llava(tmp_path, tokenizer, "clip", "llama", -2, "default", image_seq_length=576)
    assert json.loads((path / "config.json").read_text())["image_seq_length"] == 576
    _check_imported_matches(tmp_path, tokenizer, hf, path, tokens)


def test_projector_without_bias(tmp_path, tokenizer):
    """multimodal_projector_bias false: no bias tensors, a zero bias; true (the default): a missing one is an error."""
    from safetensors.torch import load_file, save_file

    hf, path, tokens = _hf_llava(tmp_path, tokenizer, "clip", "llama", -2, "default", multimodal_projector_bias=False)
    assert not any("linear_1.bias" in k for k in load_file(str(path / "model.safetensors")))
    _check_imported_matches(tmp_path, tokenizer, hf, path, tokens)

    _, path, _ = _hf_llava(tmp_path, tokenizer, "clip", "llama", -2, "default")
    weights = load_file(str(path / "model.safetensors"))
    bias = next(k for k in weights if k.endswith("linear_1.bias"))
    save_file({k: v for k, v in weights.items() if k != bias}, str(path / "model.safetensors"))
    with pytest.raises(ConversionError, match="linear_1.bias.*multimodal_projector_bias"):
        load_hf_llava(path)


def _check_imported_matches(tmp_path, tokenizer, hf, path, tokens):
    out = tmp_path / "vlmkit"
    assert convert(path, out)[0] == "imported llava -> vlmkit vlm"
    ours = load_model(out)
    assert ours.cfg.image_tokens == tokens
    ids = torch.tensor([_prompt_ids(tokenizer, tokens)])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pixels), hf(input_ids=ids, pixel_values=pixels).logits, **TOL)
        theirs = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=8, do_sample=False,
                             eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)[0, ids.shape[1]:]
    mine = Engine(ours, tokenizer.pad_id).generate([ids[0].tolist()], [pixels],
                                                   SamplingParams(max_new_tokens=8, stop_ids=(tokenizer.eos_id,)))[0]
    assert mine == theirs.tolist()


def _vlmkit_vlm(tmp_path, tokenizer, vision: dict, select: str = "patch", layer: int = -1,
                projector: dict | None = None, image_positions: str = "sequential"):
    torch.manual_seed(1)
    cfg = VLMConfig.from_dict({
        "image_positions": image_positions,
        "vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 4, "mlp_dim": 64, **vision},
        "projector": projector or {},
        "decoder": {"vocab_size": tokenizer.vocab_size, "width": 48, "depth": 2, "heads": 6, "kv_heads": 2,
                    "mlp_dim": 96, "max_positions": 128, "tie_embeddings": True},
        "vision_select": select, "vision_layer": layer, "image_token_id": tokenizer.image_id,
    })
    model = VisionLanguageModel(cfg).eval()
    for p in model.parameters():  # random norms and biases too, so a dropped or swapped tensor shows
        p.data.add_(torch.randn_like(p) * 0.02)
    path = tmp_path / "ours"
    save_checkpoint(path, model, "vlm", cfg.to_dict(), tokenizer, ImageTransform(size=32).to_dict())
    return path


@pytest.mark.parametrize("vision,select,layer", [
    ({}, "patch", -1),                                                  # vlmkit's own towers: ViT layout
    ({"norm_pre": True, "patch_bias": False, "act": "quick_gelu"}, "all", 0),   # CLIP layout
    ({"class_token": False, "act": "gelu_tanh"}, "all", -2),            # SigLIP layout
])
def test_exported_llava_generates_the_same_text_in_transformers(tmp_path, tokenizer, vision, select, layer):
    import vlmkit

    ours = _vlmkit_vlm(tmp_path, tokenizer, vision, select, layer)
    hf_dir = tmp_path / "hf"
    assert convert(ours, hf_dir)[0] == "exported vlmkit vlm -> Hugging Face LlavaForConditionalGeneration"
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    processor = transformers.AutoProcessor.from_pretrained(hf_dir)

    image = Image.new("RGB", (45, 37), (200, 30, 30))
    image.paste((20, 20, 220), (5, 5, 25, 20))
    assistant = vlmkit.load(ours, device="cpu")
    prompt = assistant.tokenizer.apply_chat_template([{"role": "user", "content": "<image>\n" + QUESTION}],
                                                     add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    K = assistant.model.cfg.image_tokens
    assert inputs["input_ids"][0].tolist() == _prompt_ids(tokenizer, K)
    torch.testing.assert_close(inputs["pixel_values"][0], assistant.transform(image), atol=1e-5, rtol=0)
    with torch.no_grad():
        out = hf.eval().generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    theirs = processor.tokenizer.decode(out, skip_special_tokens=True)
    assert theirs == assistant.ask(image, QUESTION, max_new_tokens=8)


def test_round_trip_gives_identical_tensors(tmp_path, tokenizer):
    for vision in ({}, {"norm_pre": True, "patch_bias": False}):
        ours = _vlmkit_vlm(tmp_path, tokenizer, vision)
        convert(ours, tmp_path / "hf")
        convert(tmp_path / "hf", tmp_path / "back")
        a, b = load_model(ours).state_dict(), load_model(tmp_path / "back").state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        expected = load_model(ours).cfg.to_dict()
        expected["projector"]["hidden"] = expected["decoder"]["width"]  # None means "the LM width"; HF spells it out
        assert load_model(tmp_path / "back").cfg.to_dict() == expected


def test_export_refuses_what_llava_cannot_hold(tmp_path, tokenizer):
    ours = _vlmkit_vlm(tmp_path, tokenizer, {}, projector={"position_embedding": True})
    with pytest.raises(ConversionError, match="position_embedding has no LLaVA equivalent"):
        convert(ours, tmp_path / "hf")
    ours = _vlmkit_vlm(tmp_path, tokenizer, {}, image_positions="shared")
    with pytest.raises(ConversionError, match="image_positions 'shared' has no LLaVA equivalent"):
        convert(ours, tmp_path / "hf")


def test_bad_llava_directories_are_named_errors(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    _, path, _ = _hf_llava(tmp_path, tokenizer, "vit", "llama", -1, "default")
    weights = load_file(str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())

    broken = dict(weights)
    del broken["multi_modal_projector.linear_2.weight"]
    save_file(broken, str(path / "model.safetensors"))
    with pytest.raises(ConversionError, match="multi_modal_projector.linear_2.weight"):
        load_hf_llava(path)

    save_file({**weights, "language_model.model.extra.weight": torch.zeros(2)}, str(path / "model.safetensors"))
    with pytest.raises(ConversionError, match="extra.weight"):
        load_hf_llava(path)

    save_file(weights, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**config, "vision_feature_layer": [-2, -1]}))
    with pytest.raises(ConversionError, match="several layers"):
        load_hf_llava(path)

    (path / "config.json").write_text(json.dumps({**config, "vision_config": {"model_type": "pixtral"}}))
    with pytest.raises(ConversionError, match="clip_vision_model, siglip_vision_model, vit"):
        load_hf_llava(path)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ConversionError, match="bert, clip, idefics3, llama, llava, qwen2, siglip, smolvlm"):
        convert(tmp_path, tmp_path / "out")


# The chat templates the llava-hf checkpoints ship: they loop over typed content parts and
# print nothing for a content string.
LLAVA_TEMPLATES = {
    # llava-hf/llava-1.5-*-hf: images first, then text; {% generation %} marks answers.
    "llava-1.5": (
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
        "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
        "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
        "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
        "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"),
    # llava-interleave style: ChatML, parts in the order given.
    "llava-interleave": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% for content in "
        "message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}{% elif content['type'] == "
        "'text' %}{{ content['text'] }}{% endif %}{% endfor %}{{'<|im_end|>\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    # llava-onevision style: images, then each text after a newline; <|im_end|> outside the answer.
    "llava-onevision": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{% for content in "
        "message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
        "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', "
        "'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}{% else %}{% for content in "
        "message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ '\n' + content['text'] }}"
        "{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
}


def _two_images():
    a = Image.new("RGB", (45, 37), (200, 30, 30))
    a.paste((20, 20, 220), (5, 5, 25, 20))
    b = Image.new("RGB", (30, 52), (20, 180, 40))
    return [a, b]


@pytest.mark.parametrize("name", sorted(LLAVA_TEMPLATES))
def test_llava_hf_templates_give_the_processors_ids_and_text(tmp_path, tokenizer, name):
    """A llava-hf checkpoint with its processor's typed-part template: after `convert`, a two-image,
    two-turn prompt gives the HF processor's ids and pixels, the same logits and the same greedy text."""
    import vlmkit
    from vlmkit.inference.assistant import Request

    hf, path, tokens = _hf_llava(tmp_path, tokenizer, "clip", "llama", -2, "default")
    template = LLAVA_TEMPLATES[name]
    (path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    processor = transformers.LlavaProcessor(
        image_processor=transformers.AutoImageProcessor.from_pretrained(path),
        tokenizer=transformers.AutoTokenizer.from_pretrained(path), patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=template)
    convert(path, tmp_path / "ours")
    assistant = vlmkit.load(tmp_path / "ours", device="cpu")

    images = _two_images()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
                {"role": "user", "content": [{"type": "text", "text": "And here?"}, {"type": "image"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == assistant.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=images, return_tensors="pt")
    ids, pixels = assistant.prepare(Request(messages, images))
    assert ids == inputs["input_ids"][0].tolist()
    assert ids.count(tokenizer.image_id) == 2 * tokens
    torch.testing.assert_close(pixels, inputs["pixel_values"], atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(assistant.model(torch.tensor([ids]), pixels),
                                   hf(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits,
                                   **TOL)
        out = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert assistant.chat(messages, images, max_new_tokens=8) == processor.tokenizer.decode(out, skip_special_tokens=True)
    # The same conversation as strings with placeholders, and with the images inside the parts.
    as_strings = [{"role": "user", "content": "<image>\n" + QUESTION}, {"role": "assistant", "content": "red"},
                  {"role": "user", "content": "And here?\n<image>"}]
    assert assistant.prepare(Request(as_strings, images))[0] == ids
    carried = [{"role": m["role"], "content": [dict(p) for p in m["content"]]} for m in messages]
    carried[0]["content"][0]["image"], carried[2]["content"][1]["image"] = images
    assert assistant.prepare(Request(carried))[0] == ids


def test_an_imported_llava_fine_tunes_and_exports_back(tmp_path, tokenizer):
    """init = a LLaVA directory; LoRA on the LM and the whole tower on LLaVA JSON: the loss falls,
    the adapters are merged, and the exported LLaVA gives vlmkit's logits in transformers."""
    import vlmkit
    from vlmkit.presets import vlm_preset
    from vlmkit.training.instruct import train_vlm

    _, path, _ = _hf_llava(tmp_path, tokenizer, "clip", "llama", -2, "default")
    records = []
    for i in range(12):
        colour = ("red", (220, 30, 30)) if i % 2 else ("blue", (30, 30, 220))
        Image.new("RGB", (40 + 7 * i, 30 + 5 * i), colour[1]).save(tmp_path / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + QUESTION}, {"from": "gpt", "value": colour[0]}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    cfg = vlm_preset("tiny").override({
        "init": str(path), "data.source": str(tmp_path / "data.json"), "align.skip": True,
        "instruct.language_model": "lora", "instruct.vision": "full", "instruct.lora_rank": 4,
        "instruct.train.steps": 30, "instruct.train.batch_size": 6, "instruct.train.lr": 1e-2,
        "instruct.train.log_every": 1, "instruct.train.warmup_steps": 0})
    run = train_vlm(cfg, tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "instruct" / "metrics.jsonl").read_text()
              .splitlines() if "loss" in line]
    # A random LM's frozen output layer caps how sure it can get: the loss falls, and every
    # training question must be answered right.
    assert run.status == "done" and losses[-1] < 0.85 * losses[0]
    assert "lora" not in json.loads((run.model_dir / "config.json").read_text())   # merged (the default)
    tuned = vlmkit.load(run.model_dir, device="cpu")
    start = load_hf_llava(path)[1]["vision_tower.patch_embed.weight"]
    assert not torch.equal(tuned.model.vision_tower.patch_embed.weight, start)   # the tower trained too

    assert convert(run.model_dir, tmp_path / "hf")[0].endswith("LlavaForConditionalGeneration")
    exported = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    image = Image.open(tmp_path / "3.png")
    prompt = tuned.tokenizer.apply_chat_template([{"role": "user", "content": "<image>\n" + QUESTION}],
                                                 add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits,
                                   tuned.model(inputs["input_ids"], inputs["pixel_values"]), **TOL)
    answers = [tuned.ask(Image.open(tmp_path / f"{i}.png"), QUESTION, max_new_tokens=2).strip() for i in range(12)]
    assert answers == [("red" if i % 2 else "blue") for i in range(12)]
