"""Tests for knoblib.data: synthetic VQA generation, files, and tokenizer."""

import gzip
import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from knoblib import data
from knoblib.data import (
    COLOR_NAMES,
    COUNT_WORDS,
    DEFAULT_SPLITS,
    FAMILIES,
    FAMILY_ANSWERS,
    IMAGE_TOKEN,
    MARK_NAMES,
    SHAPE_TYPES,
    VQASample,
    build_tokenizer,
    data_path,
    generate_split,
    load_split,
    load_splits,
    load_tokenizer,
    render_scene,
    sample_image,
    save_split,
    split_path,
)


@pytest.fixture(scope="module")
def samples():
    return generate_split(400, seed=123)


@pytest.fixture(scope="module")
def shipped():
    return load_splits()


def _shapes(sample):
    return [o for o in sample.scene["objects"] if o["kind"] == "shape"]


def _box(obj):
    side = 3 if obj["kind"] == "glyph" else obj["size"]
    return obj["x"], obj["y"], obj["x"] + side, obj["y"] + side


def _apart(a, b):
    ax0, ay0, ax1, ay1 = _box(a)
    bx0, by0, bx1, by1 = _box(b)
    return ax1 + 1 <= bx0 or bx1 + 1 <= ax0 or ay1 + 1 <= by0 or by1 + 1 <= ay0


def test_determinism_and_seed_dependence():
    a = generate_split(60, seed=7)
    b = generate_split(60, seed=7)
    c = generate_split(60, seed=8)
    assert a == b
    for x, y in zip(a, b):
        assert torch.equal(x.image(), y.image())
    assert [s.scene for s in a] != [s.scene for s in c]
    assert a[5].uid == "7-5"
    # Generation must not touch or depend on global RNG state.
    import random

    random.seed(0)
    d = generate_split(10, seed=7)
    assert d == a[:10]


def test_image_dtype_shape_and_colors(samples):
    palette = {(0, 0, 0)} | set(data.COLORS.values())
    for sample in samples[:80]:
        img = sample.image()
        assert img.dtype == torch.uint8 and img.shape == (3, 48, 48)
        assert torch.equal(img, sample_image(sample))
        pixels = {tuple(p) for p in img.reshape(3, -1).T.tolist()}
        assert pixels <= palette
        assert len(pixels) >= 2  # something was drawn


def test_families_uniform_and_answers_valid(samples):
    counts = Counter(s.family for s in samples)
    assert set(counts) == set(FAMILIES)
    for family in FAMILIES:
        assert abs(counts[family] - len(samples) / 4) <= 0.1 * len(samples)
    for s in samples:
        assert s.answer in FAMILY_ANSWERS[s.family]
        assert s.question.endswith(" ?")
        assert s.question == s.question.lower()
        assert "  " not in s.question
    for family in FAMILIES:
        answers = Counter(s.answer for s in samples if s.family == family)
        assert set(answers) == set(FAMILY_ANSWERS[family])
        assert max(answers.values()) - min(answers.values()) <= 2


def test_question_paraphrases(samples):
    for family in FAMILIES:
        templates = {
            " ".join(w for w in s.question.split() if w not in COLOR_NAMES + SHAPE_TYPES + ("left", "right"))
            for s in samples
            if s.family == family
        }
        assert len(templates) >= 2, family


def test_objects_inside_and_separated(samples):
    for s in samples:
        objects = s.scene["objects"]
        for obj in objects:
            x0, y0, x1, y1 = _box(obj)
            assert 0 <= x0 and 0 <= y0 and x1 <= 48 and y1 <= 48
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                assert _apart(a, b), s


def test_color_family(samples):
    for s in (s for s in samples if s.family == "color"):
        (shape,) = s.scene["objects"]
        assert 14 <= shape["size"] <= 22
        assert shape["color"] == s.answer


