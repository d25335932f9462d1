"""The `vlmkit` command line: subcommands generated from typed functions.

Each command is a plain function with type hints and a docstring whose "Args:" lines
become the --help text; `build_parser` turns signatures into argparse, so flags are
never copied by hand. `main(argv)` is callable from tests.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import types
import typing
from pathlib import Path
from typing import Callable, Literal

# ---- commands -------------------------------------------------------------------------


def presets() -> None:
    """List the named presets."""
    from vlmkit.presets import describe_presets

    for name, doc in describe_presets():
        print(f"{name:20s} {doc}")


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
               set: list[str] | None = None, resume: bool = True) -> None:
    """Train a CLIP-style dual encoder (Stage 1, contrastive alignment).

    Args:
        preset: a named preset (see `vlmkit presets`) to start from.
        out: the run directory (checkpoints, metrics.jsonl, model/, report).
        config: a JSON run config to use instead of the preset.
        set: overrides as dotted key=value, e.g. train.steps=500 data.source=fashion_mnist.
        resume: continue from the newest checkpoint in `out` if there is one.
    """
    from vlmkit.config import ClipRunConfig
    from vlmkit.presets import preset as get_preset
    from vlmkit.training.contrastive import train_clip as run

    cfg = ClipRunConfig.load(config) if config else get_preset(preset)
    cfg = cfg.override(_parse_overrides(set or []))
    result = run(cfg, out, resume=resume)
    print(json.dumps({"status": result.status, "model": str(result.model_dir), **result.results}, indent=2))


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

    m = load(model)
    # Twice the size, so `size` pairs with distinct captions remain for retrieval.
    source = build_source(data, split, **({"size": 2 * size} if data == "shapes" else {}))
    pairs = prepare(source, m.transform, limit=2 * size, desc="eval data")
    sets = zero_shot_sets(source, pairs, m.transform, size)
    results = evaluate_dual_encoder(m.model, m.tokenizer, pairs, sets, device=m.device, retrieval_size=size)
    if out:
        json_path, md_path = write_report(results, out, "results", f"Evaluation of {model} on {data}/{split}")
        print(f"wrote {json_path} and {md_path}")
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
    print(f"wrote {out}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items()))


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


def demo(out: str = "runs/demo", steps: int | None = None) -> None:
    """The main job: train the shapes dual encoder, evaluate it, draw it, write a report.

    Args:
        out: the run directory.
        steps: training steps (default: the `shapes` preset's).
    """
    from vlmkit.demo import run_demo

    run_demo(out, steps)


COMMANDS: dict[str, Callable | dict[str, Callable]] = {
    "presets": presets,
    "train": {"clip": train_clip},
    "eval": evaluate,
    "classify": classify,
    "embed": embed,
    "search": search,
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
    for position, (pname, param) in enumerate(inspect.signature(fn).parameters.items()):
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
            # The command's object (an image) reads best bare; a model is --model everywhere.
            if position == 0 and pname != "model":
                parser.add_argument(pname, metavar=pname.upper(), **kwargs)
            else:
                parser.add_argument(f"--{pname.replace('_', '-')}", dest=pname, required=True, **kwargs)
        else:
            parser.add_argument(f"--{pname.replace('_', '-')}", dest=pname, default=param.default, **kwargs)
    parser.set_defaults(_fn=fn)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmkit", description="Build, train, evaluate and serve vision-language models.")
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
    try:
        fn(**args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError) as e:  # our errors name the problem: show them plainly
        print(f"vlmkit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
