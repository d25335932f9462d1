"""Tests for Stage 2 data: conversations, LLaVA JSON, shapes VQA and Easy-VQA conversations."""
from __future__ import annotations

import json
import os
import random
import re
from collections import Counter

import pytest
from PIL import Image

from vlmkit.data.conversation import (IMAGE_TOKEN, Conversation, Message, load_llava_json,
                                      missing_images, to_llava_json)
from vlmkit.data.sources import shapes as sh
from vlmkit.data.sources.shapes_vqa import (CAPTION_QUESTIONS, KINDS, ORDER_QUESTION, QA, ShapesVQA, format_box,
                                            scene_questions)

U, A, S = "user", "assistant", "system"


def conv(*turns: tuple[str, str], images=()) -> Conversation:
    return Conversation([Message(r, c) for r, c in turns], list(images))


# --- Conversation.validate -------------------------------------------------------------------


def test_valid_conversations():
    conv((U, "<image>\nwhat?"), (A, "red"), images=["a.png"]).validate()
    conv((S, "be brief"), (U, "hi"), (A, "hello"), (U, "<image> and <image>"), (A, "ok"),
         images=[0, Image.new("RGB", (2, 2))]).validate()
    conv((U, "<image> what?"), images=[3]).validate(require_answer=False)  # a generation prompt
    assert conv((U, "<image><image>"), (A, "<image>")).num_placeholders() == 3


@pytest.mark.parametrize("c, match", [
    (conv(), r"^ex 7: no messages"),
    (conv((U, "q"), ("bot", "a")), r"^ex 7: message 1 has unknown role 'bot'"),
    (conv((U, "q"), (S, "s"), (A, "a")), r"message 1 is a system message; only the first"),
    (conv((S, "s")), r"no user message after the system message"),
    (conv((A, "a"), (U, "q"), (A, "a")), r"message 0 is from 'assistant' but 'user' was expected"),
    (conv((S, "s"), (A, "a")), r"message 1 is from 'assistant' but 'user' was expected"),
    (conv((U, "q"), (U, "q2"), (A, "a")), r"message 1 is from 'user' but 'assistant' was expected"),
    (conv((U, "q"), (A, "a"), (U, "q2")), r"last message is from 'user'; training needs an assistant"),
    (conv((U, "  "), (A, "a")), r"message 0 \(user\) has empty content"),
    (conv((U, "<image> q"), (A, "a")), r"1 <image> placeholder\(s\) in the messages but 0 image\(s\)"),
    (conv((U, "q"), (A, "a"), images=["x.png"]), r"0 <image> placeholder\(s\) .* but 1 image\(s\)"),
    (conv((U, "<image>"), (A, "a"), images=[1.5]), r"image 0 must be a path, a PIL image or an int"),
])
def test_validate_errors(c, match):
    with pytest.raises(ValueError, match=match):
        c.validate("ex 7")


# --- LLaVA JSON ------------------------------------------------------------------------------


RECORDS = [
    {"id": "a", "image": "img/a.png",
     "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"},
                       {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "circle"}]},
    {"id": 2, "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                {"from": "gpt", "value": "Hello"}]},
    {"id": "multi", "image": ["img/a.png", "/abs/b.png"],
     "conversations": [{"from": "human", "value": "<image> vs <image>"}, {"from": "gpt", "value": "same"}]},
]


def write(path, records, jsonl: bool) -> None:
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n\n" for r in records))  # blank lines are skipped
    else:
        path.write_text(json.dumps(records))


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_llava_load_and_round_trip(tmp_path, suffix):
    src = tmp_path / f"data{suffix}"
    write(src, RECORDS, suffix == ".jsonl")
    convs = load_llava_json(src)
    assert [len(c.messages) for c in convs] == [4, 3, 2]
    assert convs[0].messages[3] == Message(A, "circle") and convs[0].messages[0].content == "<image>\nWhat colour?"
    assert [m.role for m in convs[1].messages] == [S, U, A]
    assert convs[0].images == [str(tmp_path / "img/a.png")] and convs[1].images == []
    assert convs[2].images == [str(tmp_path / "img/a.png"), "/abs/b.png"]
    assert [c.meta["id"] for c in convs] == ["a", 2, "multi"]
    assert load_llava_json(src, image_folder="/data")[0].images == ["/data/img/a.png"]

    # Written elsewhere, then read back: same messages, images naming the same files.
    out = tmp_path / "out" / f"copy{suffix}"
    out.parent.mkdir()
    to_llava_json(convs, out)
    back = load_llava_json(out)
    assert [c.messages for c in back] == [c.messages for c in convs]
    assert [c.meta for c in back] == [c.meta for c in convs]
    norm = lambda c: [os.path.normpath(p) for p in c.images]  # noqa: E731
    assert [norm(c) for c in back] == [norm(c) for c in convs]
    if suffix == ".json":
        assert json.loads(out.read_text())[0]["image"] == str(tmp_path / "img/a.png")  # absolute kept
    else:
        assert len(out.read_text().splitlines()) == 3