def test_mark_family(samples):
    for s in (s for s in samples if s.family == "mark"):
        glyphs = [o for o in s.scene["objects"] if o["kind"] == "glyph"]
        shapes = _shapes(s)
        assert len(glyphs) == 1 and 1 <= len(shapes) <= 2
        glyph = glyphs[0]
        assert glyph["mark"] == s.answer and glyph["color"] == "white"
        assert glyph["x"] % 3 == 0 and glyph["y"] % 3 == 0
        assert all(o["color"] != "white" for o in shapes)


def _render_glyph(mark, x, y):
    return render_scene({"objects": [{"kind": "glyph", "mark": mark, "color": "white", "x": x, "y": y}]})


@pytest.mark.parametrize("x,y", [(0, 0), (21, 12), (45, 45)])
def test_glyphs_identical_at_low_tier_distinct_at_full(x, y):
    images = {mark: _render_glyph(mark, x, y) for mark in MARK_NAMES}
    for img in images.values():
        assert int((img[0] > 0).sum()) == 5
    low = {m: F.interpolate(img.float()[None], size=(16, 16), mode="area") for m, img in images.items()}
    reference = low[MARK_NAMES[0]]
    for mark in MARK_NAMES:
        assert torch.equal(low[mark], reference), mark
    for i, a in enumerate(MARK_NAMES):
        for b in MARK_NAMES[i + 1 :]:
            assert not torch.equal(images[a], images[b]), (a, b)


def test_mark_scenes_identical_at_low_tier(samples):
    # Swapping the glyph in a real scene must not change the low-tier image.
    s = next(s for s in samples if s.family == "mark")
    lows = []
    for mark in MARK_NAMES:
        objects = [dict(o, mark=mark) if o["kind"] == "glyph" else o for o in s.scene["objects"]]
        img = render_scene({"objects": objects})
        lows.append(F.interpolate(img.float()[None], size=(16, 16), mode="area"))
    assert all(torch.equal(lows[0], other) for other in lows[1:])


