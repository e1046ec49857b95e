"""Tests for knoblib.data: synthetic VQA generation, files, and tokenizer."""

import gzip
import itertools
import json
from collections import Counter

import pytest
import torch

from knoblib import data
from knoblib.data import (
    COLOR_NAMES,
    COLORS,
    COUNT_WORDS,
    DEFAULT_SPLITS,
    FAMILIES,
    FAMILY_ANSWERS,
    GLYPH_POSITIONS,
    GLYPH_SIZE,
    IMAGE_TOKEN,
    MARK_NAMES,
    SHAPE_TYPES,
    VQASample,
    build_tokenizer,
    data_path,
    generate_split,
    glyph_mask,
    load_split,
    load_splits,
    load_tokenizer,
    render_scene,
    sample_image,
    save_split,
    shape_mask,
    split_path,
)
from knoblib.vlm import CROP_SIZE, VLMConfig, make_crops


@pytest.fixture(scope="module")
def samples():
    return generate_split(400, seed=123)


@pytest.fixture(scope="module")
def shipped():
    return load_splits()


def _shapes(sample):
    return [o for o in sample.scene["objects"] if o["kind"] == "shape"]


def _box(obj):
    side = GLYPH_SIZE if obj["kind"] == "glyph" else obj["size"]
    return obj["x"], obj["y"], obj["x"] + side, obj["y"] + side


def _apart(a, b):
    ax0, ay0, ax1, ay1 = _box(a)
    bx0, by0, bx1, by1 = _box(b)
    return ax1 + 1 <= bx0 or bx1 + 1 <= ax0 or ay1 + 1 <= by0 or by1 + 1 <= ay0


def _color_mask(img, color):
    """(48, 48) bool mask of the pixels of one palette color."""
    return (img == torch.tensor(COLORS[color], dtype=torch.uint8)[:, None, None]).all(0)


def _components(mask):
    """Number of 4-connected components of a 2-D bool mask."""
    seen = torch.zeros_like(mask)
    height, width = mask.shape
    count = 0
    for r0, c0 in mask.nonzero().tolist():
        if seen[r0, c0]:
            continue
        count += 1
        stack = [(r0, c0)]
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < height and 0 <= cc < width and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
    return count


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
    palette = {(0, 0, 0)} | set(COLORS.values())
    for sample in samples[:80]:
        img = sample.image()
        assert img.dtype == torch.uint8 and img.shape == (3, 48, 48)
        assert torch.equal(img, sample_image(sample))
        pixels = {tuple(p) for p in img.reshape(3, -1).T.tolist()}
        assert pixels <= palette
        assert len(pixels) >= 2  # something was drawn


def test_families_uniform_and_answers_valid(samples):
    assert FAMILIES == ("color", "mark", "binding", "count")
    assert COUNT_WORDS == ("one", "two", "three")
    assert FAMILY_ANSWERS["binding"] == COLOR_NAMES and FAMILY_ANSWERS["count"] == COUNT_WORDS
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
            " ".join(w for w in s.question.split() if w not in COLOR_NAMES + SHAPE_TYPES)
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
        # No object paints over another: every shape keeps all its pixels.
        img = s.image()
        for obj in objects:
            mask = glyph_mask(obj["mark"]) if obj["kind"] == "glyph" else shape_mask(obj["type"], obj["size"])
            x0, y0, x1, y1 = _box(obj)
            assert bool(_color_mask(img, obj["color"])[y0:y1, x0:x1][mask].all()), (s.uid, obj)


def test_color_family(samples):
    color = [s for s in samples if s.family == "color"]
    assert color
    for s in color:
        (shape,) = s.scene["objects"]
        assert 14 <= shape["size"] <= 22
        assert shape["color"] == s.answer
        img = s.image()
        lit = (img > 0).any(0)
        assert bool((lit == _color_mask(img, s.answer)).all())


