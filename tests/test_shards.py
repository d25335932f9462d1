"""Webdataset shards: `vlmkit data pack`, a stream that reads each sample once per epoch over
ranks and workers, resumes at the exact sample, and counts (then refuses) damaged samples."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmkit.cli import main as cli
from vlmkit.data.images import ImageTransform
from vlmkit.data.prepared import DataError
from vlmkit.data.shards import ShardIndex, ShardStream, pack, reader_stream
from vlmkit.data.sources import build_source
from vlmkit.presets import preset
from vlmkit.training.contrastive import train_clip

SAMPLES, SHARD_SIZE = 320, 40
TRANSFORM = ImageTransform(size=48)


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "shapes"
    assert cli(["data", "pack", "shapes", str(out), "--limit", str(SAMPLES), "--shard-size", str(SHARD_SIZE),
                "--set", "image_size=48"]) == 0
    return out


def stream(root: Path, rank: int = 0, world: int = 1, workers: int = 2, batch: int = 16, **kw) -> ShardStream:
    return ShardStream(ShardIndex.load(root), TRANSFORM, batch, rank, world, workers, seed=0, buffer=30,
                       max_bad_fraction=kw.pop("max_bad_fraction", 0.01), **kw)


def read(s: ShardStream, n: int) -> list[dict]:
    return [s.next(s.batches) for _ in range(n)]


def test_pack_writes_every_pair_once_with_an_index(packed):
    index = ShardIndex.load(packed)
    assert len(index) == SAMPLES and len(index.shards) == SAMPLES // SHARD_SIZE
    source = build_source("shapes", "train", size=4, image_size=48)
    assert index.classes == source.classes and index.templates == source.templates
    captions = index.captions()
    assert len(captions) == SAMPLES and all(captions)
    with pytest.raises(FileExistsError, match="not empty"):
        pack(build_source("shapes", "train", size=4), packed, 2)


def test_each_sample_once_per_epoch_over_ranks_and_workers(packed):
    index = ShardIndex.load(packed)
    slots = 4   # 2 ranks x 2 workers
    for epochs in (1, 2):
        keys = Counter()
        orders = []
        for slot in range(slots):
            owned = sum(index.shards[i][1] for i in index.owned(slot, slots))
            it = reader_stream(index, slot, slots, seed=0, buffer=30)
            taken = [next(it)[1]["__key__"] for _ in range(owned * epochs)]
            keys.update(taken)
            orders.append(taken)
        assert len(keys) == SAMPLES and set(keys.values()) == {epochs}
    assert orders[0][:80] != orders[0][80:]   # each epoch in another order
    # Through the DataLoader workers of both ranks: one epoch is 320 / (2 x 16) = 10 batches per rank.
    seen = Counter(key for rank in (0, 1) for batch in read(stream(packed, rank, 2), 10) for key in batch["keys"])
    assert len(seen) == SAMPLES and set(seen.values()) == {1}


def test_a_stream_resumes_at_the_exact_sample(packed):
    whole = read(stream(packed), 9)
    first = stream(packed)
    read(first, 5)
    resumed = stream(packed)
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(whole[5:], read(resumed, 4)):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["images"], b["images"])
    with pytest.raises(RuntimeError, match="at batch 9"):
        resumed.next(3)


def _damage(root: Path, every: int) -> tuple[Path, set[str]]:
    """A copy of the shards whose every `every`-th image is garbage, and those samples' keys."""
    out = root.parent / f"{root.name}-damaged-{every}"
    shutil.copytree(root, out)
    n, damaged = 0, set()
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(shard, "w") as tar:
            for member, data in members:
                if member.name.endswith(".png"):
                    n += 1
                    if n % every == 0:
                        data = b"not a png"
                        damaged.add(member.name.split(".")[0])
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return out, damaged


def test_damaged_samples_are_skipped_and_counted_then_refused(packed):
    root, damaged = _damage(packed, 40)
    s = stream(root, workers=1, max_bad_fraction=0.05)
    batches = read(s, 19)   # most of the epoch: 8 of its 320 samples are damaged
    assert all(len(b["captions"]) == 16 and not damaged & set(b["keys"]) for b in batches)   # full, and clean
    assert 0 < s.bad[0] == s.consumed[0] - 19 * 16   # every sample read is in a batch or counted
    s = stream(_damage(packed, 2)[0], workers=1, max_bad_fraction=0.05)
    with pytest.raises(DataError, match=r"rank 0: \d+ of \d+ streamed samples could not be read .*first: shard-"):
        read(s, 20)


def test_a_reader_whose_shards_are_all_damaged_stops_with_an_error(packed, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(packed, broken)
    for shard in broken.glob("*.tar"):
        shard.write_bytes(b"this is no tar file" * 100)
    with pytest.raises(DataError, match="hold no readable sample"):
        next(reader_stream(ShardIndex.load(broken), 0, 1, seed=0, buffer=30, bad=[]))


def test_a_folder_that_is_not_a_pack_is_refused(tmp_path):
    with pytest.raises(DataError, match="no index.json"):
        ShardIndex.load(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "vlmkit-shards", "shards": [{"file": "x.tar",
                                                                                          "samples": 3}]}))
    with pytest.raises(DataError, match="missing, first x.tar"):
        ShardIndex.load(tmp_path)


TINY = {"train.steps": 6, "train.batch_size": 32, "train.save_every": 3, "train.log_every": 1,
        "data.eval_size": 32, "data.train_size": SAMPLES}


def test_training_from_shards_resumes_bit_for_bit(packed, tmp_path):
    cfg = preset("tiny").override({**TINY, "data.shards": str(packed)})
    whole = train_clip(cfg, tmp_path / "whole")
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    shutil.rmtree(cut / "model")
    shutil.rmtree(cut / "checkpoints" / "step-0000006")
    resumed = train_clip(cfg, cut)
    a, b = load_file(whole.model_dir / "model.safetensors"), load_file(resumed.model_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))
    losses = [json.loads(line)["loss"] for line in (cut / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert losses[-1] < losses[0]   # it learns


def test_what_shards_cannot_feed_is_refused(packed, tmp_path):
    cfg = preset("tiny").override({**TINY, "data.shards": str(packed), "train.hard_negatives": True})
    with pytest.raises(ValueError, match="train.hard_negatives needs them decoded in memory"):
        train_clip(cfg, tmp_path / "run")
