"""Image-caption data too big for memory: webdataset tar shards, packed once, streamed in training.

A packed folder (`vlmkit data pack SOURCE OUT --shard-size N`):

    shard-000000.tar ...   per sample KEY.png (the image, lossless), KEY.txt (its caption),
                           KEY.json ({"label": class or -1, "row": index in the source})
    captions.jsonl         every caption in pack order (a vocabulary trains without opening a tar)
    index.json             the shards and their sample counts, the source's classes and
                           prompt templates; written last, so a folder without it is unfinished

Training streams it (`data.shards=OUT`). Each process has `data.workers` readers; reader
`role` of rank `r` owns shards[r * workers + role :: world * workers] for good, and reads
them again every epoch in an order shuffled per epoch, through a shuffle buffer. So in each
epoch every sample is read once, by one reader of one rank. The stream is a pure function
of the seed, the world size and the worker count: a reader's state is one number, how many
raw samples it has taken (`consumed`), and a resumed run reads the tar bytes up to there again
(without decoding) to land on the exact next sample.

A sample that no longer decodes (a shard damaged after packing) is skipped and counted per
rank; past `data.max_bad_fraction` of the samples seen the run stops, naming the sample.
"""
from __future__ import annotations

import io
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from vlmkit.data.images import ImageDecodeError, ImageTransform, load_image
from vlmkit.data.prepared import DataError, normalise
from vlmkit.data.sources.base import Source
from vlmkit.runtime import main_process

FORMAT = "vlmkit-shards"
# Checked only once a reader has seen this many samples: one bad image among the first
# few must not stop a run whose threshold is a fraction.
MIN_SEEN_FOR_THRESHOLD = 200


