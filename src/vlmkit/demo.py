"""`vlmkit demo`: the whole Stage 1 story on the built-in shapes world, in minutes on a CPU.

Train the `shapes` dual encoder, evaluate retrieval and compositional zero-shot
classification, draw what it learned, and write a short Markdown report.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from vlmkit.data.prepared import prepare
from vlmkit.data.sources import build_source
from vlmkit.evaluation.clip_eval import encode_images, encode_texts
from vlmkit.evaluation.report import write_report
from vlmkit.inference.api import load
from vlmkit.presets import preset
from vlmkit.training.contrastive import train_clip
from vlmkit.viz.plots import plot_curves, plot_embedding_map, plot_similarity_matrix


def draw_run(model_dir: Path, out: Path, records: list[dict], n_matrix: int = 8, n_map: int = 300) -> dict[str, Path]:
    """The pictures of a shapes run: similarity matrix, embedding map, loss curve."""
    m = load(model_dir)
    test = build_source("shapes", "test", size=n_map)
    data = prepare(test, m.transform, desc="pictures")
    image = encode_images(m.model, data, device=m.device)
    text = encode_texts(m.model, m.tokenizer, data.captions, device=m.device)
    first_colour = [test[i].meta["scene"]["objects"][0]["colour"] for i in range(len(data))]
    paths = {
        "similarity": plot_similarity_matrix(image[:n_matrix] @ text[:n_matrix].T, out / "similarity.png",
                                             images=[test[i].image for i in range(n_matrix)],
                                             captions=data.captions[:n_matrix],
                                             title="cosine similarity, held-out images x captions"),
        "embedding_map": plot_embedding_map(image, text, out / "embedding_map.png", image_labels=first_colour,
                                            text_labels=first_colour,
                                            title="PCA of image (dots) and caption (crosses) embeddings"),
        "loss_curve": plot_curves(records, out / "loss_curve.png", keys=("loss",)),
    }
    return paths


def run_demo(out: str | Path = "runs/demo", steps: int | None = None) -> Path:
    out = Path(out)
    cfg = preset("shapes")
    if steps:
        cfg = cfg.override({"train.steps": steps})
    started = time.perf_counter()
    run = train_clip(cfg, out)
    if run.status != "done":
        print(f"training was interrupted; run `vlmkit demo --out {out}` again to resume")
        return out
    minutes = (time.perf_counter() - started) / 60
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    pictures = draw_run(run.model_dir, out, records)

    m = load(run.model_dir)
    held = build_source("shapes", "heldout", size=5)
    examples = []
    for i in range(len(held)):
        ex = held[i]
        path = out / f"heldout_{i}.png"
        ex.image.save(path)
        best = m.classify(path, held.classes, held.templates)[0]
        examples.append((path.name, held.classes[ex.label], best[0], best[1]))

    results = {**run.results, "train_minutes": minutes, "steps": cfg.train.steps}
    _, md = write_report(results, out, "results", "vlmkit demo: shapes dual encoder")
    lines = [
        "# vlmkit demo: a CLIP-style dual encoder on the shapes world",
        "",
        f"Trained {cfg.train.steps} steps in {minutes:.1f} min. Model: `{run.model_dir}`.",
        "",
        "| figure | value |",
        "|---|---|",
        *[f"| {k} | {v:.3f} |" for k, v in run.results.items()],
        "",
        "Zero-shot on colour-shape pairs never seen in training:",
        "",
        "| image | truth | predicted | p |",
        "|---|---|---|---|",
        *[f"| ![]({name}) | {truth} | {pred} | {p:.2f} |" for name, truth, pred, p in examples],
        "",
        *[f"![{name}]({path.name})" for name, path in pictures.items()],
        "",
    ]
    report = out / "REPORT.md"
    report.write_text("\n".join(lines))
    print("\n".join(lines[:7 + len(run.results)]))
    print(f"\nreport:   {report}\npictures: " + ", ".join(str(p) for p in pictures.values()) + f"\nmetrics:  {md}")
    return out
