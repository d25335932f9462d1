"""Alt text for a folder of images: describe every image, batched, resumable, as JSONL or a page.

The JSONL file is the run's state: one line per image, `{"file": ..., "alt": ...}` or
`{"file": ..., "error": ...}` for one that could not be read, flushed to disk after each
batch. A run that stops for any reason (Ctrl-C, kill -9) is continued by running the same
command again: images already in the file are not described twice, and a line cut off
mid-write is dropped first.
"""
from __future__ import annotations

import html
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from vlmkit.data.images import ImageDecodeError, load_image
from vlmkit.inference.assistant import CAPTION_PROMPT, Request

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class DescribeSummary:
    described: int        # in this run
    failed: int           # unreadable images, in this run
    skipped: int          # already in the file from an earlier run
    out: Path


def image_files(folder: str | Path) -> list[Path]:
    """Every image file under `folder` (by suffix), in a stable order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_records(path: Path) -> list[dict]:
    """The complete lines of a describe JSONL file; a cut-off last line is removed from the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    good = data[: data.rfind(b"\n") + 1]   # everything up to the last full line
    if len(good) != len(data):
        log.warning(f"{path}: dropping an incomplete last line (the previous run stopped mid-write)")
        with open(path, "r+b") as f:
            f.truncate(len(good))
    records = []
    for n, line in enumerate(good.decode("utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not a JSON line; is this a describe output file?") from None
        if not isinstance(record, dict) or "file" not in record:
            raise ValueError(f"{path}:{n}: a describe line needs a 'file' key")
        records.append(record)
    return records


def describe_folder(assistant, folder: str | Path, out: str | Path, prompt: str = CAPTION_PROMPT,
                    batch_size: int = 8, max_new_tokens: int = 64, progress: bool = True) -> DescribeSummary:
    """Describe every image under `folder` into the JSONL file `out`, continuing an earlier run."""
    folder, out = Path(folder), Path(out)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    files = image_files(folder)
    done = {r["file"] for r in read_records(out)}
    todo = [f for f in files if f.relative_to(folder).as_posix() not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    described = failed = 0
    with open(out, "a", encoding="utf-8") as sink, tqdm(total=len(files), initial=len(files) - len(todo),
                                                         desc="describing", unit="img", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            lines, requests, names = [], [], []
            for path in todo[start:start + batch_size]:
                name = path.relative_to(folder).as_posix()
                try:
                    image = load_image(path)
                except (ImageDecodeError, OSError) as e:
                    log.warning(f"skipped {name}: {e}")
                    lines.append({"file": name, "error": str(e)})
                    failed += 1
                    continue
                requests.append(Request([{"role": "user", "content": prompt}], [image], max_new_tokens=max_new_tokens))
                names.append(name)
            texts = assistant.generate_batch(requests) if requests else []
            lines += [{"file": name, "alt": text.strip()} for name, text in zip(names, texts)]
            described += len(texts)
            sink.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
            sink.flush()
            os.fsync(sink.fileno())   # a finished batch survives a crash
            bar.update(len(lines))
    return DescribeSummary(described, failed, len(files) - len(todo), out)


def write_page(records: list[dict], folder: str | Path, page: str | Path, title: str = "Image descriptions") -> Path:
    """An HTML page showing each image with its description as alt text and caption."""
    folder, page = Path(folder).resolve(), Path(page)
    items = []
    for r in records:
        src = html.escape(Path(os.path.relpath(folder / r["file"], page.parent.resolve())).as_posix(), quote=True)
        name = html.escape(r["file"])
        if "alt" in r:
            alt = html.escape(r["alt"], quote=True)
            items.append(f'<figure><img src="{src}" alt="{alt}" loading="lazy">'
                         f"<figcaption><b>{name}</b><br>{alt}</figcaption></figure>")
        else:
            items.append(f'<figure class="error"><figcaption><b>{name}</b><br>not described: '
                         f"{html.escape(r.get('error', ''))}</figcaption></figure>")
    body = "\n".join(items)
    page.write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} figure{{display:inline-block;width:260px;margin:1em;vertical-align:top}}
img{{max-width:256px;max-height:256px}} .error{{color:#a00}}</style></head>
<body><h1>{html.escape(title)}</h1>
{body}
</body></html>
""", encoding="utf-8")
    return page
