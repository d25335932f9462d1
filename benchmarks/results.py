"""Write benchmark figures into docs/RESULTS.md.

Each benchmark owns one section (between HTML comment markers) that it replaces on every
run, with the date, the commit and the command that produced it, so no number in the
file is typed by hand.
"""
from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "RESULTS.md"
HEADER = "# vlmkit results\n\nEvery figure below is written by a script in `benchmarks/`; rerun it to refresh its section.\n"


def _commit() -> str:
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                      cwd=ROOT, stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--", "src", "benchmarks"], text=True,
                                        cwd=ROOT).strip()
        return sha + ("+uncommitted" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def write_section(name: str, title: str, rows: list[tuple[str, str]], notes: str = "") -> None:
    """Replace section `name` of RESULTS.md with a table of (figure, value) rows."""
    stamp = (f"{datetime.date.today().isoformat()}, commit {_commit()}, torch {torch.__version__}, {machine()}; "
             f"command: `python {' '.join([Path(sys.argv[0]).resolve().relative_to(ROOT).as_posix(), *sys.argv[1:]])}`")
    body = [f"<!-- {name}:start -->", f"## {title}", "", stamp, "", "| figure | value |", "|---|---|"]
    body += [f"| {k} | {v} |" for k, v in rows]
    if notes:
        body += ["", notes.strip()]
    body.append(f"<!-- {name}:end -->")
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start in text and end in text:
        text = text[: text.index(start)] + "\n".join(body) + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(body) + "\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print("\n".join(body[1:-1]))
