"""Write evaluation results twice: as JSON for machines and as a Markdown table for people.

The JSON keeps everything (nested dicts, confusion matrices...). The Markdown table lists
only scalars, flattening nested dicts to dotted keys ("per_class_accuracy.cat") and leaving
out lists, which do not fit a metric | value row.
"""
from __future__ import annotations

import json
import math
from numbers import Number
from pathlib import Path
from typing import Any, Iterator


def write_report(results: dict, out_dir: str | Path, name: str, title: str) -> tuple[Path, Path]:
    """Write `<out_dir>/<name>.json` and `<out_dir>/<name>.md`; return both paths."""
    if not isinstance(results, dict):
        raise ValueError(f"results must be a dict, got {type(results).__name__}")
    if not name or Path(name).name != name:
        raise ValueError(f"name must be a plain file stem, got {name!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"

    json_path.write_text(json.dumps(results, indent=2, default=_to_jsonable) + "\n", encoding="utf-8")
    lines = [f"# {title}", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {_escape(key)} | {_escape(_format(value))} |" for key, value in _flatten(results)]
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return json_path, md_path


def _flatten(d: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in d.items():
        full = f"{prefix}{key}"
        value = _to_jsonable(value) if hasattr(value, "tolist") else value  # tensors, numpy scalars
        if isinstance(value, dict):
            yield from _flatten(value, f"{full}.")
        elif value is None or isinstance(value, (str, Number)):
            yield full, value
        # lists (and anything else) stay out of the table; they are in the JSON


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    # Four decimals keep recall/accuracy differences visible without noise.
    return f"{float(value):.4f}"


def _escape(text: str) -> str:
    # A bare "|" would split the Markdown cell.
    return str(text).replace("|", "\\|").replace("\n", " ")


def _to_jsonable(value: Any) -> Any:
    """json.dumps fallback: tensors and numpy values via .tolist(), paths as strings."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
