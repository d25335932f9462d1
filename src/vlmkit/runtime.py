"""What vlmkit is and where it runs: its version, the default device, and its logging.

Every layer may import this module; it imports nothing of vlmkit. Messages go through the
`vlmkit` logger (`log = logging.getLogger(__name__)` in each module), so a user controls
them in one place: the CLI's `--quiet` / `-v`, or `configure_logging` from Python.
Progress bars are tqdm's and stay; log lines are written through `tqdm.write` so they do
not tear a bar in two.
"""
from __future__ import annotations

import logging
import os
import sys

import torch
from tqdm.auto import tqdm

VERSION = "0.2.0"   # pyproject.toml reads it from here
LOGGER = "vlmkit"
# Optional dependencies by import name -> the pyproject extra that installs them.
EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "pycocoevalcap": "metrics", "gguf": "gguf",
          "sklearn": "data", "easy_vqa": "data", "huggingface_hub": "hub"}


def default_device() -> torch.device:
    """The first CUDA device (this process's one under torchrun), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:  # sys.stderr as it is now, not as it was when logging was configured
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never take a run down
            self.handleError(record)


def configure_logging(verbosity: int = 0) -> None:
    """-1: warnings and errors only; 0: progress messages (the default); 1: debug detail too.

    Only the `vlmkit` logger is configured, once: a program that embeds vlmkit keeps its own
    root logger (records still propagate to it), and calling this again just changes the level.
    """
    logger = logging.getLogger(LOGGER)
    logger.setLevel({-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG))
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("[vlmkit] %(message)s"))
        logger.addHandler(handler)


def missing_dependency(error: ModuleNotFoundError) -> str:
    """What to install for a missing module, in one line."""
    top = (error.name or "").split(".")[0]
    if top in EXTRAS:
        return f"this needs the optional package {top!r}: pip install 'vlmkit[{EXTRAS[top]}]'"
    return f"missing Python package {top!r} ({error})"