@dataclass
class ShardIndex:
    root: Path
    shards: list[tuple[str, int]]      # (file name, samples)
    classes: list[str] | None
    templates: list[str]
    source: str

    @classmethod
    def load(cls, root: str | Path) -> "ShardIndex":
        root = Path(root)
        file = root / "index.json"
        if not file.is_file():
            raise DataError(f"{root} has no index.json: not a folder written by `vlmkit data pack` "
                            f"(or the pack was stopped before it finished)")
        try:
            meta = json.loads(file.read_text())
            shards = [(s["file"], int(s["samples"])) for s in meta["shards"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{file} is malformed: {e}") from e
        if meta.get("format") != FORMAT:
            raise DataError(f"{file} is not a vlmkit shard index (format {meta.get('format')!r})")
        missing = [name for name, _ in shards if not (root / name).is_file()]
        if missing:
            raise DataError(f"{root}: {len(missing)} shard files named in index.json are missing, first {missing[0]}")
        return cls(root, shards, meta.get("classes"), meta.get("templates") or [], meta.get("source", "?"))

    def __len__(self) -> int:
        return sum(n for _, n in self.shards)

    def owned(self, slot: int, slots: int) -> list[int]:
        """The shards reader `slot` of `slots` reads: each shard belongs to exactly one reader."""
        return list(range(slot, len(self.shards), slots))

    def captions(self) -> list[str]:
        """Every caption in pack order (to train a vocabulary, or number distinct captions)."""
        with open(self.root / "captions.jsonl") as f:
            return [json.loads(line) for line in f]


def pack(source: Source, out: str | Path, shard_size: int, limit: int | None = None) -> dict:
    """Write `source`'s examples (up to `limit`) as shards of `shard_size` samples.

    Images that cannot be read are skipped and counted, as `prepare` does. Returns the index.
    """
    import webdataset as wds

    out = Path(out)
    if shard_size <= 0:
        raise ValueError(f"--shard-size must be positive, got {shard_size}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; pack into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    count = len(source) if limit is None else min(limit, len(source))
    shards: list[dict] = []
    writer, skipped = None, 0
    captions = open(out / "captions.jsonl", "w")
    for row in tqdm(range(count), desc="pack", unit="img", disable=not main_process(),
                    mininterval=0.1 if sys.stderr.isatty() else 30):
        try:
            example = source[row]
        except (ImageDecodeError, FileNotFoundError):
            skipped += 1
            continue
        if writer is None or shards[-1]["samples"] == shard_size:
            if writer is not None:
                writer.close()
            shards.append({"file": f"shard-{len(shards):06d}.tar", "samples": 0})
            writer = wds.TarWriter(str(out / shards[-1]["file"]), encoder=False)
        image = io.BytesIO()
        example.image.convert("RGB").save(image, format="PNG")
        label = -1 if example.label is None else int(example.label)
        writer.write({"__key__": f"{row:09d}", "png": image.getvalue(), "txt": example.caption.encode(),
                      "json": json.dumps({"label": label, "row": row}).encode()})
        shards[-1]["samples"] += 1
        captions.write(json.dumps(example.caption) + "\n")
    captions.close()
    if writer is not None:
        writer.close()
    if not shards:
        raise DataError(f"no readable images in {source.name!r}")
    index = {"format": FORMAT, "version": 1, "source": source.name, "samples": sum(s["samples"] for s in shards),
             "skipped": skipped, "shards": shards, "classes": source.classes, "templates": source.templates}
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def _raw_samples(index: ShardIndex, shard_ids, bad: list | None = None) -> Iterator[tuple[str, dict]]:
    """(shard file, sample) for every sample of the given shards in order, undecoded. A
    damaged tar stops at the damage: what came before it is kept, and the break is counted."""
    from webdataset.tariterators import tarfile_samples

    for i in shard_ids:
        name = index.shards[i][0]

        def broken(error: Exception, name=name) -> bool:
            if bad is None:
                raise DataError(f"{index.root / name} is damaged: {error}") from error
            bad.append(f"{name}: {error}")
            return False   # stop this shard; the stream goes on with the next one

        yield from ((name, s) for s in tarfile_samples([{"url": str(index.root / name)}], handler=broken))


def reader_stream(index: ShardIndex, slot: int, slots: int, seed: int, buffer: int,
                  bad: list | None = None) -> Iterator[tuple[str, dict]]:
    """One reader's endless stream: its shards in a new order each epoch, through a shuffle buffer."""
    owned = index.owned(slot, slots)
    epoch = 0
    while True:
        rng = random.Random(f"{seed}-{slot}-{slots}-{epoch}")
        order = owned[:]
        rng.shuffle(order)
        pool: list[tuple[str, dict]] = []
        read = 0
        for item in _raw_samples(index, order, bad):
            read += 1
            if len(pool) < buffer:
                pool.append(item)
                continue
            j = rng.randrange(len(pool))
            pool[j], item = item, pool[j]
            yield item
        if not read:   # every epoch would be empty: the reader would spin for ever
            raise DataError(f"shards {', '.join(index.shards[i][0] for i in owned)} of {index.root} hold no "
                            f"readable sample{': ' + bad[-1] if bad else ''}")
        rng.shuffle(pool)   # the epoch's last samples, drained in a random order
        yield from pool
        epoch += 1


class ShardBatches(IterableDataset):
    """Local batches for one rank, from its readers; run in `workers` DataLoader processes.

    The DataLoader takes batches from its workers in turn, so local batch k comes from reader
    k % workers. A resumed stream starts at batch `start` with each reader's `consumed` count:
    physical worker w plays reader (w + start) % workers so the turn order continues.
    """

    def __init__(self, index: ShardIndex, transform: ImageTransform, batch_size: int, rank: int, world: int,
                 workers: int, seed: int, buffer: int, start: int = 0, consumed: list[int] | None = None,
                 bad: list[int] | None = None):
        self.index, self.transform, self.batch_size = index, transform, batch_size
        self.rank, self.world, self.workers, self.seed, self.buffer = rank, world, workers, seed, buffer
        self.start, self.consumed, self.bad_before = start, consumed or [0] * workers, bad or [0] * workers

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        role = ((info.id if info else 0) + self.start) % self.workers
        slot, slots = self.rank * self.workers + role, self.world * self.workers
        bad: list[str] = []
        stream = reader_stream(self.index, slot, slots, self.seed, self.buffer, bad)
        consumed = self.consumed[role]
        for _ in range(consumed):   # back to the exact sample: tar bytes only, nothing decoded
            next(stream)
        bad.clear()   # what the skipped stretch held was counted before the resume
        while True:
            pixels, captions, labels, keys = [], [], [], []
            while len(captions) < self.batch_size:
                name, sample = next(stream)
                consumed += 1
                try:
                    image = load_image(sample["png"])
                    caption = sample["txt"].decode()
                    label = int(json.loads(sample["json"])["label"])
                except (ImageDecodeError, KeyError, ValueError, UnicodeDecodeError) as e:
                    bad.append(f"{name}, sample {sample.get('__key__', '?')}: {e}")
                    continue
                views, _, _ = self.transform.views(image)
                pixels.append(torch.from_numpy(np.asarray(views[-1]).copy()).permute(2, 0, 1))
                captions.append(caption)
                labels.append(label)
                keys.append(sample["__key__"])
            yield {"images": torch.stack(pixels), "captions": captions, "labels": torch.tensor(labels),
                   "keys": keys, "role": role, "consumed": consumed, "bad": self.bad_before[role] + len(bad),
                   "first_bad": bad[0] if bad else None}


class ShardStream:
    """What a recipe's batch_fn reads: the next local batch, with the readers' positions kept
    for the checkpoint (`state_dict` / `load_state_dict`)."""

    def __init__(self, index: ShardIndex, transform: ImageTransform, batch_size: int, rank: int, world: int,
                 workers: int, seed: int, buffer: int, max_bad_fraction: float):
        self.index, self.transform, self.batch_size = index, transform, batch_size
        self.rank, self.world, self.seed, self.buffer = rank, world, seed, buffer
        self.max_bad_fraction = max_bad_fraction
        # Every reader needs a shard of its own, or its turn in the DataLoader would come up empty.
        # workers=0 reads in this process (one reader).
        self.loader_workers = min(workers, len(index.shards) // world)
        self.workers = max(1, self.loader_workers)
        if len(index.shards) < world:
            raise DataError(f"{index.root} has {len(index.shards)} shards, fewer than the {world} processes "
                            f"reading it; pack it again with a smaller --shard-size")
        self.consumed = [0] * self.workers
        self.bad = [0] * self.workers
        self.batches = 0
        self._loader: Iterator[dict] | None = None

    def state_dict(self) -> dict:
        return {"batches": self.batches, "consumed": list(self.consumed), "bad": list(self.bad),
                "world": self.world, "workers": self.workers}

    def load_state_dict(self, state: dict) -> None:
        if (state["world"], state["workers"]) != (self.world, self.workers):
            raise DataError(f"the checkpoint read the shards with {state['world']} processes x {state['workers']} "
                            f"workers, this run with {self.world} x {self.workers}; an exact resume of shard-streamed "
                            f"data needs the same")
        self.batches, self.consumed, self.bad = state["batches"], list(state["consumed"]), list(state["bad"])
        self._loader = None

    def next(self, batch: int) -> dict:
        """Local batch number `batch`: the one after the last, as the stream reads in order."""
        if batch != self.batches:
            raise RuntimeError(f"the shard stream is at batch {self.batches}; batch {batch} was asked for")
        if self._loader is None:
            dataset = ShardBatches(self.index, self.transform, self.batch_size, self.rank, self.world, self.workers,
                                   self.seed, self.buffer, self.batches, self.consumed, self.bad)
            # Batches are collated in the workers; the main process only takes them in turn.
            self._loader = iter(DataLoader(dataset, batch_size=None, num_workers=self.loader_workers))
        batch = next(self._loader)
        role = batch["role"]
        self.consumed[role] = batch["consumed"]
        self.bad[role] = batch["bad"]
        self.batches += 1
        seen, bad = sum(self.consumed), sum(self.bad)
        if bad and seen >= MIN_SEEN_FOR_THRESHOLD and bad / seen > self.max_bad_fraction:
            raise DataError(f"rank {self.rank}: {bad} of {seen} streamed samples could not be read "
                            f"({bad / seen:.1%} > data.max_bad_fraction {self.max_bad_fraction:.1%}); "
                            f"first: {batch['first_bad']}")
        return batch

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return normalise(images, self.transform.mean, self.transform.std)
