"""Deterministic synthetic VQA data for the knoblib tutorial.

Every sample is a tiny 48x48 RGB scene plus a one-word-answer question. The
four question families are designed so that the inference knobs matter
*differently* per family:

* ``color``    -- one large shape; answerable at any vision tier / depth.
* ``mark``     -- a small 6x6 white glyph; only distinguishable at higher
                  vision tiers (the glyphs collapse to the same pixels at the
                  low tier's 3x area-downsampling).
* ``binding``  -- "what color is the shape on the left ?" among three shapes in
                  three columns: bind a place to a color (the middle column is
                  blended away at the low tier).
* ``count``    -- count shapes of one color among distractors (one to three).

Which knob hurts which family most is measured, not assumed: see
``python -m knoblib knob-table`` and notebook 00.

Scenes are stored as small JSON-able dicts and rendered on demand by
:func:`render_scene`, which keeps the shipped ``data/vqa/*.jsonl.gz`` files
tiny. Only torch and the standard library are used; all randomness comes from
``random.Random(seed)`` instances so generation is reproducible.

Regenerate the shipped files with::

    python -m knoblib.data --out data/vqa --tokenizer-out data/tokenizer --overwrite

(without arguments it writes to ``runs/vqa`` and ``runs/tokenizer``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

IMAGE_SIZE = 48
IMAGE_CHANNELS = 3
# The low vision tier area-downsamples 48 -> 16, i.e. by this factor.
LOW_TIER_FACTOR = 3

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
    "purple": (160, 60, 200),
    "white": (235, 235, 235),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
# Glyphs are white, so shapes in the ``mark`` family never use white.
NON_WHITE_COLOR_NAMES: tuple[str, ...] = tuple(c for c in COLOR_NAMES if c != "white")
GLYPH_COLOR = "white"

SHAPE_TYPES: tuple[str, ...] = ("circle", "square", "triangle")

# Each glyph lights exactly 5 of the 9 pixels of a 3x3 cell and is drawn as a
# 2x2 tiling of that cell (6x6 px). Equal pixel counts per 3x3 cell mean that 3x
# area-downsampling of an aligned glyph yields the same four averaged pixels for
# every glyph: the glyph identity is invisible at the low tier.
GLYPH_PATTERNS: dict[str, tuple[str, str, str]] = {
    "plus": (".#.", "###", ".#."),
    "cross": ("#.#", ".#.", "#.#"),
    "ell": ("#..", "#..", "###"),
    "tee": ("###", ".#.", ".#."),
}
MARK_NAMES: tuple[str, ...] = tuple(GLYPH_PATTERNS)
GLYPH_CELL = 3
GLYPH_SIZE = 2 * GLYPH_CELL
# Glyph corners: multiples of 3 (the low tier's downsampling cells) that also put
# the 6x6 glyph inside one 8x8 vision patch at full resolution (9..14, 33..38).
GLYPH_POSITIONS: tuple[int, ...] = (9, 33)

COUNT_WORDS: tuple[str, ...] = ("one", "two", "three")
# The three columns of the tile grid, left to right (the ``binding`` family asks by place).
SIDES: tuple[str, ...] = ("left", "middle", "right")

FAMILIES: tuple[str, ...] = ("color", "mark", "binding", "count")

FAMILY_ANSWERS: dict[str, tuple[str, ...]] = {
    "color": COLOR_NAMES,
    "mark": MARK_NAMES,
    "binding": COLOR_NAMES,
    "count": COUNT_WORDS,
}

# Paraphrased templates per family; "{type}", "{side}" and "{color}" are
# filled in. Paraphrases make mean-pooled question embeddings vary a little
# within a family, so a router cannot key on one exact token sequence.
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": (
        "what color is the shape ?",
        "what is the color of the shape ?",
        "which color does the big shape have ?",
    ),
    "mark": (
        "which mark is in the picture ?",
        "what small mark is shown ?",
        "which tiny symbol is in the image ?",
    ),
    "binding": (
        "what color is the shape on the {side} ?",
        "what is the color of the {side} shape ?",
        "which color does the {side} shape have ?",
    ),
    "count": (
        "how many {color} shapes are there ?",
        "how many {color} shapes are in the picture ?",
        "what is the number of {color} shapes ?",
    ),
}

# Size ranges (inclusive, in pixels) of a shape's bounding-box side.
COLOR_SHAPE_SIZE = (14, 22)
MARK_SHAPE_SIZE = (12, 18)
BINDING_SHAPE_SIZE = (11, 14)
COUNT_SHAPE_SIZE = (8, 12)
# Binding and count shapes live inside the tiles of a 3x3 grid (the high tier's crops).
TILE_SIZE = IMAGE_SIZE // 3
# Placement attempts before restarting a scene from scratch.
MAX_PLACEMENT_TRIES = 200

DEFAULT_SPLITS: dict[str, tuple[int, int]] = {
    "train": (12000, 1),
    "val": (1000, 2),
    "test": (1000, 3),
}
SPLIT_SUFFIX = ".jsonl.gz"
FILE_FORMAT = "knoblib-vqa"
FILE_VERSION = 1
REGENERATE_HINT = "python -m knoblib.data --out data/vqa --tokenizer-out data/tokenizer --overwrite"

# The auxiliary captioning question of pretraining (``VQASample.description`` answers it).
DESCRIBE_QUESTION = "describe the picture ?"

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<bos>", "<eos>", "<image>")
PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN = SPECIAL_TOKENS


def data_path(*parts: str) -> Path:
    """Path inside the repo's ``data/`` folder (located relative to this package)."""
    return Path(__file__).resolve().parent.parent.joinpath("data", *parts)


