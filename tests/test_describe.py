"""`vlmkit describe`: alt text for a folder, batched, resumable, corrupt files reported."""
from __future__ import annotations

import html

import pytest
from PIL import Image

import vlmkit
from vlmkit.cli import main
from vlmkit.inference.describe import describe_folder, read_records


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "photos"
    (root / "trip").mkdir(parents=True)
    colours = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (240, 240, 20), (120, 20, 160)]
    for i, colour in enumerate(colours):
        image = Image.new("RGB", (40 + 10 * i, 30), colour)
        image.save(root / ("trip" if i % 2 else ".") / f"p{i}.{'jpg' if i == 2 else 'png'}")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def assistant(tiny_vlm_dir):
    return vlmkit.load(tiny_vlm_dir, device="cpu")


def test_a_folder_is_described_once_and_a_stopped_run_continues(folder, assistant, tmp_path, monkeypatch):
    whole = describe_folder(assistant, folder, tmp_path / "whole.jsonl", batch_size=2, max_new_tokens=6,
                            progress=False)
    assert (whole.described, whole.failed, whole.skipped) == (5, 1, 0)
    records = read_records(tmp_path / "whole.jsonl")
    assert sorted(r["file"] for r in records) == ["broken.png", "p0.png", "p2.jpg", "p4.png", "trip/p1.png",
                                                 "trip/p3.png"]
    assert "broken.png" in next(r["error"] for r in records if r["file"] == "broken.png")
    assert all(r["alt"] for r in records if "alt" in r)

    # Stop after the first batch, as Ctrl-C would; then run again.
    out, calls, real = tmp_path / "alt.jsonl", [], assistant.generate_batch

    def interrupted(requests):
        calls.append(len(requests))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(requests)

    monkeypatch.setattr(assistant, "generate_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        describe_folder(assistant, folder, out, batch_size=2, max_new_tokens=6, progress=False)
    first = read_records(out)
    assert len(first) == 2
    with open(out, "a") as f:   # and a line cut off mid-write, as kill -9 would leave it
        f.write('{"file": "p2.jp')
    monkeypatch.setattr(assistant, "generate_batch", real)
    again = describe_folder(assistant, folder, out, batch_size=2, max_new_tokens=6, progress=False)
    assert again.skipped == 2 and again.described + again.failed == 4
    assert sorted(read_records(out), key=lambda r: r["file"]) == sorted(records, key=lambda r: r["file"])


def test_cli_writes_jsonl_and_a_page(folder, tiny_vlm_dir, tmp_path, capsys):
    assert main(["describe", str(folder), "--model", str(tiny_vlm_dir), "--out", str(tmp_path / "site" / "alt.html"),
                 "--format", "html", "--max-tokens", "5", "--batch-size", "3"]) == 0
    page = (tmp_path / "site" / "alt.html").read_text()
    records = read_records(tmp_path / "site" / "alt.jsonl")
    assert page.count("<img ") == 5 and "not described" in page
    assert '<img src="../photos/trip/p1.png"' in page
    assert all(html.escape(r["alt"], quote=True) in page for r in records if "alt" in r)
    assert main(["describe", str(tmp_path / "nowhere"), "--model", str(tiny_vlm_dir)]) == 2
    assert "no such folder" in capsys.readouterr().err
