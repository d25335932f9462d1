"""A checkpoint is a directory, written atomically.

    config.json          {"format_version", "kind", "model": {...}}
    model.safetensors    weights (never pickle)
    tokenizer.json       + tokenizer_config.json
    preprocessor.json    image size, resize mode, mean/std
    trainer_state/       optimizer, schedule, RNG, step (only for resumable checkpoints)
    run_config.json      the training run's whole config (checkpoints written by a recipe)
    metrics.jsonl        the training log up to this checkpoint

Everything is first written to a hidden sibling directory and then renamed into place,
so a run killed at any moment leaves the previous checkpoint intact and loadable.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from vlmkit.config import FORMAT_VERSION, ConfigError, DualEncoderConfig, VisionConfig, VLMConfig
from vlmkit.models.lora import describe_lora, merge_lora, restore_lora
from vlmkit.models.quant import int8_layers, quantized_layers

REQUIRED_FILES = ("config.json", "model.safetensors")
MODEL_KINDS = ("dual_encoder", "vlm", "text_encoder", "decoder")


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or does not match the model."""


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory in a hidden sibling, then swap it in for `path`.

    A crash at any moment leaves the old directory or the complete new one, never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_tree(tmp)
    if path.exists():  # replace: move the old one aside first so a crash never leaves neither
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def recover_partial_writes(root: str | Path) -> None:
    """Tidy what `atomic_dir` writes left when its process was killed (kill -9) part-way.

    A hidden `.NAME.tmp-PID` is an unfinished new version: removed. A hidden `.NAME.old-PID`
    is the previous version moved aside for a swap: put back if the kill came before the
    new one took its place, otherwise removed. Call it only where no other process writes.
    """
    root = Path(root)
    if not root.is_dir():
        return
    for old in root.rglob(".*.old-*"):
        target = old.parent / old.name[1:].rsplit(".old-", 1)[0]
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, target)
    for tmp in root.rglob(".*.tmp-*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    kind: str,
    model_config: dict[str, Any],
    tokenizer=None,
    preprocessor: dict[str, Any] | None = None,
    trainer_state: dict[str, Any] | None = None,
    extra_files: dict[str, str | Path] | None = None,
    run_config: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint directory at `path`, replacing any old one atomically.

    `run_config` (the training run's whole config) is kept as run_config.json beside the weights.
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        config = {"format_version": FORMAT_VERSION, "kind": kind, "model": model_config}
        lora = describe_lora(model)
        if lora is not None:   # unmerged adapters: `load_model` wraps the same layers again
            config["lora"] = lora
        if quantized_layers(model):   # int8 layers: `load_model` swaps the same ones in
            config["int8"] = quantized_layers(model)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        weights = {k: v.detach().contiguous().cpu() for k, v in unique_state_dict(model).items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        if preprocessor is not None:
            (tmp / "preprocessor.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
        if trainer_state is not None:
            (tmp / "trainer_state").mkdir()
            torch.save(trainer_state, tmp / "trainer_state" / "state.pt")
        if run_config is not None:
            (tmp / "run_config.json").write_text(json.dumps(run_config, indent=2) + "\n")
        for name, source in (extra_files or {}).items():
            if Path(source).exists():
                shutil.copyfile(source, tmp / name)
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: not a vlmkit checkpoint (missing {', '.join(missing)})")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format_version {version!r}, this vlmkit reads {FORMAT_VERSION}")
    for key in ("kind", "model"):
        if key not in config:
            raise CheckpointError(f"{path / 'config.json'}: missing key {key!r}")
    return config


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load model.safetensors strictly: any missing, unexpected or mis-shaped tensor is an error.

    A model built on the meta device (see `empty_model`) takes the file's tensors as they are,
    with no copy; a real one has them copied in.
    """
    assign_state(model, read_weights(path), Path(path) / "model.safetensors")


def assign_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path = "state") -> None:
    """Put `state` into `model`, strictly: every real tensor present, none unknown, shapes equal.

    Tied aliases (an lm_head sharing the embedding) are absent from checkpoints on purpose
    and stay tied. If the model was built on the meta device, its parameters become the
    given tensors (cast to the dtype the model was built with), which skips both the random
    initialisation and a copy: loading then costs what reading the file costs.
    """
    expected = unique_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(f"{source}: {key} has shape {list(tensor.shape)}, model expects {list(expected[key].shape)}")
    if not any(t.is_meta for t in expected.values()):
        model.load_state_dict(state, strict=False)
        return
    aliases = _aliases(model)
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    for alias, original in aliases:
        owner, name = _owner(model, alias)
        setattr(owner, name, model.get_parameter(original))


@contextmanager
def empty_model() -> Iterator[None]:
    """Build models inside this block on the meta device: no memory, no random initialisation.

    Only for a model whose every tensor `assign_state` / `load_weights` fills next; buffers
    derived from the config are built on the CPU by the modules themselves.
    """
    with torch.device("meta"):
        yield


def _aliases(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(alias, original) parameter names for parameters shared under two names."""
    first: dict[int, str] = {}
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out.append((name, first[id(p)]))
        else:
            first[id(p)] = name
    return out


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    module, _, attr = name.rpartition(".")
    return (model.get_submodule(module) if module else model), attr


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of `path`/model.safetensors, by name."""
    file = Path(path) / "model.safetensors"
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"{file}: unreadable weights ({e})") from None


def read_preprocessor(path: str | Path) -> dict[str, Any]:
    """The image preprocessing saved with a checkpoint ({} if it has none)."""
    file = Path(path) / "preprocessor.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def read_vision_tower(path: str | Path) -> tuple[VisionConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """The vision config, vision weights and image preprocessing of a Stage 1 or Stage 2 checkpoint."""
    config = read_config(path)
    if config["kind"] == "dual_encoder":
        vision, prefix = DualEncoderConfig.from_dict(config["model"], f"{path}/config.json model").vision, "vision."
    elif config["kind"] == "vlm":
        vision, prefix = VLMConfig.from_dict(config["model"], f"{path}/config.json model").vision, "vision_tower."
    else:
        raise CheckpointError(f"{path}: a vision tower comes from a dual_encoder or vlm checkpoint, "
                              f"got kind {config['kind']!r}")
    state = {k[len(prefix):]: v for k, v in read_weights(path).items() if k.startswith(prefix)}
    return vision, state, read_preprocessor(path)


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without aliases: a tied tensor (an LM head sharing the embedding) once."""
    seen: set[tuple[int, int]] = set()
    unique = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        # Meta tensors (a model not loaded yet) have no storage: the same object is the alias.
        ident = id(tensor) if tensor.is_meta else (tensor.data_ptr(), tensor.numel())
        if tensor.numel() and ident in seen:
            continue
        seen.add(ident)
        unique[key] = tensor.detach()
    return unique


def load_trainer_state(path: str | Path) -> dict[str, Any] | None:
    file = Path(path) / "trainer_state" / "state.pt"
    return torch.load(file, map_location="cpu", weights_only=True) if file.exists() else None


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete `step-N` checkpoint under `directory` (temporary ones are hidden)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    steps = []
    for child in directory.glob("step-*"):
        try:
            if all((child / name).is_file() for name in REQUIRED_FILES):
                steps.append((int(child.name.split("-")[1]), child))
        except ValueError:
            continue
    return max(steps)[1] if steps else None


def build_model(kind: str, model_config: dict[str, Any]) -> torch.nn.Module:
    """Rebuild a model of a known kind from its config dict."""
    if kind == "dual_encoder":
        from vlmkit.config import DualEncoderConfig
        from vlmkit.models.dual_encoder import DualEncoder

        return DualEncoder(DualEncoderConfig.from_dict(model_config, "config.json model"))
    if kind == "vlm":
        from vlmkit.config import VLMConfig
        from vlmkit.models.vlm import VisionLanguageModel

        return VisionLanguageModel(VLMConfig.from_dict(model_config, "config.json model"))
    if kind == "text_encoder":
        from vlmkit.config import TextConfig
        from vlmkit.models.text_encoder import TextEncoder

        return TextEncoder(TextConfig.from_dict(model_config, "config.json model"))
    if kind == "decoder":
        from vlmkit.config import DecoderConfig
        from vlmkit.models.decoder import DecoderLM

        return DecoderLM(DecoderConfig.from_dict(model_config, "config.json model"))
    raise ConfigError(f"unknown model kind {kind!r}; known kinds: {', '.join(MODEL_KINDS)}")


def load_model(path: str | Path, merge: bool = True) -> torch.nn.Module:
    """The model of a checkpoint, in eval mode; adapters saved unmerged are merged unless `merge` is False."""
    config = read_config(path)
    with empty_model():
        model = build_model(config["kind"], config["model"])
        if config.get("lora"):
            restore_lora(model, config["lora"])
        if config.get("int8"):
            int8_layers(model, config["int8"])
    load_weights(model, path)
    if merge:
        merge_lora(model)
    return model.eval()


def merge_checkpoint(source: str | Path, out: str | Path) -> Path:
    """A checkpoint with unmerged LoRA adapters -> the same model with them folded into its weights."""
    config = read_config(source)
    if not config.get("lora"):
        raise CheckpointError(f"{source}: no unmerged LoRA adapters to merge")
    model = load_model(source)
    tokenizer = None
    if (Path(source) / "tokenizer.json").is_file():
        from vlmkit.data.lm_tokenizer import LMTokenizer

        tokenizer = LMTokenizer.from_pretrained(source)
    return save_checkpoint(out, model, config["kind"], config["model"], tokenizer, read_preprocessor(source) or None)