# --- mark: 6x6 glyphs, invisible at the low tier ---------------------------------------
def test_glyph_masks():
    masks = {mark: glyph_mask(mark) for mark in MARK_NAMES}
    assert GLYPH_SIZE == 6
    for mark, mask in masks.items():
        assert mask.shape == (6, 6) and mask.dtype == torch.bool
        assert int(mask.sum()) == 20, mark
        # A 2x2 tiling of one 3x3 cell with 5 lit pixels.
        cell = mask[:3, :3]
        assert int(cell.sum()) == 5, mark
        for r, c in itertools.product((0, 3), repeat=2):
            assert torch.equal(mask[r : r + 3, c : c + 3], cell), mark
    for a, b in itertools.combinations(MARK_NAMES, 2):
        assert not torch.equal(masks[a], masks[b]), (a, b)


def test_glyph_positions_are_aligned():
    factor = 48 // CROP_SIZE
    assert factor == data.LOW_TIER_FACTOR == 3
    patch = VLMConfig().patch_size
    assert patch == 8
    for pos in GLYPH_POSITIONS:
        assert pos % factor == 0  # whole low-tier pixels
        assert 0 <= pos and pos + GLYPH_SIZE <= 48
        # Inside one 16-px high-tier tile and one patch of it.
        assert pos // CROP_SIZE == (pos + GLYPH_SIZE - 1) // CROP_SIZE
        assert pos // patch == (pos + GLYPH_SIZE - 1) // patch


def _render_glyph(mark, x, y):
    return render_scene({"objects": [{"kind": "glyph", "mark": mark, "color": "white", "x": x, "y": y}]})


GLYPH_XY = list(itertools.product(GLYPH_POSITIONS, repeat=2))


@pytest.mark.parametrize("x,y", GLYPH_XY)
def test_glyphs_identical_at_low_tier_distinct_at_medium_and_high(x, y):
    images = {mark: _render_glyph(mark, x, y) for mark in MARK_NAMES}
    for mark, img in images.items():
        lit = (img > 0).any(0)
        assert int(lit.sum()) == 20
        assert bool(lit[y : y + 6, x : x + 6].eq(glyph_mask(mark)).all())
        assert bool(_color_mask(img, "white")[lit].all())
    crops = {tier: {m: make_crops(img, tier) for m, img in images.items()} for tier in ("low", "medium", "high")}
    reference = crops["low"][MARK_NAMES[0]]
    assert reference.shape == (1, 3, 16, 16)
    assert bool((reference > -1).any())  # the glyph is not simply lost
    for mark in MARK_NAMES:
        assert torch.equal(crops["low"][mark], reference), mark
    for tier in ("medium", "high"):
        for a, b in itertools.combinations(MARK_NAMES, 2):
            assert not torch.equal(crops[tier][a], crops[tier][b]), (tier, a, b)
            # ...and not merely in the global view, which is the low tier's crop.
            assert not torch.equal(crops[tier][a][1:], crops[tier][b][1:]), (tier, a, b)


@pytest.mark.parametrize("x,y", GLYPH_XY)
def test_glyph_fills_one_patch_at_high_tier(x, y):
    patch = VLMConfig().patch_size
    for mark in MARK_NAMES:
        tiles = make_crops(_render_glyph(mark, x, y), "high")[1:]  # the 3x3 full-resolution tiles
        # (tiles, 3, 16, 16) -> (tiles, 3, 2, 2, 8, 8): which patches see anything?
        patches = tiles.unfold(2, patch, patch).unfold(3, patch, patch)
        touched = (patches > -1).flatten(start_dim=4).any(-1).any(1)
        assert int(touched.sum()) == 1, (mark, x, y)


def test_unaligned_glyphs_would_be_visible_at_low_tier():
    """The alignment is what hides the glyph: off the 3-px grid the marks differ at low."""
    crops = [make_crops(_render_glyph(mark, 8, 8), "low") for mark in MARK_NAMES]
    assert any(not torch.equal(crops[0], other) for other in crops[1:])