def test_relation_answers_by_construction(samples):
    relation = [s for s in samples if s.family == "relation"]
    assert relation
    for s in relation:
        shapes = _shapes(s)
        assert sorted(o["type"] for o in shapes) == sorted(SHAPE_TYPES)
        assert len({o["color"] for o in shapes}) == 3
        assert all(10 <= o["size"] <= 14 for o in shapes)
        ordered = sorted(shapes, key=lambda o: o["x"])
        # Distinct, non-overlapping column bands.
        assert [o["x"] // 16 for o in ordered] == [0, 1, 2]
        assert all(o["x"] + o["size"] <= 16 * (o["x"] // 16 + 1) for o in ordered)
        words = s.question.split()
        side = "left" if "left" in words else "right"
        reference_type = words[words.index("the", words.index(side)) + 1]
        position = [o["type"] for o in ordered].index(reference_type)
        neighbour = position - 1 if side == "left" else position + 1
        assert 0 <= neighbour < 3
        assert ordered[neighbour]["color"] == s.answer


def test_count_answers_match_scene(samples):
    count = [s for s in samples if s.family == "count"]
    assert count
    for s in count:
        shapes = _shapes(s)
        assert 1 <= len(shapes) <= 4
        assert all(6 <= o["size"] <= 9 for o in shapes)
        assert len({o["color"] for o in shapes}) <= 2
        color = next(w for w in s.question.split() if w in COLOR_NAMES)
        n_target = sum(o["color"] == color for o in shapes)
        assert COUNT_WORDS[n_target - 1] == s.answer


def test_save_load_round_trip(tmp_path, samples):
    path = tmp_path / "split.jsonl.gz"
    save_split(samples, path)
    loaded = load_split(path)
    assert loaded == samples
    assert all(isinstance(s, VQASample) for s in loaded)
    with gzip.open(path, "rt") as f:
        header = json.loads(f.readline())
    assert header == {"format": "knoblib-vqa", "version": 1, "n": len(samples), "seed": 123}
    # Byte-reproducible files (no gzip timestamp).
    other = tmp_path / "again.jsonl.gz"
    save_split(samples, other)
    assert path.read_bytes() == other.read_bytes()


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl.gz"
    with pytest.raises(FileNotFoundError, match="nope.jsonl.gz") as info:
        load_split(path)
    assert "python -m knoblib.data" in str(info.value)
    with pytest.raises(FileNotFoundError, match="knoblib.data"):
        load_splits(tmp_path)
    with pytest.raises(FileNotFoundError, match="tok_missing"):
        load_tokenizer(tmp_path / "tok_missing")


def _write_gz(path, lines):
    with gzip.open(path, "wt") as f:
        f.write("".join(lines))


@pytest.mark.parametrize(
    "kind,problem",
    [
        ("garbage", "decompress"),
        ("truncated", "decompress"),
        ("bad_json", "bad JSON"),
        ("bad_header", "header"),
        ("unknown_family", "unknown family"),
        ("count_mismatch", "n=3"),
    ],
)
def test_corrupt_files(tmp_path, samples, kind, problem):
    path = tmp_path / f"{kind}.jsonl.gz"
    good_header = json.dumps({"format": "knoblib-vqa", "version": 1, "n": 2, "seed": 0}) + "\n"
    rows = [json.dumps(s.to_json()) + "\n" for s in samples[:2]]
    if kind == "garbage":
        path.write_bytes(b"this is not gzip at all \x00\x01\x02")
    elif kind == "truncated":
        save_split(samples, path)
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "bad_json":
        _write_gz(path, [good_header, "{not json\n"])
    elif kind == "bad_header":
        _write_gz(path, [json.dumps({"format": "something-else", "version": 1, "n": 2}) + "\n"] + rows)
    elif kind == "unknown_family":
        record = dict(samples[0].to_json(), family="weather")
        _write_gz(path, [good_header, json.dumps(record) + "\n", rows[1]])
    elif kind == "count_mismatch":
        _write_gz(path, [good_header.replace('"n": 2', '"n": 3')] + rows)
    with pytest.raises(ValueError, match=problem) as info:
        load_split(path)
    assert str(path) in str(info.value)


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = build_tokenizer()
    assert tok.convert_tokens_to_ids(["<pad>", "<unk>", "<bos>", "<eos>", IMAGE_TOKEN]) == [0, 1, 2, 3, 4]
    assert tok.pad_token_id == 0 and tok.padding_side == "left"
    tok.save_pretrained(tmp_path)
    text = f"{IMAGE_TOKEN} what color is the shape left of the circle ?"
    for cls in (PreTrainedTokenizerFast, AutoTokenizer):
        loaded = cls.from_pretrained(str(tmp_path))
        assert len(loaded) == len(tok)
        assert loaded.get_vocab() == tok.get_vocab()
        assert loaded.convert_tokens_to_ids(IMAGE_TOKEN) == 4
        assert loaded.padding_side == "left"
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    batch = tok(["red", "what color ?"], padding=True)
    assert batch["input_ids"][0][:2] == [0, 0]  # left padding
    assert tok("zebra")["input_ids"] == [tok.unk_token_id]


def test_shipped_tokenizer_matches_build():
    shipped_tok = load_tokenizer()
    assert shipped_tok.get_vocab() == build_tokenizer().get_vocab()
    assert shipped_tok.convert_tokens_to_ids(IMAGE_TOKEN) == 4


def test_shipped_words_have_no_unk(shipped):
    vocab = build_tokenizer().get_vocab()
    words = {w for split in shipped.values() for s in split for w in (s.question + " " + s.answer).split()}
    assert words <= set(vocab), words - set(vocab)
    for word in COLOR_NAMES + SHAPE_TYPES + MARK_NAMES + COUNT_WORDS:
        assert word in vocab


def test_shipped_splits_match_generator(shipped):
    assert {k: len(v) for k, v in shipped.items()} == {k: n for k, (n, _) in DEFAULT_SPLITS.items()}
    assert split_path(data_path("vqa"), "val").is_file()
    for split in ("val", "test"):
        n, seed = DEFAULT_SPLITS[split]
        assert shipped[split] == generate_split(n, seed), split
    assert shipped["train"][0].uid == f"{DEFAULT_SPLITS['train'][1]}-0"
