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

VERSION = "0.2.0"   # pyproject.toml reads it from here
LOGGER = "vlmkit"
# Optional dependencies by import name -> the pyproject extra that installs them.
EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve", "pycocoevalcap": "metrics", "gguf": "gguf",
          "sklearn": "data", "easy_vqa": "data", "webdataset": "data", "huggingface_hub": "hub"}


def main_process() -> bool:
    """False in every torchrun process but rank 0: only rank 0 logs and draws progress bars.

    Read from torchrun's RANK variable, so any layer can ask before (or without) the process
    group being set up.
    """
    return os.environ.get("RANK", "0") == "0"


def default_device():
    """The first CUDA device (this process's one under torchrun), else the CPU (a `torch.device`)."""
    import torch   # here, not at the top: `vlmkit --help` and config handling never need torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def cpu_flags() -> set[str]:
    """The instruction-set flags this CPU reports (Linux's /proc/cpuinfo; empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device) -> bool:
    """Whether `device` multiplies bf16 in hardware: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX. Elsewhere bf16 is emulated and slower than fp32."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device) -> str:
    """"auto" -> "bf16" where the device has native bf16, else "fp32"; other names pass through.

    The environment variable VLMKIT_PRECISION (fp32 or bf16) overrides what "auto" picks:
    the tests set it to fp32, so that exact comparisons hold on every CPU.
    """
    if precision not in ("auto", "fp32", "bf16", "int8"):
        raise ValueError(f"unknown precision {precision!r}; choose auto, fp32, bf16 or int8")
    if precision != "auto":
        return precision
    forced = os.environ.get("VLMKIT_PRECISION", "")
    if forced:
        if forced not in ("fp32", "bf16"):
            raise ValueError(f"VLMKIT_PRECISION={forced!r}: choose fp32 or bf16")
        return forced
    return "bf16" if native_bf16(device) else "fp32"


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:  # sys.stderr as it is now, not as it was when logging was configured
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never take a run down
            self.handleError(record)


def configure_logging(verbosity: int = 0) -> None:
    """-1: warnings and errors only; 0: progress messages (the default); 1: debug detail too.

    Only the `vlmkit` logger is configured, once: a program that embeds vlmkit keeps its own
    root logger (records still propagate to it), and calling this again just changes the level.
    """
    logger = logging.getLogger(LOGGER)
    if not main_process():   # under torchrun the other ranks only speak up about problems
        verbosity = -1
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