def test_mark_family(samples):
    mark = [s for s in samples if s.family == "mark"]
    assert mark
    positions = set()
    for s in mark:
        glyphs = [o for o in s.scene["objects"] if o["kind"] == "glyph"]
        shapes = _shapes(s)
        assert len(glyphs) == 1 and 1 <= len(shapes) <= 2
        glyph = glyphs[0]
        assert glyph["mark"] == s.answer and glyph["color"] == "white"
        assert glyph["x"] in GLYPH_POSITIONS and glyph["y"] in GLYPH_POSITIONS
        positions.add((glyph["x"], glyph["y"]))
        assert all(o["color"] != "white" for o in shapes)
        assert all(12 <= o["size"] <= 18 for o in shapes)
        # The only white pixels are the glyph's 20.
        img = s.image()
        white = _color_mask(img, "white")
        assert int(white.sum()) == 20
        assert torch.equal(white[glyph["y"] : glyph["y"] + 6, glyph["x"] : glyph["x"] + 6], glyph_mask(s.answer))
    assert positions == set(GLYPH_XY)


def test_mark_scenes_identical_at_low_tier(samples):
    # Swapping the glyph in a real scene must not change the low-tier crop, but must
    # change the medium and high ones.
    mark = [s for s in samples if s.family == "mark"]
    for s in mark:
        crops = {tier: [] for tier in ("low", "medium", "high")}
        for m in MARK_NAMES:
            objects = [dict(o, mark=m) if o["kind"] == "glyph" else o for o in s.scene["objects"]]
            img = render_scene({"objects": objects})
            for tier in crops:
                crops[tier].append(make_crops(img, tier))
        assert all(torch.equal(crops["low"][0], other) for other in crops["low"][1:]), s.uid
        for tier in ("medium", "high"):
            for a, b in itertools.combinations(crops[tier], 2):
                assert not torch.equal(a, b), (s.uid, tier)


