"""Idefics3 / SmolVLM <-> vlmkit VLM: transformers' own models and processors are the reference.

Small random instances of both families (tile 32 px, 8 px patches, shuffle 2: 4 tokens per
tile), images of several sizes so each gives another number of tiles, splitting on and off:
the tiles' pixels, the prompt's ids, the logits and the greedy text must all be transformers'.
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

import vlmkit  # noqa: E402
from vlmkit.checkpoint import load_model  # noqa: E402
from vlmkit.convert.auto import convert  # noqa: E402
from vlmkit.convert.hf_io import ConversionError  # noqa: E402
from vlmkit.convert.hf_processor import tiled_transform_from_hf  # noqa: E402
from vlmkit.convert.hf_smolvlm import load_hf_smolvlm  # noqa: E402
from vlmkit.data.lm_tokenizer import LMTokenizer  # noqa: E402
from vlmkit.inference.assistant import Request  # noqa: E402
from vlmkit.inference.engine import SamplingParams  # noqa: E402

TOL = dict(atol=1e-4, rtol=1e-4)
# The chat template SmolVLM-Instruct checkpoints ship.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == "
    "'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
CORPUS = ["What colour is the square?", "red", "blue", "Describe the image.", "a green square on the left.",
          "Which picture is brighter?", "the first one", "User: Assistant:"] * 5
SIZES = [(45, 37), (100, 30), (20, 130), (32, 32), (200, 150), (60, 40), (300, 2), (2, 200), (1, 1)]  # (w, h)


def picture(size, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def tokenizer() -> LMTokenizer:
    base = LMTokenizer.train(CORPUS, vocab_size=300, min_frequency=1)
    markers = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
    markers += [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    base.backend.add_special_tokens(markers)
    specials = {"eos_token": "<end_of_utterance>", "bos_token": "<|im_start|>", "pad_token": "<|endoftext|>"}
    return LMTokenizer(base.backend, specials, SMOLVLM_TEMPLATE)


def image_processor(split: bool = True):
    return transformers.Idefics3ImageProcessorPil(size={"longest_edge": 96}, max_image_size={"longest_edge": 32},
                                                  do_image_splitting=split)


@pytest.mark.parametrize("split", [True, False])
def test_tiles_and_pixels_are_the_image_processors(split):
    processor = image_processor(split)
    ours = tiled_transform_from_hf(processor.to_dict())
    for i, size in enumerate(SIZES):
        image = picture(size, i)
        theirs = processor(images=[[image]], return_tensors="pt", return_row_col_info=True)
        pixels, rows, cols = ours.tiles(image)
        assert (rows, cols) == (theirs["rows"][0][0], theirs["cols"][0][0]), size
        torch.testing.assert_close(pixels, theirs["pixel_values"][0], atol=1e-6, rtol=0)
    if split:  # the sizes above really do give different tile counts
        assert len({ours.tiles(picture(s))[1:] for s in SIZES}) >= 4


def _hf_model(tmp_path, tokenizer, family: str, tie: bool, split: bool = True):
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    text = dict(model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, intermediate_size=80, rms_norm_eps=1e-5,
                max_position_embeddings=512, rope_theta=10000.0)
    config_class, model_class = ((transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration)
                                 if family == "smolvlm" else
                                 (transformers.Idefics3Config, transformers.Idefics3ForConditionalGeneration))
    cfg = config_class(vision_config=vision, text_config=text, scale_factor=2, image_token_id=tokenizer.image_id,
                       tie_word_embeddings=tie)
    model = model_class(cfg).eval()
    for p in model.parameters():  # random norms too, so a dropped or swapped tensor shows
        p.data.add_(torch.randn_like(p) * 0.02)
    path = tmp_path / f"hf-{family}"
    model.save_pretrained(path)
    tokenizer.save(path)
    settings = image_processor(split).to_dict()
    (path / "preprocessor_config.json").write_text(json.dumps(settings))
    processor = {"image_seq_len": 4, "processor_class": "Idefics3Processor"}
    (path / "processor_config.json").write_text(json.dumps(processor))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": SMOLVLM_TEMPLATE}))
    return model, path


def _processor(path):
    return transformers.Idefics3Processor(image_processor=transformers.AutoImageProcessor.from_pretrained(path),
                                          tokenizer=transformers.AutoTokenizer.from_pretrained(path),
                                          image_seq_len=4, chat_template=SMOLVLM_TEMPLATE)


def _inputs(processor, messages, images):
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return prompt, processor(text=prompt, images=images, return_tensors="pt")


def _greedy(hf, inputs, tokenizer) -> str:
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_id,
                          pad_token_id=tokenizer.pad_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:].tolist())


@pytest.mark.parametrize("family,tie,split", [("smolvlm", False, True), ("idefics3", True, True),
                                              ("smolvlm", True, False)])
def test_imported_model_matches_transformers(tmp_path, tokenizer, family, tie, split):
    hf, path = _hf_model(tmp_path, tokenizer, family, tie, split)
    assert convert(path, tmp_path / "ours")[0] == f"imported {family} -> vlmkit vlm"
    assistant = vlmkit.load(tmp_path / "ours", device="cpu")
    processor = _processor(path)

    images = [picture((100, 30), 1), picture((45, 37), 2)]   # 1x3 and 3x3 tiles (+ global views) when split
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a green square on the left."}]},
                {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]}]
    prompt, inputs = _inputs(processor, messages, images)
    assert prompt == assistant.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids, pixels = assistant.prepare(Request(messages, images))
    assert ids == inputs["input_ids"][0].tolist()
    real = inputs["pixel_values"][0][: len(pixels)]
    assert len(pixels) == (4 + 10 if split else 2)
    torch.testing.assert_close(pixels, real, atol=1e-6, rtol=0)
    assert not inputs["pixel_values"][0][len(pixels):].any()   # what is left is the processor's zero padding
    with torch.no_grad():
        torch.testing.assert_close(assistant.model(torch.tensor([ids]), pixels), hf(**inputs).logits, **TOL)
    assert assistant.chat(messages, images, max_new_tokens=8) == _greedy(hf, inputs, tokenizer)


def test_prompts_with_different_image_counts_batch_like_one_at_a_time(tmp_path, tokenizer):
    _, path = _hf_model(tmp_path, tokenizer, "smolvlm", False)
    convert(path, tmp_path / "ours")
    assistant = vlmkit.load(tmp_path / "ours", device="cpu")
    requests = [Request([{"role": "user", "content": "Which picture is brighter?<image><image>"}],
                        [picture((100, 30), 3), picture((20, 130), 4)], max_new_tokens=6),
                Request([{"role": "user", "content": "<image>Describe the image."}], [picture((200, 150), 5)],
                        max_new_tokens=6),
                Request([{"role": "user", "content": "What colour is the square?"}], max_new_tokens=6)]
    assert assistant.generate_batch(requests) == [assistant.generate_batch([r])[0] for r in requests]


def test_export_runs_in_transformers_and_round_trips(tmp_path, tokenizer):
    hf, path = _hf_model(tmp_path, tokenizer, "idefics3", False)
    convert(path, tmp_path / "ours")
    assert convert(tmp_path / "ours", tmp_path / "out")[0] == \
        "exported vlmkit vlm -> Hugging Face SmolVLMForConditionalGeneration"
    exported, info = transformers.SmolVLMForConditionalGeneration.from_pretrained(tmp_path / "out",
                                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    processor = _processor(tmp_path / "out")
    images = [picture((200, 150), 6)]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    _, inputs = _inputs(processor, messages, images)
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(**inputs).logits, hf(**inputs).logits, **TOL)
    assert _greedy(exported, inputs, tokenizer) == vlmkit.load(tmp_path / "ours", device="cpu").chat(
        messages, images, max_new_tokens=8)

    convert(tmp_path / "out", tmp_path / "back")
    a, b = load_model(tmp_path / "ours").state_dict(), load_model(tmp_path / "back").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "back" / "preprocessor.json").read_text()) == \
        json.loads((tmp_path / "ours" / "preprocessor.json").read_text())


def test_cli_ask_runs_an_imported_model(tmp_path, tokenizer, capsys):
    from vlmkit.cli import main

    _, path = _hf_model(tmp_path, tokenizer, "smolvlm", False)
    convert(path, tmp_path / "ours")
    picture((100, 30), 7).save(tmp_path / "a.png")
    picture((30, 90), 8).save(tmp_path / "b.png")
    assert main(["ask", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "Which picture is brighter?",
                 "--model", str(tmp_path / "ours"), "--max-tokens", "5"]) == 0
    expected = vlmkit.load(tmp_path / "ours", device="cpu").ask(
        [tmp_path / "a.png", tmp_path / "b.png"], "Which picture is brighter?", max_new_tokens=5)
    assert capsys.readouterr().out.strip() == expected.strip()


def test_bad_directories_are_named_errors(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    _, path = _hf_model(tmp_path, tokenizer, "smolvlm", False)
    weights = load_file(str(path / "model.safetensors"))
    connector = next(k for k in weights if "modality_projection" in k)
    save_file({k: v for k, v in weights.items() if k != connector}, str(path / "model.safetensors"))
    with pytest.raises(ConversionError, match="modality_projection"):
        load_hf_smolvlm(path)
    save_file(weights, str(path / "model.safetensors"))
    (path / "processor_config.json").write_text(json.dumps({"image_seq_len": 169}))
    with pytest.raises(ConversionError, match="image_seq_len 169"):
        load_hf_smolvlm(path)
    (path / "processor_config.json").write_text(json.dumps({"image_seq_len": 4}))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "scale_factor": 3}))
    with pytest.raises(ConversionError, match="scale_factor 3"):
        load_hf_smolvlm(path)


def test_chat_and_serve_run_an_imported_model(tmp_path, tokenizer):
    """A chat session keeps its images across turns; the OpenAI endpoint answers two interleaved images."""
    import base64
    import io

    from fastapi.testclient import TestClient

    from vlmkit.inference.chat_session import ChatSession
    from vlmkit.serving.app import ServeSettings, create_app

    _, path = _hf_model(tmp_path, tokenizer, "smolvlm", False)
    convert(path, tmp_path / "ours")
    assistant = vlmkit.load(tmp_path / "ours", device="cpu")
    first, second = picture((100, 30), 9), picture((30, 90), 10)

    session = ChatSession(assistant, max_new_tokens=5)
    session.attach(first)
    reply = "".join(session.send("Describe the image."))
    session.attach(second)
    "".join(session.send("And this one?"))
    assert reply == assistant.chat([{"role": "user", "content": "<image>\nDescribe the image."}], [first],
                                   max_new_tokens=5)
    assert len(session.images) == 2 and session.messages[-1]["role"] == "assistant"

    def url(image):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    content = [{"type": "image_url", "image_url": {"url": url(first)}}, {"type": "text", "text": "or"},
               {"type": "image_url", "image_url": {"url": url(second)}}, {"type": "text", "text": "Which is brighter?"}]
    with TestClient(create_app({"smolvlm": assistant}, ServeSettings(max_tokens=16))) as client:
        r = client.post("/v1/chat/completions", json={"model": "smolvlm", "max_tokens": 5, "temperature": 0,
                                                      "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 200, r.text
    parts = [{"type": "image", "image": first}, {"type": "text", "text": "or"}, {"type": "image", "image": second},
             {"type": "text", "text": "Which is brighter?"}]
    assert r.json()["choices"][0]["message"]["content"] == assistant.chat([{"role": "user", "content": parts}],
                                                                          max_new_tokens=5)


def test_every_eos_token_id_of_generation_config_stops_the_answer(tmp_path, tokenizer):
    """SmolVLM lists two end tokens; generation stops at either, as in transformers."""
    hf, path = _hf_model(tmp_path, tokenizer, "smolvlm", False)
    convert(path, tmp_path / "plain")
    image = picture((45, 37), 11)
    free = vlmkit.load(tmp_path / "plain", device="cpu")
    ids, pixels = free.prepare(Request([{"role": "user", "content": "<image>Describe the image."}], [image]))
    first = free.engine.generate([ids], [pixels], SamplingParams(max_new_tokens=3))[0]
    stop = first[1]   # the second greedy token becomes an end token
    assert first[0] != stop
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokenizer.eos_id, stop]}))
    convert(path, tmp_path / "ours")
    assistant = vlmkit.load(tmp_path / "ours", device="cpu")
    assert assistant.tokenizer.stop_ids == (tokenizer.eos_id, stop)
    answer = assistant.ask(image, "Describe the image.", max_new_tokens=8)
    assert answer == tokenizer.decode(first[:1])
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    _, inputs = _inputs(_processor(path), question, [image])
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=[tokenizer.eos_id, stop],
                          pad_token_id=tokenizer.pad_id)[0, inputs["input_ids"].shape[1]:]
    assert out.tolist() == first[:2]
    exported = tmp_path / "out"
    convert(tmp_path / "ours", exported)
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == [tokenizer.eos_id, stop]


def _llava_json(tmp_path, n: int = 12) -> str:
    """Red and blue pictures with a question each, in the LLaVA format."""
    records = []
    for i in range(n):
        colour = ("red", (220, 30, 30)) if i % 2 else ("blue", (30, 30, 220))
        Image.new("RGB", (40 + 7 * i, 30 + 5 * i), colour[1]).save(tmp_path / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": colour[0]}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    return str(tmp_path / "data.json")


def test_an_imported_model_fine_tunes_with_lora_and_goes_back(tmp_path, tokenizer):
    """init = a SmolVLM directory; LoRA on LLaVA JSON: the loss falls, the adapters are saved apart,
    `vlmkit merge` folds them in, and the exported model gives vlmkit's logits in transformers."""
    from fastapi.testclient import TestClient

    from vlmkit.cli import main
    from vlmkit.presets import vlm_preset
    from vlmkit.serving.app import create_app
    from vlmkit.training.instruct import train_vlm

    _, path = _hf_model(tmp_path, tokenizer, "smolvlm", False)
    cfg = vlm_preset("tiny").override({
        "init": str(path), "data.source": _llava_json(tmp_path), "data.max_length": 256, "align.skip": True,
        "instruct.language_model": "lora", "instruct.lora_rank": 4, "instruct.merge_lora": False,
        "instruct.train.steps": 30, "instruct.train.batch_size": 6, "instruct.train.lr": 1e-2,
        "instruct.train.log_every": 1, "instruct.train.warmup_steps": 0})
    run = train_vlm(cfg, tmp_path / "run", progress=False)
    assert run.status == "done"
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "instruct" / "metrics.jsonl").read_text()
              .splitlines() if "loss" in line]
    # A random LM's frozen output layer caps how sure it can get (the loss stalls near 4.5);
    # what must happen is that the loss falls and every training question is answered right.
    assert losses[-1] < 0.85 * losses[0]

    saved = json.loads((run.model_dir / "config.json").read_text())
    assert saved["lora"]["rank"] == 4 and all(".blocks." in name for name in saved["lora"]["layers"])
    assert main(["merge", str(run.model_dir), str(tmp_path / "merged")]) == 0
    assert "lora" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    tuned = vlmkit.load(run.model_dir, device="cpu")   # loading merges too: both give the same answers
    merged = vlmkit.load(tmp_path / "merged", device="cpu")
    answers = [tuned.ask(Image.open(tmp_path / f"{i}.png"), "What colour is the square?", max_new_tokens=4).strip()
               for i in range(12)]
    assert answers == [("red" if i % 2 else "blue") for i in range(12)]
    image = Image.open(tmp_path / "3.png")
    assert merged.ask(image, "What colour is the square?", max_new_tokens=4).strip() == "red"

    assert convert(run.model_dir, tmp_path / "hf")[0].endswith("SmolVLMForConditionalGeneration")
    exported = transformers.SmolVLMForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}]
    _, inputs = _inputs(_processor(tmp_path / "hf"), messages, [image])
    ids, pixels = merged.prepare(Request(messages, [image]))
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits, merged.model(torch.tensor([ids]), pixels), **TOL)

    with TestClient(create_app({"tuned": tuned})) as client:
        r = client.post("/v1/chat/completions", json={"model": "tuned", "max_tokens": 3, "temperature": 0,
                                                      "messages": [{"role": "user", "content": "What colour is the square?"}]})
    assert r.status_code == 200, r.text