def test_llava_relative_paths_are_rewritten_relative_to_the_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "data.json", RECORDS, jsonl=False)
    convs = load_llava_json("data.json")
    assert convs[0].images == ["img/a.png"]  # relative to the cwd, as `load_image` will open it
    (tmp_path / "out").mkdir()
    to_llava_json(convs, "out/copy.json")
    assert json.loads((tmp_path / "out/copy.json").read_text())[0]["image"] == "../img/a.png"
    assert [os.path.normpath(p) for p in load_llava_json("out/copy.json")[0].images] == ["img/a.png"]


def test_llava_placeholder_inserted_before_first_human_message(tmp_path):
    path = tmp_path / "d.json"
    write(path, [{"id": 1, "image": "a.png", "conversations": [
        {"from": "system", "value": "sys"}, {"from": "human", "value": "What is it?"},
        {"from": "gpt", "value": "a cat"}]},
        {"id": 2, "image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "Compare."}, {"from": "gpt", "value": "same"}]}], jsonl=False)
    a, b = load_llava_json(path)
    assert a.messages[1].content == "<image>\nWhat is it?" and a.messages[0].content == "sys"
    assert b.messages[0].content == "<image>\n<image>\nCompare." and b.num_placeholders() == 2


def test_llava_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"id": 1, "conversations": []},\n {"id": 2 "x"}]')
    with pytest.raises(ValueError, match=r"bad.json: invalid JSON at line 2, column 11"):
        load_llava_json(path)
    jl = tmp_path / "bad.jsonl"
    jl.write_text(json.dumps(RECORDS[1]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: invalid JSON at column 2"):
        load_llava_json(jl)
    path.write_text('{"id": 1}')
    with pytest.raises(ValueError, match=r"bad.json: expected a JSON list of records, got dict"):
        load_llava_json(path)

    human = {"from": "human", "value": "q"}
    gpt = {"from": "gpt", "value": "a"}
    cases = [
        ("not a record", r"record 1: expected an object with 'conversations', got str"),
        ({"id": "x"}, r"record 1 \(id='x'\): 'conversations' must be a non-empty list"),
        ({"id": "x", "conversations": [{"from": "bot", "value": "q"}]},
         r"record 1 \(id='x'\): turn 0 has unknown 'from' 'bot'"),
        ({"id": "x", "conversations": [human, {"from": "gpt", "value": 3}]},
         r"record 1 \(id='x'\): turn 1 'value' must be a string, got int"),
        ({"id": "x", "conversations": [human]}, r"record 1 \(id='x'\): last message is from 'user'"),
        ({"id": "x", "conversations": [gpt, human]}, r"record 1 \(id='x'\): message 0 is from 'assistant'"),
        ({"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "<image><image>"}, gpt]},
         r"record 1 \(id='x'\): 2 <image> placeholder\(s\) in the messages but 1 image\(s\)"),
        ({"id": "x", "image": 5, "conversations": [human, gpt]},
         r"record 1 \(id='x'\): 'image' must be a string or a list"),
    ]
    for rec, match in cases:
        write(path, [RECORDS[1], rec], jsonl=False)
        with pytest.raises(ValueError, match=r"bad.json, " + match):
            load_llava_json(path)
        write(jl, [RECORDS[1], rec], jsonl=True)
        with pytest.raises(ValueError, match=r"bad.jsonl, line 3, " + match):
            load_llava_json(jl)
    write(path, [{"id": "x", "conversations": [human]}], jsonl=False)
    assert len(load_llava_json(path, require_answer=False)) == 1
    with pytest.raises(FileNotFoundError):
        load_llava_json(tmp_path / "nope.json")


def test_to_llava_json_rejects_non_paths_and_missing_images(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    ok = conv((U, "<image>"), (A, "a"), images=[str(tmp_path / "a.png")])
    for image in (0, Image.new("RGB", (2, 2))):
        with pytest.raises(ValueError, match=r"conversation 1: image 0 is a (int|Image); LLaVA JSON can only hold"):
            to_llava_json([ok, conv((U, "<image>"), (A, "a"), images=[image])], tmp_path / "o.json")
    gone = str(tmp_path / "gone.png")
    convs = [ok, conv((U, "<image><image>"), (A, "a"), images=[gone, 3]), conv((U, "<image>"), (A, "b"), images=[gone])]
    assert missing_images(convs) == [gone]


# --- shapes VQA ------------------------------------------------------------------------------


BOX_RE = re.compile(r"\[(\d+), (\d+), (\d+), (\d+)\]")


def scenes(n: int, max_objects: int = 4, split: str = "train"):
    ds = sh.Shapes(split, size=n, max_objects=max_objects)
    return [ds.scene(i) for i in range(n)]


def by_name(scene: sh.Scene) -> dict[str, sh.Obj]:
    """Objects by "colour shape", for those the phrase names uniquely."""
    counts = Counter((o.colour, o.shape) for o in scene.objects)
    return {f"{o.colour} {o.shape}": o for o in scene.objects if counts[o.colour, o.shape] == 1}


def test_format_box():
    assert format_box((0, 0, 64, 64), 64) == "[0, 0, 100, 100]"
    assert format_box((8, 1, 33, 63), 64) == "[13, 2, 52, 98]"  # 12.5 rounds half up
    assert format_box((10, 20, 30, 40), (200, 100)) == "[5, 20, 15, 40]"
    with pytest.raises(ValueError, match="image_size must be positive"):
        format_box((0, 0, 1, 1), 0)


def test_scene_questions_deterministic_and_one_per_kind():
    for scene in scenes(50):
        a, b = scene_questions(scene, random.Random(3)), scene_questions(scene, random.Random(3))
        assert a == b and all(isinstance(q, QA) for q in a)
        kinds = [q.kind for q in a]
        assert len(set(kinds)) == len(kinds) and kinds == [k for k in KINDS if k in kinds]
        assert {"caption", "colour", "shape", "count", "exists"} <= set(kinds)
        # A kind's question does not depend on which other kinds are asked for.
        assert scene_questions(scene, random.Random(3), ["exists"]) == [q for q in a if q.kind == "exists"]
    with pytest.raises(ValueError, match=r"unknown question kind\(s\) \['size'\]"):
        scene_questions(scene, random.Random(0), ["size"])


def test_scene_answers_match_the_scene():
    answers: dict[str, list[str]] = {k: [] for k in KINDS}
    hard = 0
    for i, scene in enumerate(scenes(600)):
        objs, named = scene.objects, by_name(scene)
        at = {o.position: o for o in objs}
        for qa in scene_questions(scene, random.Random(i)):
            q, a = qa.question, qa.answer
            answers[qa.kind].append(a)
            if qa.kind == "caption":
                assert q in CAPTION_QUESTIONS and a == sh.caption(scene)
            elif qa.kind == "colour":
                m = re.fullmatch(r"What colour is the (\w+)(?: at the ([a-z ]+))?\?", q)
                shape, pos = m.groups()
                matches = [o for o in objs if o.shape == shape and (pos is None or o.position == pos)]
                assert len(matches) == 1 and matches[0].colour == a
            elif qa.kind == "shape":
                m = re.fullmatch(r"What shape is at the ([a-z ]+)\?|What is the (\w+) shape\?", q)
                if m[1]:
                    assert at[m[1]].shape == a
                else:
                    assert [o.shape for o in objs if o.colour == m[2]] == [a]
            elif qa.kind == "count":
                m = re.fullmatch(r"How many (?:(\w+) shapes|shapes|(\w+)) are there\?", q)
                colour, plural = m.groups()
                shape = next(s for s in sh.SHAPES if plural in (s + "s", s + "es")) if plural else None
                n = sum((colour is None or o.colour == colour) and (shape is None or o.shape == shape) for o in objs)
                assert a == str(n) and re.fullmatch(r"\d", a)
            elif qa.kind == "position":
                name = re.fullmatch(r"Where is the (\w+ \w+)\?", q)[1]
                assert named[name].position == a
            elif qa.kind == "relation":
                m = re.fullmatch(r"Is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)\?", q)
                (r1, c1), (r2, c2) = divmod(named[m[1]].cell, 3), divmod(named[m[3]].cell, 3)
                truth = {"left of": c1 < c2, "right of": c1 > c2, "above": r1 < r2, "below": r1 > r2}[m[2]]
                assert a == ("yes" if truth else "no") and m[1] != m[3]
            elif qa.kind == "exists":
                colour, shape = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", q).groups()
                present = any(o.colour == colour and o.shape == shape for o in objs)
                assert a == ("yes" if present else "no")
                if not present:
                    hard += any(o.colour == colour or o.shape == shape for o in objs)
            elif qa.kind == "grounding":
                o = named[re.fullmatch(r"Where is the (\w+ \w+)\? Give its box\.", q)[1]]
                assert qa.box == o.box
                pct = [int(v) for v in BOX_RE.fullmatch(a).groups()]
                assert all(abs(p - 100 * v / scene.image_size) <= 1 for p, v in zip(pct, o.box))
            elif qa.kind == "order":
                assert q == ORDER_QUESTION
                names = a.split(", ")
                assert Counter(names) == Counter(f"{o.colour} {o.shape}" for o in objs)  # each object once
                columns = [named[n].cell % 3 for n in names if n in named]
                assert columns == sorted(columns)  # left to right
    for kind in ("exists", "relation"):
        yes = answers[kind].count("yes") / len(answers[kind])
        assert 0.4 <= yes <= 0.6, (kind, yes)
    assert 0.4 <= hard / answers["exists"].count("no") <= 0.7
    zeros = answers["count"].count("0") / len(answers["count"])
    assert 0.1 <= zeros <= 0.3
    assert len(answers["relation"]) > 100 and len(answers["grounding"]) > 500


def test_order_lists_objects_by_column_then_row():
    box = (0, 0, 10, 10)
    scene = sh.Scene((sh.Obj("circle", "red", "small", 2, box), sh.Obj("square", "blue", "large", 3, box),
                      sh.Obj("triangle", "green", "small", 4, box), sh.Obj("circle", "red", "large", 7, box)))
    qa, = scene_questions(scene, random.Random(0), ["order"])
    # cells 3 (left), then 4 (center) above 7 (bottom), then 2 (top right)
    assert (qa.question, qa.answer) == (ORDER_QUESTION, "blue square, green triangle, red circle, red circle")


def test_scenes_without_unique_objects_skip_those_kinds():
    box = (0, 0, 10, 10)
    twins = sh.Scene((sh.Obj("circle", "red", "small", 0, box), sh.Obj("circle", "red", "large", 4, box)))
    kinds = {q.kind for q in scene_questions(twins, random.Random(0))}
    assert kinds == {"caption", "colour", "shape", "count", "exists", "order"}
    one = sh.Scene((sh.Obj("circle", "red", "small", 0, box),))
    assert "relation" not in {q.kind for q in scene_questions(one, random.Random(0))}


def test_shapes_vqa_conversations():
    ds = ShapesVQA(size=30, seed=1)
    assert len(ds) == 30 and ds.source.max_objects == 3
    for i in (0, 5, 29):
        convs = ds.conversations(i)
        assert convs == ShapesVQA(size=30, seed=1).conversations(i)  # a pure function of index
        assert convs == ds.conversations(i - 30)
        for c in convs:
            c.validate()
            assert c.images == [i] and c.messages[0].content.startswith(IMAGE_TOKEN + "\n")
            assert c.messages[0].content[len("<image>\n"):] == c.meta["question"]
            assert c.messages[1] == Message(A, c.meta["answer"])
            if c.meta["kind"] == "grounding":
                assert format_box(c.meta["box"], c.meta["image_size"]) == c.meta["answer"]
    assert ds[5].meta["scene"] == ds.source[5].meta["scene"]
    assert ShapesVQA(size=30, seed=2).conversations(0) != ds.conversations(0)
    with pytest.raises(IndexError):
        ds.conversations(30)

    two = ShapesVQA(size=30, seed=1, kinds=("count", "exists", "caption"), questions_per_image=2)
    for i in range(30):
        kinds = [c.meta["kind"] for c in two.conversations(i)]
        assert len(kinds) == 2 and kinds == [k for k in ("count", "exists", "caption") if k in kinds]
    assert len(ds.all_conversations()) == sum(len(ds.conversations(i)) for i in range(30))
    assert {c.images[0] for c in ds.all_conversations(limit=4)} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="unknown question kind"):
        ShapesVQA(kinds=("colour", "size"))
    with pytest.raises(ValueError, match="questions_per_image must be >= 1"):
        ShapesVQA(questions_per_image=0)


def test_shapes_vqa_heldout_exists_yes_for_heldout_pair():
    ds = ShapesVQA("heldout", size=200, kinds=("exists",))
    yes_heldout = 0
    for i in range(200):
        for c in ds.conversations(i):
            colour, shape = re.fullmatch(r"<image>\nIs there an? (\w+) (\w+) in the image\?",
                                         c.messages[0].content).groups()
            yes_heldout += c.meta["answer"] == "yes" and (colour, shape) in sh.HELDOUT_COMBOS
    assert yes_heldout > 0


# --- Easy-VQA --------------------------------------------------------------------------------


def test_easy_vqa_conversations():
    pytest.importorskip("easy_vqa")
    from vlmkit.data.sources.easy_vqa import EasyVQA

    ds = EasyVQA("test")
    convs = ds.conversations()
    assert len(convs) == len(ds.questions)
    assert set(Counter(c.meta["kind"] for c in convs)) == {"yes/no", "colour", "shape"}
    for c, (question, answer, image_id) in zip(convs, ds.questions):
        c.validate()
        assert ds.image_ids[c.images[0]] == image_id
        assert c.meta["answer"] == answer == c.messages[1].content and c.meta["question"] == question
    ex = ds[convs[0].images[0]]
    assert (convs[0].meta["question"], convs[0].meta["answer"]) in ex.meta["questions"]


# --- multi-turn training conversations ---------------------------------------------------------


def test_merge_turns_groups_questions_about_one_image():
    from vlmkit.data.vqa_sets import merge_turns, of_kinds, repeats

    vqa = ShapesVQA(split="train", size=40, image_size=48)
    single = vqa.all_conversations()
    merged = merge_turns(single, turns=3, seed=1)
    for c in merged:
        c.validate()
        assert len(c.images) == 1 and c.num_placeholders() == 1
        assert c.messages[0].content.startswith(IMAGE_TOKEN)  # the image comes first, once
        if c.meta["kind"] == "multi_turn":
            assert 2 <= len(c.meta["kinds"]) <= 3 and "caption" not in c.meta["kinds"]
        else:
            assert len(c.messages) == 2
    # Nothing lost or invented: the same (image, question, answer) triples, captions alone.
    def triples(convs):
        out = Counter()
        for c in convs:
            for q, a in zip(c.messages[0::2], c.messages[1::2]):
                out[c.images[0], q.content.replace(IMAGE_TOKEN, "").strip(), a.content] += 1
        return out

    assert triples(merged) == triples(single)
    assert sum(c.meta["kind"] == "caption" for c in merged) == sum(c.meta["kind"] == "caption" for c in single)
    assert len(merged) < len(single)
    assert merge_turns(single, turns=3, seed=1) == merged  # deterministic
    assert merge_turns(single, turns=1) is single
    # Phase task filters see every question kind inside a merged conversation.
    multi = next(c for c in merged if c.meta["kind"] == "multi_turn")
    assert of_kinds(multi, multi.meta["kinds"]) and not of_kinds(multi, multi.meta["kinds"][:1])
    # Oversampling counts a merged conversation as often as its most repeated kind.
    kind = multi.meta["kinds"][1]
    assert repeats(multi, {kind: 3}) == 3 and repeats(multi, {"caption": 3}) == 1


def test_train_turns_merges_training_conversations_only():
    from vlmkit.config import VlmDataConfig
    from vlmkit.data.images import ImageTransform
    from vlmkit.data.vqa_sets import build_set

    cfg = VlmDataConfig.from_dict({"source": "shapes", "train_turns": 4,
                                   "source_options": {"image_size": 48}}, "test")
    transform = ImageTransform(size=48)
    train = build_set(cfg, "train", 30, transform)
    test = build_set(cfg, "test", 30, transform)
    assert any(c.meta["kind"] == "multi_turn" for c in train.conversations)
    assert all(len(c.messages) == 2 for c in test.conversations)