# --- binding ---------------------------------------------------------------------------
def test_binding_answers_by_construction(samples):
    binding = [s for s in samples if s.family == "binding"]
    assert binding
    band = data.TILE_SIZE
    asked_bands = Counter()
    for s in binding:
        shapes = _shapes(s)
        assert len(shapes) == len(s.scene["objects"]) == 3
        assert sorted(o["type"] for o in shapes) == sorted(SHAPE_TYPES)
        assert len({o["color"] for o in shapes}) == 3
        lo, hi = data.BINDING_SHAPE_SIZE
        assert all(lo <= o["size"] <= hi for o in shapes)
        # Centred in its tile: one fixed place per tile.
        assert all((o["x"] % band, o["y"] % band) == ((band - o["size"]) // 2,) * 2 for o in shapes), s.uid
        ordered = sorted(shapes, key=lambda o: o["x"])
        # One shape per vertical band, strictly inside it (1 px margin).
        for b, o in enumerate(ordered):
            assert b * band + 1 <= o["x"] and o["x"] + o["size"] <= (b + 1) * band - 1, (s.uid, o)
            # ... and inside one tile row too, so the high tier sees it whole in one crop.
            row = o["y"] // band
            assert row * band + 1 <= o["y"] and o["y"] + o["size"] <= (row + 1) * band - 1, (s.uid, o)
        words = s.question.split()
        asked = [w for w in words if w in data.SIDES]
        assert len(asked) == 1 and not any(w in COLOR_NAMES or w in SHAPE_TYPES for w in words), s.question
        target = ordered[data.SIDES.index(asked[0])]
        assert target["color"] == s.answer
        asked_bands[ordered.index(target)] += 1
        # From the pixels: each band holds exactly its shape's color, the answer's in the asked band.
        img = s.image()
        for b, o in enumerate(ordered):
            cols = img[:, :, b * band : (b + 1) * band]
            colors = {tuple(p) for p in cols.reshape(3, -1).T.tolist()} - {(0, 0, 0)}
            assert colors == {COLORS[o["color"]]}, (s.uid, b)
        assert int(_color_mask(img, s.answer).sum()) == int(shape_mask(target["type"], target["size"]).sum())
    # The asked shape is not always in the same band.
    assert set(asked_bands) == {0, 1, 2}


# --- count -----------------------------------------------------------------------------
def test_count_answers_match_scene(samples):
    count = [s for s in samples if s.family == "count"]
    assert count
    totals = Counter()
    for s in count:
        shapes = _shapes(s)
        assert len(shapes) == len(s.scene["objects"])
        assert 1 <= len(shapes) <= 5
        assert all(8 <= o["size"] <= 12 for o in shapes)
        # One shape per tile of the 3x3 grid, strictly inside it.
        tiles = [(o["x"] // data.TILE_SIZE, o["y"] // data.TILE_SIZE) for o in shapes]
        assert len(set(tiles)) == len(tiles), s.uid
        for o, (col, row) in zip(shapes, tiles):
            assert o["x"] + o["size"] <= (col + 1) * data.TILE_SIZE - 1 and o["y"] + o["size"] <= (row + 1) * data.TILE_SIZE - 1
        assert len({o["color"] for o in shapes}) <= 2
        colors = [w for w in s.question.split() if w in COLOR_NAMES]
        assert len(colors) == 1, s.question
        n_target = sum(o["color"] == colors[0] for o in shapes)
        assert 1 <= n_target <= 3
        assert COUNT_WORDS[n_target - 1] == s.answer
        # From the pixels: the target color forms exactly that many separate blobs.
        assert _components(_color_mask(s.image(), colors[0])) == n_target, s.uid
        totals[len(shapes) - n_target] += 1
    # Distractors appear in some scenes and not in others.
    assert totals[0] > 0 and sum(v for k, v in totals.items() if k > 0) > 0


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
    # The prompt layout of knoblib.vlm: question first, then the image tokens.
    text = f"what color is the triangle ? {IMAGE_TOKEN} {IMAGE_TOKEN}"
    for cls in (PreTrainedTokenizerFast, AutoTokenizer):
        loaded = cls.from_pretrained(str(tmp_path))
        assert len(loaded) == len(tok)
        assert loaded.get_vocab() == tok.get_vocab()
        assert loaded.convert_tokens_to_ids(IMAGE_TOKEN) == 4
        assert loaded.padding_side == "left"
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert tok.unk_token_id not in loaded(text)["input_ids"]
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
    for split, (n, seed) in DEFAULT_SPLITS.items():
        assert shipped[split] == generate_split(n, seed), split
        assert shipped[split][0].uid == f"{seed}-0"
    families = {s.family for split in shipped.values() for s in split}
    assert families == set(FAMILIES)  # no stale family (e.g. the old "relation")


def test_shipped_files_equal_regeneration(tmp_path):
    """The shipped files are exactly what `python -m knoblib.data` writes today."""
    data.main(["--out", str(tmp_path / "vqa"), "--tokenizer-out", str(tmp_path / "tokenizer")])
    for split, (_, seed) in DEFAULT_SPLITS.items():
        shipped_file = split_path(data_path("vqa"), split)
        fresh_file = split_path(tmp_path / "vqa", split)
        # Compare the decompressed payload: gzip bytes could differ across zlib builds.
        with gzip.open(shipped_file, "rb") as a, gzip.open(fresh_file, "rb") as b:
            assert a.read() == b.read(), f"{shipped_file} is stale: regenerate with `{data.REGENERATE_HINT}`"
        with gzip.open(shipped_file, "rt") as f:
            assert json.loads(f.readline())["seed"] == seed
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shipped_json = json.loads(data_path("tokenizer", name).read_text())
        fresh_json = json.loads((tmp_path / "tokenizer" / name).read_text())
        assert shipped_json == fresh_json, name
