"""Write measured figures as markdown sections: the benchmarks into docs/RESULTS.md, the
experiments into a file under the folder they are given.

Each script owns one section (between HTML comment markers) that it replaces on every run,
with the date, the commit and the command that produced it, so no number in the file is
typed by hand. A section's table holds one figure per row: the last column is the value
(one number, or one short text), the columns before it say what was measured.
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
HEADER = ("# vlmkit results\n\nEvery figure below is written by a module in `benchmarks/` "
          "(`python -m benchmarks.NAME` from the repository root); rerun it to refresh its section.\n")


def _commit() -> str:
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                      cwd=ROOT, stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--", "src", "benchmarks", "experiments"],
                                        text=True, cwd=ROOT).strip()
        return sha + ("+uncommitted" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def command() -> str:
    """The command that started this process, as run from the repository root (`python -m PACKAGE.NAME ...`)."""
    script = Path(sys.argv[0]).resolve()
    try:
        entry = "python -m " + ".".join(script.relative_to(ROOT).with_suffix("").parts)
    except ValueError:
        entry = f"python {sys.argv[0]}"
    return " ".join([entry, *sys.argv[1:]])


def write_section(name: str, title: str, rows: list[tuple[str, ...]], notes: str = "", *,
                  columns: tuple[str, ...] = ("figure", "value"), target: Path | str = RESULTS,
                  header: str | None = None) -> None:
    """Replace section `name` of `target` (docs/RESULTS.md unless given) with a table, one figure per row.

    rows: tuples as long as `columns`; the last item is the figure's value. `header` starts a
    new file (default: RESULTS.md's own header for RESULTS.md, none elsewhere).
    """
    target = Path(target)
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"row {row!r} has {len(row)} cells; the table has columns {columns}")
    stamp = (f"{datetime.date.today().isoformat()}, commit {_commit()}, torch {torch.__version__}, {machine()}; "
             f"command: `{command()}`")
    body = [f"<!-- {name}:start -->", f"## {title}", "", stamp, "",
            "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    body += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    if notes:
        body += ["", notes.strip()]
    body.append(f"<!-- {name}:end -->")
    if header is None:
        header = HEADER if target.resolve() == RESULTS else ""
    text = target.read_text() if target.exists() else header
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start in text and end in text:
        text = text[: text.index(start)] + "\n".join(body) + text[text.index(end) + len(end):]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + "\n".join(body) + "\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print("\n".join(body[1:-1]))
