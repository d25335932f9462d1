"""The hooks that attach measurement, reports and pictures to the training recipes.

The recipes (`vlmkit.training`) sit below evaluation and never import it; the CLI, the demo,
benchmarks and tests pass these to `train_clip(..., hooks=ClipHooks())` and
`train_vlm(..., hooks=VlmHooks())`. Evaluation data is built on first use, with the
preprocessing the run settled on, and kept: use one hooks object per run.
"""
from __future__ import annotations

import json
import logging

import torch

from vlmkit.data.prepared import prepare
from vlmkit.data.sources import source_for
from vlmkit.data.vqa_sets import ConversationSet, build_set
from vlmkit.evaluation.clip_eval import evaluate_dual_encoder, zero_shot_sets
from vlmkit.evaluation.clip_pictures import draw_dual_encoder_run
from vlmkit.evaluation.report import write_report
from vlmkit.evaluation.vlm_eval import evaluate_vlm, headline
from vlmkit.training.run import RunHooks, TrainedModel

log = logging.getLogger(__name__)


class ClipHooks(RunHooks):
    """Stage 1 evaluation for `train_clip`: retrieval on held-out pairs and the zero-shot sets
    that fit the data, during training (`train.eval_every`) and at the end; then the pictures."""

    def __init__(self, pictures: bool = True):
        self.pictures = pictures
        self._data = None

    def _eval_data(self, run: TrainedModel):
        if self._data is None:
            d = run.config.data
            # Generated sources repeat captions now and then: draw extra so `eval_size` distinct ones remain.
            source = source_for(d, d.eval_split, 2 * d.eval_size)
            pairs = prepare(source, run.transform, limit=2 * d.eval_size, max_bad_fraction=d.max_bad_fraction,
                            desc="eval data")
            sets = zero_shot_sets(source, pairs, run.transform, d.eval_size, d.source_options, d.keep_classes)
            self._data = source, pairs, sets
        return self._data

    def evaluate(self, run: TrainedModel) -> dict[str, float]:
        _, pairs, sets = self._eval_data(run)
        return evaluate_dual_encoder(run.model, run.tokenizer, pairs, sets, device=run.device,
                                     retrieval_size=run.config.data.eval_size)

    def finish(self, run: TrainedModel, results: dict) -> dict:
        if self.pictures:
            source, pairs, _ = self._eval_data(run)
            with torch.no_grad():
                drawn = draw_dual_encoder_run(run.model, run.tokenizer, pairs, run.out_dir, source.classes,
                                              device=run.device)
            log.info("pictures: " + ", ".join(str(p) for p in drawn.values()))
        return results


class VlmHooks(RunHooks):
    """Stage 2 evaluation for `train_vlm`: during training, the headline figures on up to
    `probe` held-out questions; at the end, every held-out question scored by kind, written
    to eval.md/eval.json, and each answer to answers.jsonl."""

    def __init__(self, probe: int = 300):
        self.probe = probe
        self._data: ConversationSet | None = None

    def _eval_set(self, run: TrainedModel) -> ConversationSet:
        if self._data is None:
            d = run.config.data
            self._data = build_set(d, "test", d.eval_size, run.transform, source=d.eval_source)
            if self._data.dropped:
                log.warning(f"{self._data.dropped} evaluation conversations dropped: their images could not be read")
        return self._data

    def evaluate(self, run: TrainedModel) -> dict[str, float]:
        data = self._eval_set(run)
        rows = list(range(0, len(data), max(1, len(data) // self.probe)))[:self.probe]
        probe = ConversationSet(data.images, [data.conversations[i] for i in rows], data.dropped)
        results, _ = evaluate_vlm(run.model, run.tokenizer, probe, progress=False)
        return headline(results)

    def finish(self, run: TrainedModel, results: dict) -> dict:
        results, records = evaluate_vlm(run.model, run.tokenizer, self._eval_set(run), progress=run.progress)
        _, md_path = write_report(results, run.out_dir, "eval", "Stage 2 evaluation (held-out images)")
        with open(run.out_dir / "answers.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        log.info(f"evaluation: {md_path}")
        return results
