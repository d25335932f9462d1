"""The `vlmkit` command line: subcommands generated from typed functions.

Each command is a plain function with type hints and a docstring whose "Args:" lines
become the --help text; `build_parser` turns signatures into argparse, so flags are
never copied by hand. `main(argv)` is callable from tests.
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Callable, Literal

from vlmkit.runtime import configure_logging, main_process, missing_dependency

log = logging.getLogger("vlmkit.cli")
Precision = Literal["auto", "fp32", "bf16", "int8"]

# ---- commands -------------------------------------------------------------------------


def presets() -> None:
    """List the named presets (Stage 1: train clip; Stage 2: train vlm)."""
    from vlmkit.presets import describe_presets, describe_vlm_presets

    for title, rows in (("train clip --preset", describe_presets()), ("train vlm --preset", describe_vlm_presets())):
        print(f"{title}:")
        for name, doc in rows:
            print(f"  {name:18s} {doc.splitlines()[0] if doc else ''}")


def _parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def train_clip(preset: str = "shapes", out: str = "runs/clip", config: str | None = None,
               set: list[str] | None = None, resume: bool = False, overwrite: bool = False) -> None:
    """Train a CLIP-style dual encoder (Stage 1, contrastive alignment).

    Args:
        preset: a named preset (see `vlmkit presets`) to start from.
        out: the run directory (checkpoints, metrics.jsonl, model/, report).
        config: a JSON run config to use instead of the preset.
        set: overrides as dotted key=value, e.g. train.steps=500 data.source=fashion_mnist.
        resume: a run already in `out` resumes by itself when the config is the same; this lets it also take new train.steps, log_every, eval_every, save_every or keep_checkpoints.
        overwrite: delete the run already in `out` and start again.
    """
    from vlmkit.config import ClipRunConfig
    from vlmkit.evaluation.hooks import ClipHooks
    from vlmkit.presets import preset as get_preset
    from vlmkit.training.contrastive import train_clip as run

    cfg = ClipRunConfig.load(config) if config else get_preset(preset)
    cfg = cfg.override(_parse_overrides(set or []))
    result = run(cfg, out, _existing(resume, overwrite), hooks=ClipHooks())
    if main_process():
        print(json.dumps({"status": result.status, "model": str(result.model_dir), **result.results},
                         indent=2))


def data_pack(source: str, out: str, shard_size: int = 1000, split: str = "train", limit: int | None = None,
              set: list[str] | None = None) -> None:
    """Write image-caption pairs as webdataset tar shards, to train on with data.shards=OUT.

    Args:
        source: a built-in source (shapes, fashion_mnist, digits, ...) or a .jsonl/.csv captions file or a folder holding one.
        out: a new folder for the shards, captions.jsonl and index.json.
        shard_size: samples per shard; keep at least (processes x data.workers) shards.
        split: the split of a built-in source to pack.
        limit: pack at most this many pairs (the generated `shapes` world makes this many).
        set: the source's own options as key=value, e.g. image_size=64.
    """
    from vlmkit.data.shards import pack
    from vlmkit.data.sources import build_source

    options = _parse_overrides(set or [])
    if source == "shapes" and limit is not None:
        options.setdefault("size", limit)
    index = pack(build_source(source, split, **options), out, shard_size, limit)
    print(json.dumps({"status": "packed", "out": out, "samples": index["samples"], "shards": len(index["shards"]),
                      "skipped": index["skipped"]}, indent=2))


def train_vlm(preset: str = "shapes", out: str = "runs/vlm", vision_init: str | None = None,
              init: str | None = None, config: str | None = None, set: list[str] | None = None,
              resume: bool = False, overwrite: bool = False) -> None:
    """Train a generative VLM (Stage 2: projector + decoder LM, align then instruct phases).

    Args:
        preset: a named Stage 2 preset (see `vlmkit presets`).
        out: the run directory (align/, instruct/, model/, eval.md, answers.jsonl).
        vision_init: a Stage 1 checkpoint whose vision tower to start from.
        init: a whole VLM to fine-tune (a vlmkit VLM checkpoint, or a Hugging Face LLaVA / SmolVLM directory).
        config: a JSON run config to use instead of the preset.
        set: overrides as dotted key=value, e.g. instruct.train.steps=500 lm_init=smollm2.
        resume: a run already in `out` resumes by itself when the config is the same; this lets it also take new steps, log_every, eval_every, save_every or keep_checkpoints of a phase.
        overwrite: delete the run already in `out` and start again.
    """
    from vlmkit.config import VlmRunConfig
    from vlmkit.evaluation.hooks import VlmHooks
    from vlmkit.presets import vlm_preset
    from vlmkit.training.instruct import train_vlm as run

    cfg = VlmRunConfig.load(config) if config else vlm_preset(preset)
    overrides = _parse_overrides(set or [])
    if vision_init:
        overrides["vision_init"] = vision_init
    if init:
        overrides["init"] = init
    result = run(cfg.override(overrides), out, _existing(resume, overwrite), hooks=VlmHooks())
    if main_process():
        print(json.dumps({"status": result.status, "model": str(result.model_dir), **result.results},
                         indent=2))


def _existing(resume: bool, overwrite: bool) -> str:
    """The recipes' `existing` argument from the two flags."""
    if resume and overwrite:
        raise ValueError("--resume keeps the run in --out and --overwrite deletes it: choose one")
    return "overwrite" if overwrite else "resume" if resume else "continue"


