"""Hugging Face model directories: find, read and write them (config.json + safetensors).

Shared by every `convert/` module, so each of them only holds its own key rules (`keymap`).
Weights are read from safetensors only (single file or sharded with
`model.safetensors.index.json`); pickled `pytorch_model.bin` files are refused, since loading
one can run arbitrary code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from vlmkit.checkpoint import atomic_dir, load_model
from vlmkit.checkpoint import read_config as read_vlmkit_config

INDEX_FILE = "model.safetensors.index.json"


class ConversionError(ValueError):
    """A source checkpoint does not map onto a vlmkit module; the message names the tensor."""


def resolve_source(source: str | Path, download: bool = False) -> Path:
    """A local directory, or (only when `download` is asked for) a Hub id fetched once.

    Nothing is downloaded by default: an id that is not a local directory is an error that
    says how to opt in.
    """
    path = Path(source)
    if path.exists():
        return path
    if not download:
        raise FileNotFoundError(f"{source}: no such file or directory (to fetch a Hugging Face Hub id, "
                                "pass --download / download=True; this needs network access)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError("downloading from the Hub needs huggingface_hub: pip install huggingface_hub") from None
    return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                               "*.jinja"]))


def read_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConversionError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{file}: not valid JSON ({e})") from None


def read_json(path: str | Path, name: str) -> dict[str, Any] | None:
    """An optional side file (preprocessor_config.json, tokenizer_config.json, ...), or None."""
    file = Path(path) / name
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{file}: not valid JSON ({e})") from None


def read_image_processor(path: str | Path) -> dict[str, Any] | None:
    """Image-processor settings: preprocessor_config.json, or (transformers 5 writes them
    there) the `image_processor` entry of processor_config.json; None when neither has them."""
    found = read_json(path, "preprocessor_config.json")
    if found is None:
        found = (read_json(path, "processor_config.json") or {}).get("image_processor")
    return found


def read_vlm_tokenizer(path: str | Path):
    """A VLM directory's tokenizer, with the processor's chat template where there is one.

    A VLM's processor template (chat_template.json in older directories, chat_template.jinja
    from transformers 5, or processor_config.json) knows where images go; the tokenizer's
    own, when it has one, is the text model's and does not.
    """
    from vlmkit.data.lm_tokenizer import LMTokenizer

    path = Path(path)
    template = ((read_json(path, "chat_template.json") or {}).get("chat_template")
                or (read_json(path, "processor_config.json") or {}).get("chat_template"))
    if not template and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    tokenizer = LMTokenizer.from_pretrained(path)
    return tokenizer.with_template(template) if template else tokenizer


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's safetensors files, sharded or not."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ConversionError(f"{index}: not a safetensors index ({e})") from None
        files = [path / s for s in shards]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ConversionError(f"{index} names shards that are missing: {missing[:3]}")
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in path.glob("*.bin")]
        hint = f" (found {pickled[0]}: pickle files are not read; re-save with safe_serialization=True)" if pickled else ""
        raise ConversionError(f"{path}: no *.safetensors weights{hint}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise ConversionError(f"{file}: unreadable safetensors file ({e})") from None
    return state


def write_dir(path: str | Path, config: dict[str, Any], state: Mapping[str, torch.Tensor],
              side_files: Mapping[str, dict[str, Any] | str] | None = None) -> Path:
    """Write a Hugging Face directory atomically: config.json, model.safetensors, side files.

    A dict side file is written as JSON, a str as text (a chat template, merges, ...).
    """
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, content in (side_files or {}).items():
            text = content if isinstance(content, str) else json.dumps(content, indent=2) + "\n"
            (tmp / name).write_text(text)
    return Path(path)


def load_vlmkit(path: str | Path, kind: str) -> torch.nn.Module:
    """The model of a vlmkit checkpoint directory that must be of `kind` (for export)."""
    found = read_vlmkit_config(path)["kind"]
    if found != kind:
        raise ConversionError(f"{path}: a vlmkit {found!r} checkpoint, not a {kind}")
    return load_model(path)