# --------------------------------------------------------------------------
# Samples and rendering
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class VQASample:
    """One question about one synthetic scene.

    ``scene`` is ``{"objects": [...]}``; each object is either a shape
    ``{"kind": "shape", "type", "color", "x", "y", "size"}`` (``x``/``y`` =
    top-left corner of its ``size`` x ``size`` bounding box) or a glyph
    ``{"kind": "glyph", "mark", "color", "x", "y"}`` (a 6x6 glyph: a 3x3 cell tiled 2x2).
    """

    scene: dict
    question: str
    answer: str
    family: str
    uid: str

    def image(self) -> torch.Tensor:
        """Rendered scene: uint8 tensor of shape (3, 48, 48)."""
        return render_scene(self.scene)

    def description(self) -> str:
        """Every object as "<color> <type or mark>", in reading order (top to bottom, left to right).

        The target of the auxiliary captioning task used in pretraining (see
        ``DESCRIBE_QUESTION``): dense supervision that teaches the model to read every
        object, as LLaVA-style captioning pretraining does.
        """
        objects = sorted(self.scene["objects"], key=lambda o: (o["y"] // 16, o["x"] // 16, o["y"], o["x"]))
        return " ".join(f"{o['color']} {o['type'] if o['kind'] == 'shape' else o['mark']}" for o in objects)

    def to_json(self) -> dict:
        return {
            "uid": self.uid,
            "family": self.family,
            "question": self.question,
            "answer": self.answer,
            "scene": self.scene,
        }


def sample_image(sample: VQASample) -> torch.Tensor:
    """Rendered image of ``sample``: uint8 tensor of shape (3, 48, 48)."""
    return render_scene(sample.scene)


def shape_mask(shape_type: str, size: int) -> torch.Tensor:
    """Boolean (size, size) mask of a filled shape inside its bounding box.

    Pure integer arithmetic on pixel-center coordinates (doubled to stay
    integral), so rendering is exact and platform-independent.
    """
    coords = torch.arange(size)
    rows = coords[:, None]
    cols = coords[None, :]
    if shape_type == "square":
        return torch.ones(size, size, dtype=torch.bool)
    if shape_type == "circle":
        # Pixel center (c + 0.5, r + 0.5) within radius size/2 of the box center.
        dx = 2 * cols + 1 - size
        dy = 2 * rows + 1 - size
        return dx * dx + dy * dy <= size * size
    if shape_type == "triangle":
        # Upward isosceles: apex at top-center, base spanning the bottom row.
        # Half-width grows by 0.5 px per row, measured at each row's lower edge.
        return (2 * cols + 1 - size).abs() <= rows + 1
    raise ValueError(f"unknown shape type {shape_type!r}")


def glyph_mask(mark: str) -> torch.Tensor:
    """Boolean (6, 6) mask of a glyph: its 3x3 cell (5 lit pixels) tiled 2x2."""
    pattern = GLYPH_PATTERNS[mark]
    cell = torch.tensor([[ch == "#" for ch in row] for row in pattern], dtype=torch.bool)
    return cell.repeat(2, 2)


def render_scene(scene: dict) -> torch.Tensor:
    """Render a scene dict to a uint8 tensor of shape (3, 48, 48), black background."""
    image = torch.zeros(IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    for obj in scene["objects"]:
        if obj["kind"] == "shape":
            mask = shape_mask(obj["type"], obj["size"])
        elif obj["kind"] == "glyph":
            mask = glyph_mask(obj["mark"])
        else:
            raise ValueError(f"unknown object kind {obj['kind']!r}")
        height, width = mask.shape
        x, y = obj["x"], obj["y"]
        if x < 0 or y < 0 or x + width > IMAGE_SIZE or y + height > IMAGE_SIZE:
            raise ValueError(f"object {obj} does not fit inside the {IMAGE_SIZE}x{IMAGE_SIZE} image")
        color = torch.tensor(COLORS[obj["color"]], dtype=torch.uint8)[:, None, None]
        region = image[:, y : y + height, x : x + width]
        region[:] = torch.where(mask[None], color, region)
    return image


# --------------------------------------------------------------------------
# Scene generation
# --------------------------------------------------------------------------


def _box(obj: dict) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) exclusive bounding box of a scene object."""
    side = GLYPH_SIZE if obj["kind"] == "glyph" else obj["size"]
    return obj["x"], obj["y"], obj["x"] + side, obj["y"] + side


def _separated(a: dict, b: dict, gap: int = 1) -> bool:
    """True if the bounding boxes of ``a`` and ``b`` are at least ``gap`` px apart."""
    ax0, ay0, ax1, ay1 = _box(a)
    bx0, by0, bx1, by1 = _box(b)
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def _shape(shape_type: str, color: str, x: int, y: int, size: int) -> dict:
    return {"kind": "shape", "type": shape_type, "color": color, "x": x, "y": y, "size": size}


def _place_apart(rng: random.Random, make_object, placed: list[dict]) -> dict | None:
    """Try ``make_object(rng)`` until it keeps a 1px gap to every placed object."""
    for _ in range(MAX_PLACEMENT_TRIES):
        candidate = make_object(rng)
        if all(_separated(candidate, other) for other in placed):
            return candidate
    return None


def _random_shape(rng: random.Random, size_range: tuple[int, int], colors: tuple[str, ...]):
    """Factory drawing a random shape fully inside the image."""

    def make(rng: random.Random, color: str | None = None) -> dict:
        size = rng.randint(*size_range)
        return _shape(
            rng.choice(SHAPE_TYPES),
            color if color is not None else rng.choice(colors),
            rng.randint(0, IMAGE_SIZE - size),
            rng.randint(0, IMAGE_SIZE - size),
            size,
        )

    return make


class _Deck:
    """Draw items in shuffled rounds so every item appears equally often.

    Used for families and per-family answers: exact balance without making the
    order predictable.
    """

    def __init__(self, items: Iterable[str], rng: random.Random):
        self.items = list(items)
        self.rng = rng
        self.pending: list[str] = []

    def draw(self) -> str:
        if not self.pending:
            self.pending = list(self.items)
            self.rng.shuffle(self.pending)
        return self.pending.pop()


def _color_question(rng: random.Random, answer: str) -> tuple[dict, str]:
    make = _random_shape(rng, COLOR_SHAPE_SIZE, COLOR_NAMES)
    scene = {"objects": [make(rng, answer)]}
    return scene, rng.choice(QUESTION_TEMPLATES["color"])


def _mark_question(rng: random.Random, answer: str) -> tuple[dict, str]:
    make_shape = _random_shape(rng, MARK_SHAPE_SIZE, NON_WHITE_COLOR_NAMES)

    def make_glyph(rng: random.Random) -> dict:
        # Aligned to the 3 px grid so the glyph fills exactly 2x2 low-tier pixels
        # (every glyph then averages to the same values), and to one vision patch.
        return {
            "kind": "glyph",
            "mark": answer,
            "color": GLYPH_COLOR,
            "x": rng.choice(GLYPH_POSITIONS),
            "y": rng.choice(GLYPH_POSITIONS),
        }

    while True:
        objects: list[dict] = []
        for _ in range(rng.randint(1, 2)):
            shape = _place_apart(rng, make_shape, objects)
            if shape is None:
                break
            objects.append(shape)
        else:
            glyph = _place_apart(rng, make_glyph, objects)
            if glyph is not None:
                objects.append(glyph)
                return {"objects": objects}, rng.choice(QUESTION_TEMPLATES["mark"])


def _binding_question(rng: random.Random, answer: str) -> tuple[dict, str]:
    # Three shapes, one of each type, in the three columns of the tile grid, three
    # distinct colors: the answer binds a place ("the shape on the left") to its color.
    # Only the high tier has one crop per column; the low tier's global view blends
    # the middle column into both halves.
    types_by_band = list(SHAPE_TYPES)
    rng.shuffle(types_by_band)
    asked_band = rng.randrange(3)
    other_colors = [c for c in COLOR_NAMES if c != answer]
    rng.shuffle(other_colors)
    colors_by_band = [answer if band == asked_band else other_colors.pop() for band in range(3)]
    objects = []
    for band in range(3):
        size = rng.randint(*BINDING_SHAPE_SIZE)
        # Each shape sits centred in one 16 px tile (its band's column, a random row).
        objects.append(
            _in_tile(rng, types_by_band[band], colors_by_band[band], band, rng.randrange(3), size, centered=True)
        )
    # Store objects in a random order so list position does not leak the layout.
    rng.shuffle(objects)
    template = rng.choice(QUESTION_TEMPLATES["binding"])
    return {"objects": objects}, template.format(side=SIDES[asked_band])


def _count_question(rng: random.Random, answer: str) -> tuple[dict, str]:
    n_targets = COUNT_WORDS.index(answer) + 1
    n_distractors = rng.randint(0, len(COUNT_WORDS) - 1)
    target_color, distractor_color = rng.sample(COLOR_NAMES, 2)
    colors = [target_color] * n_targets + [distractor_color] * n_distractors
    # One shape per 16 px tile, in distinct tiles of the 3x3 grid: never touching.
    tiles = rng.sample(range(9), len(colors))
    objects = [
        _in_tile(rng, rng.choice(SHAPE_TYPES), color, tile % 3, tile // 3, rng.randint(*COUNT_SHAPE_SIZE))
        for color, tile in zip(colors, tiles)
    ]
    question = rng.choice(QUESTION_TEMPLATES["count"]).format(color=target_color)
    return {"objects": objects}, question


def _in_tile(
    rng: random.Random, shape_type: str, color: str, column: int, row: int, size: int, centered: bool = False
) -> dict:
    """A shape placed inside tile (column, row) of the 3x3 grid of 16 px tiles, 1 px margin (or centred)."""
    left, top = column * TILE_SIZE, row * TILE_SIZE
    if centered:
        offset = (TILE_SIZE - size) // 2
        return _shape(shape_type, color, left + offset, top + offset, size)
    x = rng.randint(left + 1, left + TILE_SIZE - 1 - size)
    y = rng.randint(top + 1, top + TILE_SIZE - 1 - size)
    return _shape(shape_type, color, x, y, size)


_FAMILY_GENERATORS = {
    "color": _color_question,
    "mark": _mark_question,
    "binding": _binding_question,
    "count": _count_question,
}


def generate_split(n: int, seed: int) -> list[VQASample]:
    """Generate ``n`` samples deterministically from ``seed``.

    Families are drawn uniformly (in shuffled rounds) and answers within each
    family are balanced the same way. ``uid`` is ``f"{seed}-{index}"``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    family_deck = _Deck(FAMILIES, rng)
    answer_decks = {family: _Deck(FAMILY_ANSWERS[family], rng) for family in FAMILIES}
    samples = []
    for index in range(n):
        family = family_deck.draw()
        answer = answer_decks[family].draw()
        scene, question = _FAMILY_GENERATORS[family](rng, answer)
        samples.append(VQASample(scene, question, answer, family, f"{seed}-{index}"))
    return samples


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def split_path(data_dir: str | Path, split: str) -> Path:
    """File path of ``split`` (e.g. "train") inside ``data_dir``."""
    return Path(data_dir) / f"{split}{SPLIT_SUFFIX}"


def save_split(samples: list[VQASample], path: str | Path, seed: int | None = None) -> Path:
    """Write samples as gzip JSON Lines with a header line; returns the path.

    ``seed`` is recorded in the header; if omitted it is taken from the uids
    when they all share one ``"{seed}-{index}"`` prefix.
    """
    path = Path(path)
    if seed is None:
        prefixes = {s.uid.rsplit("-", 1)[0] for s in samples}
        if len(prefixes) == 1:
            prefix = prefixes.pop()
            seed = int(prefix) if prefix.lstrip("-").isdigit() else None
    header = {"format": FILE_FORMAT, "version": FILE_VERSION, "n": len(samples), "seed": seed}
    lines = [header] + [s.to_json() for s in samples]
    payload = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0 and no embedded filename make the bytes reproducible.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(payload.encode("utf-8"))
    return path


def _parse_sample(record: object, path: Path, line_number: int) -> VQASample:
    def fail(problem: str) -> ValueError:
        return ValueError(f"corrupt VQA file {path} (line {line_number}): {problem}; regenerate with `{REGENERATE_HINT}`")

    if not isinstance(record, dict):
        raise fail("sample is not a JSON object")
    missing = {"uid", "family", "question", "answer", "scene"} - set(record)
    if missing:
        raise fail(f"missing fields {sorted(missing)}")
    family = record["family"]
    if family not in FAMILIES:
        raise fail(f"unknown family {family!r}")
    if record["answer"] not in FAMILY_ANSWERS[family]:
        raise fail(f"answer {record['answer']!r} is not valid for family {family!r}")
    scene = record["scene"]
    if not isinstance(scene, dict) or not isinstance(scene.get("objects"), list):
        raise fail("scene has no 'objects' list")
    return VQASample(scene, record["question"], record["answer"], family, record["uid"])


def load_split(path: str | Path) -> list[VQASample]:
    """Read a split written by :func:`save_split`.

    Raises FileNotFoundError if ``path`` is missing and ValueError (naming the
    path and the problem) if it is corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQA split file not found: {path}; generate it with `{REGENERATE_HINT}`")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupt VQA file {path}: cannot decompress ({exc}); regenerate with `{REGENERATE_HINT}`") from exc
    lines = text.splitlines()
    records = []
    for line_number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"corrupt VQA file {path} (line {line_number}): bad JSON ({exc})") from exc
    if not records:
        raise ValueError(f"corrupt VQA file {path}: empty file, no header")
    header = records[0]
    if (
        not isinstance(header, dict)
        or header.get("format") != FILE_FORMAT
        or header.get("version") != FILE_VERSION
        or not isinstance(header.get("n"), int)
    ):
        raise ValueError(
            f"corrupt VQA file {path}: bad header {str(header)[:200]!r}, expected "
            f'{{"format": "{FILE_FORMAT}", "version": {FILE_VERSION}, "n": ..., "seed": ...}}'
        )
    samples = [_parse_sample(record, path, i) for i, record in enumerate(records[1:], start=2)]
    if len(samples) != header["n"]:
        raise ValueError(f"corrupt VQA file {path}: header says n={header['n']} but found {len(samples)} samples")
    return samples


def load_splits(data_dir: str | Path | None = None) -> dict[str, list[VQASample]]:
    """Load train/val/test from ``data_dir`` (default: the repo's ``data/vqa``)."""
    data_dir = data_path("vqa") if data_dir is None else Path(data_dir)
    return {split: load_split(split_path(data_dir, split)) for split in DEFAULT_SPLITS}


def write_default_splits(data_dir: str | Path | None = None) -> dict[str, Path]:
    """Generate and save all DEFAULT_SPLITS into ``data_dir``; returns their paths."""
    data_dir = data_path("vqa") if data_dir is None else Path(data_dir)
    return {
        split: save_split(generate_split(n, seed), split_path(data_dir, split), seed=seed)
        for split, (n, seed) in DEFAULT_SPLITS.items()
    }


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def vocabulary_words() -> list[str]:
    """Every non-special word that can appear in a question or answer, sorted."""
    fillers = {"type": SHAPE_TYPES, "color": COLOR_NAMES, "side": SIDES}
    words: set[str] = set()
    for templates in QUESTION_TEMPLATES.values():
        for template in templates:
            for word in template.split():
                if word.startswith("{") and word.endswith("}"):
                    words.update(fillers[word[1:-1]])
                else:
                    words.add(word)
    for answers in FAMILY_ANSWERS.values():
        words.update(answers)
    words.update(DESCRIBE_QUESTION.split())
    words.update(COLOR_NAMES, SHAPE_TYPES, MARK_NAMES, COUNT_WORDS)
    return sorted(words)


def build_tokenizer():
    """Word-level ``PreTrainedTokenizerFast`` over the dataset vocabulary.

    Ids: ``<pad>``=0, ``<unk>``=1, ``<bos>``=2, ``<eos>``=3, ``<image>``=4, then
    the sorted words. Pads on the left (for batched generation). No BOS/EOS is
    added automatically; callers build prompts explicitly.

    Text is normalised (NFKC, lower case) and split at whitespace and around each
    punctuation mark, so "What color is the shape?" gives the same ids as the
    generated "what color is the shape ?". The generated questions are lower case
    with spaced punctuation already, so their ids are the same as with a plain
    whitespace split.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + vocabulary_words())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        extra_special_tokens=[IMAGE_TOKEN],
        padding_side="left",
    )


def load_tokenizer(path: str | Path | None = None):
    """Load the tokenizer saved by the CLI (default: the repo's ``data/tokenizer``)."""
    from transformers import PreTrainedTokenizerFast

    path = data_path("tokenizer") if path is None else Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer not found at {path}; generate it with `{REGENERATE_HINT}`")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    from .outputs import check_output, runs_path

    parser = argparse.ArgumentParser(description="Generate the knoblib synthetic VQA splits and tokenizer.")
    parser.add_argument("--out", default=str(runs_path("vqa")), help="directory for <split>.jsonl.gz files (default: runs/vqa)")
    parser.add_argument(
        "--tokenizer-out", default=str(runs_path("tokenizer")), help="directory for the tokenizer (default: runs/tokenizer)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing files, or write into the shipped data/ folder")
    args = parser.parse_args(argv)
    check_output(args.out, args.overwrite, "--out", kind="dir")
    check_output(args.tokenizer_out, args.overwrite, "--tokenizer-out", kind="dir")
    for split, path in write_default_splits(args.out).items():
        n, seed = DEFAULT_SPLITS[split]
        print(f"{split}: n={n} seed={seed} -> {path} ({path.stat().st_size / 1024:.1f} KiB)")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(args.tokenizer_out)
    size = sum(p.stat().st_size for p in Path(args.tokenizer_out).iterdir() if p.is_file())
    print(f"tokenizer: vocab={len(tokenizer)} -> {args.tokenizer_out} ({size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