def _sampling(max_tokens: int, temperature: float, top_p: float, seed: int) -> dict:
    return {"max_new_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}


def caption(image: str, model: str, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
            seed: int = 0, heatmap: str | None = None, precision: Precision = "auto") -> None:
    """Describe an image in one sentence (alt text).

    Args:
        image: an image file.
        model: a Stage 2 checkpoint directory.
        max_tokens: the most tokens to generate.
        temperature: 0 for greedy decoding; higher samples more freely.
        top_p: nucleus sampling threshold.
        seed: sampling seed.
        heatmap: write a PNG of where each word looked in the image.
        precision: auto (bf16 LM weights; bf16 arithmetic only where the hardware has it), fp32, bf16, or int8 (int8 LM weights).
    """
    from vlmkit.inference.api import load

    m = _assistant(load(model, precision=precision))
    text = m.caption(image, **_sampling(max_tokens, temperature, top_p, seed))
    print(text)
    if heatmap:
        from vlmkit.inference.assistant import CAPTION_PROMPT

        log.info(f"wrote {m.explain(image, CAPTION_PROMPT, heatmap, answer=text)}")


def ask(image: list[str], question: str, model: str, max_tokens: int = 64, temperature: float = 0.0,
        top_p: float = 1.0, seed: int = 0, heatmap: str | None = None, precision: Precision = "auto") -> None:
    """Answer a question about one image or several (list them all before the question).

    Args:
        image: image files; with several, `<image>` in the question places each, else all go first.
        question: the question, e.g. "what colour is the circle?".
        model: a Stage 2 checkpoint directory.
        max_tokens: the most tokens to generate.
        temperature: 0 for greedy decoding; higher samples more freely.
        top_p: nucleus sampling threshold.
        seed: sampling seed.
        heatmap: write a PNG of where each answer token looked in the image (one image only).
        precision: auto (bf16 LM weights; bf16 arithmetic only where the hardware has it), fp32, bf16, or int8 (int8 LM weights).
    """
    from vlmkit.inference.api import load

    if heatmap and len(image) > 1:
        raise ValueError("--heatmap explains one image; ask about one image to draw it")
    m = _assistant(load(model, precision=precision))
    answer = m.ask(image, question, **_sampling(max_tokens, temperature, top_p, seed))
    print(answer)
    if heatmap:
        log.info(f"wrote {m.explain(image[0], question, heatmap, answer=answer)}")


def describe(folder: str, model: str, out: str = "alt.jsonl", format: Literal["jsonl", "html"] = "jsonl",
             prompt: str = "Describe the image.", batch_size: int = 8, max_tokens: int = 64,
             precision: Precision = "auto") -> None:
    """Write alt text for every image in a folder (resumable: run it again to continue).

    Args:
        folder: a folder of images (subfolders included; other files are ignored).
        model: a Stage 2 checkpoint directory.
        out: the JSONL file of descriptions (one line per image; also the run's progress).
        format: html also writes a page of the images with their descriptions (OUT with .html).
        prompt: what to ask about each image.
        batch_size: images described together.
        max_tokens: the most tokens per description.
        precision: auto (bf16 LM weights; bf16 arithmetic only where the hardware has it), fp32, bf16, or int8 (int8 LM weights).
    """
    from vlmkit.inference.api import load
    from vlmkit.inference.describe import describe_folder, read_records, write_page

    jsonl = Path(out).with_suffix(".jsonl") if format == "html" else Path(out)
    done = describe_folder(_assistant(load(model, precision=precision)), folder, jsonl, prompt, batch_size, max_tokens)
    log.info(f"{done.described} described, {done.failed} unreadable, {done.skipped} done before: {jsonl}")
    if format == "html":
        print(write_page(read_records(jsonl), folder, Path(out).with_suffix(".html")))
    else:
        print(jsonl)


def chat(model: str, image: list[str] | None = None, max_tokens: int = 256, temperature: float = 0.0,
         top_p: float = 1.0, seed: int = 0, precision: Precision = "auto") -> None:
    """Talk with a model about images, streaming its replies (/image PATH, /reset, /quit).

    Args:
        model: a Stage 2 checkpoint directory.
        image: images to start the conversation with (they go with the first message).
        max_tokens: the most tokens per reply.
        temperature: 0 for greedy decoding; higher samples more freely.
        top_p: nucleus sampling threshold.
        seed: sampling seed.
        precision: auto (bf16 LM weights; bf16 arithmetic only where the hardware has it), fp32, bf16, or int8 (int8 LM weights).
    """
    from vlmkit.inference.api import load
    from vlmkit.inference.chat_session import ChatSession

    session = ChatSession(_assistant(load(model, precision=precision)), **_sampling(max_tokens, temperature, top_p, seed))
    for path in image or ():
        session.attach(path)
        print(f"(image attached: {path})")
    print("Type a message; /image PATH attaches an image, /reset starts over, /quit leaves.")
    for line in sys.stdin if not sys.stdin.isatty() else iter(lambda: input("you> "), None):
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            print("(conversation cleared)")
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                session.attach(path)
                print(f"(image attached: {path})")
            except (ValueError, OSError) as e:
                print(f"(could not attach {path!r}: {e})")
            continue
        try:
            print("assistant> ", end="", flush=True)
            for piece in session.send(line):
                print(piece, end="", flush=True)
            print()
        except ValueError as e:  # an overlong conversation or a bad image: say so and keep going
            print(f"\n(error: {e})")


def _assistant(m):
    from vlmkit.inference.assistant import VisionLanguageAssistant

    if not isinstance(m, VisionLanguageAssistant):
        raise ValueError("this command needs a Stage 2 (vlm) checkpoint; a Stage 1 model can classify, "
                         "embed and search")
    return m


def _eval_vlm(kinds: tuple[str, ...] | None, name: str, model: str, data: str, split: str, size: int,
              out: str | None) -> dict:
    from vlmkit.config import VlmDataConfig
    from vlmkit.data.vqa_sets import build_set
    from vlmkit.evaluation.report import write_report
    from vlmkit.evaluation.vlm_eval import evaluate_vlm
    from vlmkit.inference.api import load

    m = _assistant(load(model, precision="fp32"))   # a score is of the model as trained, not of a faster copy
    options = {"image_size": m.transform.size} if data == "shapes" else {}
    cfg = VlmDataConfig(source=data, source_options=options, eval_size=size)
    conversations = build_set(cfg, split, size, m.transform).only(list(kinds) if kinds else None)
    results, records = evaluate_vlm(m.model, m.tokenizer, conversations)
    keep = ("vqa", "yes_no") if name == "vqa" else (name,)
    results = {k: v for k, v in results.items() if k in keep}
    if out:
        json_path, md_path = write_report(results, out, name, f"{name} evaluation of {model} on {data}/{split}")
        with open(Path(out) / f"{name}_answers.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        log.info(f"wrote {json_path} and {md_path}")
    print(json.dumps(results, indent=2))
    return results


def eval_vqa(model: str, data: str = "shapes", split: str = "test", size: int = 300, out: str | None = None) -> None:
    """VQA exact-match accuracy, overall and per question kind.

    Args:
        model: a Stage 2 checkpoint directory.
        data: shapes, easy_vqa, or a LLaVA .json/.jsonl file.
        split: which split (shapes: train/test/heldout; easy_vqa: train/test).
        size: how many images to ask about.
        out: a directory for vqa.json / vqa.md / vqa_answers.jsonl.
    """
    from vlmkit.evaluation.vlm_eval import SHORT_ANSWER_KINDS

    _eval_vlm(SHORT_ANSWER_KINDS + ("chat",), "vqa", model, data, split, size, out)


def eval_caption(model: str, data: str = "shapes", split: str = "test", size: int = 300, out: str | None = None) -> None:
    """Caption quality: BLEU-1..4 and CIDEr against the reference captions.

    Args:
        model: a Stage 2 checkpoint directory.
        data: shapes (the only built-in set with captions) or a LLaVA file of caption conversations.
        split: which split.
        size: how many images.
        out: a directory for caption.json / caption.md.
    """
    _eval_vlm(("caption",), "caption", model, data, split, size, out)


def eval_pope(model: str, data: str = "shapes", split: str = "test", size: int = 500, out: str | None = None) -> None:
    """POPE-style hallucination probes ("is there a X?"): accuracy, precision, recall, F1, yes-ratio.

    Args:
        model: a Stage 2 checkpoint directory.
        data: shapes.
        split: which split.
        size: how many images (one balanced probe each).
        out: a directory for pope.json / pope.md.
    """
    _eval_vlm(("exists",), "pope", model, data, split, size, out)


def eval_grounding(model: str, data: str = "shapes", split: str = "test", size: int = 300,
                   out: str | None = None) -> None:
    """Grounding: the box the model gives for "where is X?", scored as accuracy at IoU >= 0.5.

    Args:
        model: a Stage 2 checkpoint directory.
        data: shapes.
        split: which split.
        size: how many images.
        out: a directory for grounding.json / grounding.md.
    """
    _eval_vlm(("grounding",), "grounding", model, data, split, size, out)


def evaluate(model: str, data: str = "shapes", split: str = "test", size: int = 1000, out: str | None = None) -> None:
    """Evaluate a dual encoder: retrieval R@1/5/10 and zero-shot accuracy.

    Args:
        model: a vlmkit checkpoint directory.
        data: a built-in source (shapes, fashion_mnist, digits, easy_vqa) or a pairs file/folder.
        split: which split of the source.
        size: how many image-caption pairs (with distinct captions) to evaluate retrieval on.
        out: a directory for results.json / results.md (printed only when omitted).
    """
    from vlmkit.data.prepared import prepare
    from vlmkit.data.sources import build_source
    from vlmkit.evaluation.clip_eval import evaluate_dual_encoder, zero_shot_sets
    from vlmkit.evaluation.report import write_report
    from vlmkit.inference.api import load

    m = load(model, precision="fp32")   # a score is of the model as trained, not of a faster copy
    # Twice the size, so `size` pairs with distinct captions remain for retrieval.
    source = build_source(data, split, **({"size": 2 * size} if data == "shapes" else {}))
    pairs = prepare(source, m.transform, limit=2 * size, desc="eval data")
    sets = zero_shot_sets(source, pairs, m.transform, size)
    results = evaluate_dual_encoder(m.model, m.tokenizer, pairs, sets, device=m.device, retrieval_size=size)
    if out:
        json_path, md_path = write_report(results, out, "results", f"Evaluation of {model} on {data}/{split}")
        log.info(f"wrote {json_path} and {md_path}")
    print(json.dumps(results, indent=2))


def classify(image: str, model: str, labels: list[str], templates: list[str] | None = None) -> None:
    """Zero-shot classification of one image among the given labels.

    Args:
        image: an image file.
        model: a vlmkit checkpoint directory.
        labels: the candidate labels, e.g. --labels cat dog "red circle".
        templates: prompt templates with {} for the label (default: a small photo ensemble).
    """
    from vlmkit.inference.api import load

    for label, prob in load(model).classify(image, labels, templates):
        print(f"{prob:7.2%}  {label}")


def embed(model: str, images: list[str] | None = None, texts: list[str] | None = None,
          out: str = "embeddings.npz") -> None:
    """Embed images and/or texts into the shared space; writes an .npz file.

    Args:
        model: a vlmkit checkpoint directory.
        images: image files.
        texts: texts.
        out: the .npz file to write (arrays `images`, `texts`).
    """
    import numpy as np

    from vlmkit.inference.api import load

    if not images and not texts:
        raise ValueError("give --images and/or --texts")
    m = load(model)
    arrays = {}
    if images:
        arrays["images"] = m.embed_images(images).numpy()
    if texts:
        arrays["texts"] = m.embed_texts(texts).numpy()
    np.savez(out, **arrays)
    log.info(f"wrote {out}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items()))


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def search(model: str, query: str | None = None, folder: str | None = None, image: str | None = None,
           captions: str | None = None, top_k: int = 5) -> None:
    """Cross-modal search: text -> images in a folder, or image -> lines of a captions file.

    Args:
        model: a vlmkit checkpoint directory.
        query: the text to search images with (needs --folder).
        folder: a folder of images to search.
        image: an image to search captions with (needs --captions).
        captions: a text file, one caption per line.
        top_k: how many results to show.
    """
    from vlmkit.inference.api import load

    m = load(model)
    if query and folder:
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images found in {folder}")
        for index, score in m.search_images(query, [str(f) for f in files], top_k):
            print(f"{score:.3f}  {files[index]}")
    elif image and captions:
        lines = [line.strip() for line in Path(captions).read_text().splitlines() if line.strip()]
        for index, score in m.search_texts(image, lines, top_k):
            print(f"{score:.3f}  {lines[index]}")
    else:
        raise ValueError("give --query with --folder, or --image with --captions")


def demo(out: str = "runs/demo", steps: int | None = None, vlm_steps: int | None = None,
         smoke: bool = False) -> None:
    """The main job: both stages on the shapes world, evaluated, drawn and questioned; writes REPORT.md.

    Args:
        out: the run directory (stage1/, stage2/, REPORT.md).
        steps: Stage 1 training steps (default: the `shapes` preset's).
        vlm_steps: Stage 2 instruct steps (default: the Stage 2 `shapes` preset's).
        smoke: tiny data and a few steps, to check the wiring in seconds (scores mean nothing).
    """
    from vlmkit.demo import run_demo

    run_demo(out, steps, vlm_steps, smoke)


def serve(model: list[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          allow_remote_images: bool = False, allowed_media_domains: list[str] | None = None,
          media_path: str | None = None, max_tokens: int = 1024, max_prompt_tokens: int | None = None,
          max_n: int = 8, max_images: int = 8, max_body_mb: float = 32.0, max_image_mb: float = 16.0,
          batching: Literal["continuous", "static"] = "continuous", max_batch: int = 16, max_queue: int = 64,
          device: str | None = None, precision: Precision = "auto") -> None:
    """Serve models over an OpenAI-compatible API, with a web chat page at / and Prometheus metrics at /metrics.

    Args:
        model: one or more checkpoint directories (Stage 2 models chat; Stage 1 models embed).
        host: the address to bind; loopback by default, so nothing outside this machine can connect.
        port: the TCP port.
        api_key: when set, every /v1 request needs the header Authorization: Bearer KEY.
        allow_remote_images: let requests name http(s) image URLs that the server fetches (off: data: URLs only); only public addresses, at most 3 redirects, 10 s and --max-image-mb.
        allowed_media_domains: fetch remote images only from these hosts (and their subdomains), private addresses included.
        media_path: let requests name file:// image URLs under this folder.
        max_tokens: the largest max_tokens a request may ask for.
        max_prompt_tokens: the longest prompt, in tokens, images' tokens included (default: what the model's context holds).
        max_n: the largest n (choices) a request may ask for.
        max_images: images per request.
        max_body_mb: the largest request body, in MB (413 beyond).
        max_image_mb: the largest image file, in MB (413 beyond).
        batching: continuous (requests join and leave the running batch between decode steps) or static (a batch forms, runs to its end, then the next).
        max_batch: requests decoded together.
        max_queue: requests that may wait; beyond that the server answers 503.
        device: cpu, cuda, ... (default: cuda when available).
        precision: auto (bf16 LM weights; bf16 arithmetic only where the hardware has it), fp32, bf16, or int8 (int8 LM weights).
    """
    import uvicorn

    from vlmkit.serving.app import ServeSettings, create_app, load_models

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning(f"serving on {host} without --api-key; anyone who can reach it can use it")
    settings = ServeSettings(api_key=api_key, allow_remote_images=allow_remote_images or bool(allowed_media_domains),
                             allowed_media_domains=tuple(allowed_media_domains or ()), media_path=media_path,
                             max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens, max_n=max_n,
                             max_images=max_images, batching=batching,
                             max_body_bytes=int(max_body_mb * 2**20), max_image_bytes=int(max_image_mb * 2**20),
                             max_batch=max_batch, max_queue=max_queue)
    models = load_models(model, device, precision)
    log.info(f"serving {', '.join(models)} on http://{host}:{port}/ (OpenAI API under /v1)")
    uvicorn.run(create_app(models, settings), host=host, port=port, log_level="warning")


def convert(source: str, out: str, download: bool = False, quantize: Literal["int8"] | None = None) -> None:
    """Import a Hugging Face / GGUF checkpoint into vlmkit, or export a vlmkit one to Hugging Face.

    The direction follows SOURCE: a vlmkit checkpoint is exported (VLM -> LLaVA or SmolVLM,
    CLIP-shaped dual encoder -> CLIPModel, decoder -> LlamaForCausalLM); a Hugging Face
    directory (CLIP, SigLIP, BERT, Llama, Qwen2, LLaVA, SmolVLM, Idefics3) or a .gguf file (or
    `smollm2`) is imported. Unmerged LoRA adapters are merged on the way out.

    Args:
        source: a local directory or .gguf file (a Hub id only with --download).
        out: the directory to write.
        download: allow fetching SOURCE from the Hugging Face Hub when it is not a local path.
        quantize: int8 writes a vlmkit checkpoint whose language model has int8 weights (a quarter
            of the bytes; fastest decoding on CPUs); the source is any model `convert` imports.
    """
    from vlmkit.convert.auto import convert as run

    done, path = run(source, out, download, quantize)
    print(f"{done}: {path}")


def merge(source: str, out: str) -> None:
    """Fold a checkpoint's LoRA adapters into its weights (a run with instruct.merge_lora=false keeps them apart).

    Args:
        source: a checkpoint saved with unmerged adapters.
        out: the directory to write the merged checkpoint to.
    """
    from vlmkit.checkpoint import merge_checkpoint

    print(f"merged: {merge_checkpoint(source, out)}")


COMMANDS: dict[str, Callable | dict[str, Callable]] = {
    "presets": presets,
    "train": {"clip": train_clip, "vlm": train_vlm},
    "data": {"pack": data_pack},
    "eval": {"clip": evaluate, "vqa": eval_vqa, "caption": eval_caption, "pope": eval_pope,
             "grounding": eval_grounding},
    "caption": caption,
    "describe": describe,
    "ask": ask,
    "chat": chat,
    "classify": classify,
    "embed": embed,
    "search": search,
    "convert": convert,
    "merge": merge,
    "serve": serve,
    "demo": demo,
}

# ---- parser generation ------------------------------------------------------------------


def _arg_help(fn: Callable) -> dict[str, str]:
    doc, helps, in_args = inspect.getdoc(fn) or "", {}, False
    for line in doc.splitlines():
        if line.strip() == "Args:":
            in_args = True
        elif in_args and ":" in line:
            name, text = line.strip().split(":", 1)
            helps[name] = text.strip()
    return helps


def _add_command(subparsers, name: str, fn: Callable) -> None:
    doc = inspect.getdoc(fn) or ""
    parser = subparsers.add_parser(name, help=doc.splitlines()[0] if doc else None,
                                   description=doc.split("\n\nArgs:")[0])
    hints, helps = typing.get_type_hints(fn), _arg_help(fn)
    positional = True
    for pname, param in inspect.signature(fn).parameters.items():
        hint = hints.get(pname, str)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        kwargs: dict = {"help": helps.get(pname)}
        if typing.get_origin(hint) is list:
            kwargs.update(nargs="+", type=typing.get_args(hint)[0])
        elif typing.get_origin(hint) is Literal:
            kwargs.update(choices=typing.get_args(hint))
        elif hint is bool:
            kwargs.update(action=argparse.BooleanOptionalAction)
        else:
            kwargs.update(type=hint)
        if param.default is inspect.Parameter.empty:
            # The command's objects (an image, a question) read best bare; a model is --model everywhere.
            positional = positional and pname != "model"
            if positional:
                parser.add_argument(pname, metavar=pname.upper(), **kwargs)
            else:
                parser.add_argument(f"--{pname.replace('_', '-')}", dest=pname, required=True, **kwargs)
        else:
            positional = False
            parser.add_argument(f"--{pname.replace('_', '-')}", dest=pname, default=param.default, **kwargs)
    parser.set_defaults(_fn=fn)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmkit", description="Build, train, evaluate and serve vision-language models.")
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument("-q", "--quiet", dest="_verbosity", action="store_const", const=-1, default=0,
                      help="print warnings and errors only (results still go to standard output)")
    talk.add_argument("-v", "--verbose", dest="_verbosity", action="store_const", const=1,
                      help="print debug detail too")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, target in COMMANDS.items():
        if isinstance(target, dict):
            group = subparsers.add_parser(name, help=f"{name} subcommands: {', '.join(target)}")
            inner = group.add_subparsers(dest="subcommand", required=True)
            for sub, fn in target.items():
                _add_command(inner, sub, fn)
        else:
            _add_command(subparsers, name, target)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    fn = args.pop("_fn")
    args.pop("command", None)
    args.pop("subcommand", None)
    configure_logging(args.pop("_verbosity"))
    try:
        fn(**args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:  # an optional dependency: say which extra brings it
        print(f"vlmkit: error: {missing_dependency(e)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, OSError) as e:  # our errors name the problem: show them plainly
        print(f"vlmkit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
