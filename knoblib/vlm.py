"""The MoE vision-language model and the executor that applies the four knobs for real.

``KnobVLM`` wraps a transformers ``LlavaForConditionalGeneration`` (CLIP vision tower,
OLMoE text backbone) and runs it with a manual block loop so that every knob changes
the work done, in prefill and in every cached decode step:

* ``tier`` sets the number of image crops (Molmo-style: a global view plus a grid of
  tiles), so it changes both the vision tower's batch and the LLM sequence length;
* ``top_k`` is written to the routers of blocks ``>= insertion_position``
  (``layer.mlp.gate.top_k`` is read at call time); rows of one batch with different
  top-k share a top-k_max routing whose weights past each row's k are zeroed;
* ``num_active_blocks`` skips the least important blocks ``>= insertion_position``
  (block 0 never); rows that skip a block other rows run keep their residual stream;
* ``insertion_position`` p is where Mode A pauses: a *probe* token carrying the budget
  is appended after the last prompt token, its hidden state after block p-1 is the
  latency token, and the forward continues from the same hidden states and KV cache.
  The probe is last and attention is causal, so no other position sees it; it is
  removed from the cache before decoding, so answers do not change.

Two entry points answer, sharing one prefill (``_prompt``: embed, optional probe,
positions; then the block loop over a KV cache) and one greedy decode loop:

* :meth:`KnobVLM.answer_with_knobs`: every knob known before the model runs (serving,
  Mode B, the naive Mode A's second forward);
* :meth:`KnobVLM.answer_resumable`: Mode A in one forward, Stage 1 known, Stage 2 chosen
  by a ``decide`` callback at each row's pause.

``generate`` calls one or the other, by its arguments; ``partial_forward`` is the naive
Mode A's extra forward to p, and ``generate_skipping`` (analysis only) skips any blocks.

The loop reproduces ``LlavaForConditionalGeneration.generate`` (greedy) exactly at the
full configuration; ``tests/test_vlm.py`` checks this and each knob against
transformers models built to match.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import (
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    OlmoeConfig,
    PreTrainedTokenizerBase,
)
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask

from .data import IMAGE_SIZE, LOW_TIER_FACTOR
from .knobs import TIERS, KnobConfig, KnobSpace

KNOBLIB_CONFIG_NAME = "knoblib_vlm.json"
# The side of one crop: the low tier's global view is the image area-downsampled by this factor.
CROP_SIZE = IMAGE_SIZE // LOW_TIER_FACTOR
# Tiles per side of the grid added to the global crop; Molmo's crop count, scaled down.
TIER_GRID = {"low": 0, "medium": 2, "high": 3}


@dataclass
class VLMConfig:
    """Sizes of the tiny MoE VLM trained on this CPU.

    Attributes:
        hidden_size: text model width (d).
        num_layers: transformer blocks (L).
        num_heads: attention heads per block.
        num_experts: experts per MoE block.
        default_top_k: experts per token the model is trained with (k0).
        expert_intermediate_size: hidden width of one expert.
        vision_hidden_size / vision_layers / vision_heads / vision_intermediate_size: the CLIP tower.
        patch_size: CLIP patch side in pixels; a 16-px crop gives (16 / patch_size)^2 tokens
            (4 at the default 8: 4 / 20 / 40 vision tokens for the low / medium / high tier).
        experts_implementation: transformers' MoE kernel choice. ``eager`` loops over the
            experts that some token was routed to, so at batch 1 a smaller top-k runs fewer
            expert calls; ``grouped_mm`` (transformers' default) calls every expert and
            only shrinks their inputs, which on a CPU makes top-k nearly free.
    """

    hidden_size: int = 128
    num_layers: int = 8
    num_heads: int = 4
    num_experts: int = 8
    default_top_k: int = 4
    expert_intermediate_size: int = 128
    vision_hidden_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate_size: int = 128
    patch_size: int = 8
    experts_implementation: str = "eager"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_experts", "default_top_k", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: must be a positive integer")
        if self.default_top_k > self.num_experts:
            raise ValueError(
                f"default_top_k={self.default_top_k} is invalid: at most num_experts={self.num_experts}"
            )
        if CROP_SIZE % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} is invalid: must divide the crop size {CROP_SIZE}")

    def to_llava_config(self, tokenizer: PreTrainedTokenizerBase) -> LlavaConfig:
        """A transformers ``LlavaConfig`` for these sizes and this tokenizer's vocabulary."""
        vision = CLIPVisionConfig(
            hidden_size=self.vision_hidden_size,
            intermediate_size=self.vision_intermediate_size,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads,
            image_size=CROP_SIZE,
            patch_size=self.patch_size,
            projection_dim=self.vision_hidden_size,
        )
        text = OlmoeConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=self.expert_intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            num_experts=self.num_experts,
            num_experts_per_tok=self.default_top_k,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
            router_aux_loss_coef=0.01,
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            # The last CLIP layer (not the default -2): a 2-layer tower has no spare layer.
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            image_seq_length=(CROP_SIZE // self.patch_size) ** 2,
        )
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id
        return config


def tier_num_crops(tier: str) -> int:
    """Crops the vision tower processes for ``tier``: one global view plus a grid of tiles."""
    if tier not in TIER_GRID:
        raise ValueError(f"tier={tier!r} is invalid: allowed {list(TIERS)}")
    return 1 + TIER_GRID[tier] ** 2


def make_crops(image: torch.Tensor, tier: str) -> torch.Tensor:
    """Cut one image into the crops of a tier, normalised for CLIP.

    Args:
        image: uint8 tensor (3, 48, 48).
        tier: ``low`` (global view only), ``medium`` (+ 2x2 tiles of the image at 32 px)
            or ``high`` (+ 3x3 tiles at full resolution).

    Returns:
        float tensor (num_crops, 3, 16, 16) in [-1, 1].
    """
    check_image(image)
    grid = TIER_GRID.get(tier)
    if grid is None:
        raise ValueError(f"tier={tier!r} is invalid: allowed {list(TIERS)}")
    pixels = image.float().div(255.0).unsqueeze(0)
    # Area averaging is what a real image processor's downscale does: details smaller
    # than the new pixel blend into their neighbours.
    crops = [F.interpolate(pixels, size=(CROP_SIZE, CROP_SIZE), mode="area")]
    if grid:
        side = grid * CROP_SIZE
        view = pixels if side == IMAGE_SIZE else F.interpolate(pixels, size=(side, side), mode="area")
        tiles = view.unfold(2, CROP_SIZE, CROP_SIZE).unfold(3, CROP_SIZE, CROP_SIZE)  # (1,3,g,g,16,16)
        crops.append(tiles.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, CROP_SIZE, CROP_SIZE))
    return (torch.cat(crops) - 0.5) / 0.5


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape in a ``.safetensors`` file; ``ValueError`` naming it if truncated or corrupt.

    Reads the header only (``safetensors.safe_open`` checks it covers the whole file, so
    a truncated download or a partial write is caught here, not deep inside a loader).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path} is truncated or corrupt (not a complete safetensors file): {err}") from err


def _check_questions(questions, name: str = "questions") -> None:
    """A batch of questions is a list (or tuple) of strings: a lone ``str`` would become one question per character."""
    if isinstance(questions, str):
        raise TypeError(
            f"{name} must be a list of question strings, got a single str {questions[:40]!r}: wrap it as [question]"
        )


def _check_images(images) -> None:
    """A batch of images is a sequence of (3, 48, 48) tensors (or one (B, 3, 48, 48) tensor), never one image."""
    if isinstance(images, torch.Tensor) and images.dim() != 4:
        raise TypeError(
            f"images must be a list of (3, {IMAGE_SIZE}, {IMAGE_SIZE}) uint8 tensors or one (B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) "
            f"tensor, got a tensor of shape {tuple(images.shape)}: wrap a single image as [image]"
        )


def _check_token_counts(max_new_tokens, min_new_tokens) -> None:
    """Both token counts are ints: ``max_new_tokens >= 1``, ``min_new_tokens >= 0``."""
    for name, value, low in (("max_new_tokens", max_new_tokens, 1), ("min_new_tokens", min_new_tokens, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} is invalid: must be an int >= {low}")


def as_row_knobs(knobs, batch: int) -> list[KnobConfig]:
    """One ``KnobConfig`` per row from ``knobs``: a ``KnobConfig`` (every row) or a list/tuple of them (one per row)."""
    if isinstance(knobs, KnobConfig):
        return [knobs] * batch
    if not isinstance(knobs, (list, tuple)) or not all(isinstance(k, KnobConfig) for k in knobs):
        got = type(knobs).__name__
        if isinstance(knobs, (list, tuple)):
            got = f"a {got} holding {sorted({type(k).__name__ for k in knobs if not isinstance(k, KnobConfig)})}"
        raise TypeError(f"knobs must be a KnobConfig or a list of KnobConfig (one per row), got {got}")
    if len(knobs) != batch:
        raise ValueError(f"got {len(knobs)} knob configurations for a batch of {batch}")
    return list(knobs)


def check_image(image: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``image`` is a uint8 tensor of shape (3, 48, 48)."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if tuple(image.shape) != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"image has shape {tuple(image.shape)}: expected (3, {IMAGE_SIZE}, {IMAGE_SIZE}) uint8 RGB")
    if image.dtype != torch.uint8:
        raise ValueError(f"image has dtype {image.dtype}: expected torch.uint8 (0..255 RGB)")


@dataclass
class RowPlan:
    """What each row of a batch executes.

    Attributes:
        tiers: one tier per row.
        insertion_positions: (B,) long, p per row.
        top_k: (B,) long, experts per token for blocks >= p (the default until a
            resumable row's Stage 2 decides).
        run_block: (B, L) bool, whether row b runs block l.
    """

    tiers: list[str]
    insertion_positions: torch.Tensor
    top_k: torch.Tensor
    run_block: torch.Tensor

    def knobs(self) -> list[KnobConfig]:
        """The configuration each row runs: (tier, p, top_k, number of blocks it runs)."""
        rows = zip(self.tiers, self.insertion_positions.tolist(), self.top_k.tolist(), self.run_block.sum(1).tolist())
        return [KnobConfig(t, p, k, n) for t, p, k, n in rows]


@dataclass
class _HostPlan:
    """A ``RowPlan`` copied to Python lists for the block loop (see ``forward_blocks``)."""

    run_block: list[list[bool]]
    top_k: list[int]
    p: list[int]
    decided: list[bool]

    @classmethod
    def of(cls, plan: RowPlan, decided: torch.Tensor) -> "_HostPlan":
        return cls(plan.run_block.tolist(), plan.top_k.tolist(), plan.insertion_positions.tolist(), decided.tolist())


@dataclass
class _Prompt:
    """A batch embedded for the block loop (``KnobVLM._prompt``).

    Attributes:
        embeds: (B, T, d) token embeddings with the image features in place, the probe last if any.
        attention_mask: (B, T) 1 on tokens, 0 on the left padding.
        position_ids: (B, T) each row's own positions (0 on padding).
        probe_index: the probe's position (T - 1), or None without a probe.
        inputs: ``build_inputs``' dict (its ``attention_mask`` covers the prompt alone).
    """

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    probe_index: int | None
    inputs: dict


@dataclass
class GenerationOutput:
    """What ``KnobVLM``'s answering methods return.

    Attributes:
        answers: decoded answer per row (special tokens removed).
        sequences: (B, T_new) generated token ids (pad after eos).
        knobs: the configuration each row ran with.
        latency_tokens: (B, d) probe hidden states after block p-1, or None.
        num_prompt_tokens: (B,) prompt length per row (image + text tokens, no padding).
    """

    answers: list[str]
    sequences: torch.Tensor
    knobs: list[KnobConfig]
    latency_tokens: torch.Tensor | None = None
    num_prompt_tokens: torch.Tensor | None = None


Stage2Decider = Callable[[torch.Tensor, torch.Tensor], tuple[Sequence[int], Sequence[int]]]
"""Called at a pause: (latency_tokens (n, d), row indices (n,)) -> (top_k per row, num_active_blocks per row)."""


class KnobVLM(torch.nn.Module):
    """A ``LlavaForConditionalGeneration`` with an executor for the four knobs.

    Attributes:
        model: the transformers model (save / load as usual).
        tokenizer: the word-level tokenizer (``<image>`` marks where image features go).
        knob_space: the valid configurations for this model.
        block_importance: accuracy drop per block when it alone is removed (higher =
            more important); decides which blocks ``num_active_blocks`` drops.
    """

    def __init__(
        self,
        model: LlavaForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        vlm_config: VLMConfig | None = None,
        block_importance: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        text = model.config.text_config
        self.vlm_config = vlm_config or VLMConfig(
            hidden_size=text.hidden_size,
            num_layers=text.num_hidden_layers,
            num_heads=text.num_attention_heads,
            num_experts=text.num_experts,
            default_top_k=text.num_experts_per_tok,
            expert_intermediate_size=text.intermediate_size,
        )
        self.knob_space = KnobSpace.for_model(text.num_hidden_layers, text.num_experts_per_tok)
        model.set_experts_implementation(self.vlm_config.experts_implementation)
        self.block_importance: list[float] | None = None
        if block_importance is not None:
            self.set_block_importance(block_importance)
        self.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        self.tokens_per_crop = model.config.image_seq_length
        # Per-token top-k for mixed batches, set around each block call (see _route_mask_hook).
        # The hook is attached only for that call: a module with hooks takes torch's slow
        # call path, which at batch 1 is measurable on every block.
        self._token_top_k: torch.Tensor | None = None

    # --- construction, saving, loading --------------------------------------------
    @classmethod
    def from_config(cls, vlm_config: VLMConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> "KnobVLM":
        """A randomly initialised model (seeded) of the given sizes."""
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(vlm_config.to_llava_config(tokenizer))
        return cls(model.eval(), tokenizer, vlm_config)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the transformers model (safetensors), the tokenizer and the knob metadata."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # Weights are stored in float16 (half the size of the shipped checkpoint) and
        # loaded back as float32 by ``from_pretrained``; the rounding is far below what
        # changes an answer (tests/test_vlm.py round-trips generate).
        import copy

        copy.deepcopy(self.model).to(torch.float16).save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        meta = {"vlm_config": asdict(self.vlm_config), "block_importance": self.block_importance}
        tmp = path / (KNOBLIB_CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(path / KNOBLIB_CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "KnobVLM":
        """Load what ``save_pretrained`` wrote; raise a clear error for a missing or partial folder."""
        from transformers import AutoTokenizer

        path = Path(path)
        meta_file = path / KNOBLIB_CONFIG_NAME
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"no KnobVLM at {path}: {KNOBLIB_CONFIG_NAME} is missing "
                "(train one with `python -m knoblib pretrain` or use data/model)"
            )
        try:
            meta = json.loads(meta_file.read_text())
            vlm_config = VLMConfig(**meta["vlm_config"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{meta_file} is corrupt: {err}") from err
        # Named here: transformers would report a missing tokenizer.json as a missing
        # sentencepiece / tiktoken install, and a truncated weights file without its path.
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"KnobVLM at {path} is incomplete: {path / name} is missing")
        safetensors_shapes(path / "model.safetensors")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
        if model.config.text_config.vocab_size != len(tokenizer):
            raise ValueError(
                f"checkpoint at {path} does not match its tokenizer: vocab_size="
                f"{model.config.text_config.vocab_size} but the tokenizer has {len(tokenizer)} tokens"
            )
        return cls(model.eval(), tokenizer, vlm_config, meta.get("block_importance"))

    def unknown_words(self, question: str) -> list[str]:
        """The words of ``question`` the tokenizer maps to ``<unk>``, as written (in order, repeats kept).

        The vocabulary is the data set's ~50 words; a question with unknown words still
        gets an answer, so callers (a serving API) can pass these on as a warning.
        """
        if not isinstance(question, str):
            raise TypeError(f"question must be a str, got {type(question).__name__}")
        encoding = self.tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
        unk = self.tokenizer.unk_token_id
        return [question[a:b] for i, (a, b) in zip(encoding["input_ids"], encoding["offset_mapping"]) if i == unk]

    @property
    def max_positions(self) -> int:
        """The most positions (image + text tokens, decoded tokens included) the language model takes."""
        return self.model.config.text_config.max_position_embeddings

    def set_block_importance(self, importance: Sequence[float]) -> None:
        importance = [float(x) for x in importance]
        if len(importance) != self.num_layers:
            raise ValueError(
                f"block_importance has {len(importance)} entries: expected one per block ({self.num_layers})"
            )
        if any(math.isnan(x) for x in importance):
            raise ValueError("block_importance contains NaN")
        self.block_importance = importance

    # --- the pieces ---------------------------------------------------------------
    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.model.model.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def default_top_k(self) -> int:
        return self.model.config.text_config.num_experts_per_tok

    @property
    def input_embeddings(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def dropped_blocks(self, insertion_position: int, num_active_blocks: int) -> list[int]:
        """Blocks skipped for (p, n): the ``L - n`` least important blocks ``>= max(p, 1)``.

        Without a computed ranking, later blocks count as less important (a common
        finding for LayerDrop-style skipping; the shipped model has a measured ranking).
        """
        num_drop = self.num_layers - num_active_blocks
        if num_drop <= 0:
            return []
        candidates = list(range(max(insertion_position, 1), self.num_layers))
        if num_drop > len(candidates):
            raise ValueError(
                f"num_active_blocks={num_active_blocks} is invalid for insertion_position="
                f"{insertion_position}: only {len(candidates)} blocks may be dropped"
            )
        importance = self.block_importance or [float(self.num_layers - i) for i in range(self.num_layers)]
        order = sorted(candidates, key=lambda b: (importance[b], -b))
        return sorted(order[:num_drop])

    def run_mask(self, insertion_position: int, num_active_blocks: int) -> torch.Tensor:
        """(L,) bool: which blocks run for (p, n)."""
        mask = torch.ones(self.num_layers, dtype=torch.bool, device=self.device)
        mask[self.dropped_blocks(insertion_position, num_active_blocks)] = False
        return mask

    def build_inputs(
        self,
        images: Sequence[torch.Tensor],
        questions: Sequence[str],
        tiers: Sequence[str],
        answers: Sequence[str] | None = None,
        *,
        reserved_positions: int = 0,
    ) -> dict:
        """Tokenise prompts (``<bos> <image>*n question``) and cut crops, left-padded.

        Returns a dict with ``input_ids`` (B, T), ``attention_mask`` (B, T),
        ``pixel_values`` (sum of crops, 3, 16, 16) and, with ``answers``,
        ``labels`` (B, T) holding the answer and ``<eos>`` ids and -100 elsewhere.

        Raises ``ValueError`` when a row's tokens plus ``reserved_positions`` (the probe
        and the tokens still to decode) exceed ``max_positions``: the model was never
        trained on longer sequences, so its answer would mean nothing.
        """
        _check_images(images)
        _check_questions(questions)
        if answers is not None:
            _check_questions(answers, "answers")
        if not (len(images) == len(questions) == len(tiers)):
            raise ValueError(
                f"batch sizes differ: {len(images)} images, {len(questions)} questions, {len(tiers)} tiers"
            )
        if len(images) == 0:
            raise ValueError("empty batch: give at least one image and question")
        tok = self.tokenizer
        rows, label_rows, crops = [], [], []
        for i, (image, question, tier) in enumerate(zip(images, questions, tiers)):
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"question {i} is empty or not a string: {question!r}")
            crops.append(make_crops(image, tier))
            # LLaVA's order: image, then question, so the answer is read by a text token
            # that attends to the image (image features have a much larger norm than
            # word embeddings; an image token at the end would dominate the readout).
            prompt = [tok.bos_token_id] + [self.image_token_id] * (tier_num_crops(tier) * self.tokens_per_crop)
            prompt += tok(question, add_special_tokens=False)["input_ids"]
            labels = [-100] * len(prompt)
            if answers is not None:
                target = tok(answers[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                prompt, labels = prompt + target, labels + target
            if len(prompt) + reserved_positions > self.max_positions:
                raise ValueError(
                    f"question {i} is too long: {len(prompt)} tokens ({tier_num_crops(tier) * self.tokens_per_crop} of "
                    f"them image tokens at tier {tier!r})" + (f" + {reserved_positions} reserved" if reserved_positions else "")
                    + f" exceed the model's limit of {self.max_positions} positions (max_position_embeddings)"
                )
            rows.append(prompt)
            label_rows.append(labels)
        width = max(map(len, rows))
        # Left-padded in Python, then one tensor each, made on the model's device.
        device = self.device
        input_ids = torch.tensor(
            [[tok.pad_token_id] * (width - len(ids)) + ids for ids in rows], dtype=torch.long, device=device
        )
        attention_mask = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], dtype=torch.long, device=device
        )
        labels = torch.tensor([[-100] * (width - len(lab)) + lab for lab in label_rows], dtype=torch.long, device=device)
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": torch.cat(crops).to(device)}
        if answers is not None:
            out["labels"] = labels
        return out

    def plan(self, knobs: Sequence[KnobConfig]) -> RowPlan:
        """Validate one configuration per row and turn them into a ``RowPlan``."""
        if len(knobs) == 0:
            raise ValueError("empty batch: give at least one image and question")
        for k in knobs:
            self.knob_space.validate(k)
        return RowPlan(
            tiers=[k.tier for k in knobs],
            insertion_positions=torch.tensor([k.insertion_position for k in knobs], device=self.device),
            top_k=torch.tensor([k.top_k for k in knobs], device=self.device),
            run_block=torch.stack([self.run_mask(k.insertion_position, k.num_active_blocks) for k in knobs]),
        )

    def _stage1_plan(self, stage1: Sequence[tuple[str, int]], probe_embeddings, batch: int) -> RowPlan:
        """Check Mode A's inputs and plan rows whose Stage-2 knobs are not chosen yet.

        Each row gets its (tier, p), every block its p allows and the default top-k; a
        resumable forward replaces the Stage-2 knobs at the row's pause.
        """
        if probe_embeddings is None:
            raise ValueError("Mode A needs probe_embeddings to read the latency token")
        if len(stage1) != batch:
            raise ValueError(f"stage1 has {len(stage1)} rows for a batch of {batch}")
        k0 = self.default_top_k
        # block_options validates p.
        return self.plan([KnobConfig(tier, p, k0, self.knob_space.block_options(p)[-1]) for tier, p in stage1])

    def _check_request(self, images, questions, probe_embeddings: torch.Tensor | None = None) -> int:
        """Check a batch's images, questions and probe embeddings (B, d) at an entry point; return B."""
        _check_images(images)
        _check_questions(questions)
        batch = len(images)
        if probe_embeddings is not None and tuple(probe_embeddings.shape) != (batch, self.hidden_size):
            raise ValueError(
                f"probe_embeddings has shape {tuple(probe_embeddings.shape)}: expected ({batch}, {self.hidden_size})"
            )
        return batch

    # --- the executor -------------------------------------------------------------
    def _route_mask_hook(self, module, args, output):
        """Zero routing weights past each token's own top-k (mixed-top-k batches only).

        The router ran with top_k = max over the batch; ``torch.topk`` sorts, so the
        entries past k are that token's lowest. Renormalise where the model does.
        """
        if self._token_top_k is None:
            return output
        logits, scores, indices = output
        keep = torch.arange(scores.shape[-1], device=scores.device)[None, :] < self._token_top_k[:, None]
        scores = scores * keep
        if getattr(module, "norm_topk_prob", False):
            scores = scores / scores.sum(dim=-1, keepdim=True)
        return logits, scores, indices

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Token embeddings with image features scattered into the ``<image>`` positions: (B, T, d)."""
        inner = self.model.model
        embeds = inner.get_input_embeddings()(input_ids)
        features = inner.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        features = torch.cat(features, dim=0).to(embeds.dtype)
        mask = inner.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=features)
        return embeds.masked_scatter(mask, features)

    def _prompt(
        self,
        images: Sequence[torch.Tensor],
        questions: Sequence[str],
        plan: RowPlan,
        answers: Sequence[str] | None = None,
        *,
        probe_embeddings: torch.Tensor | None = None,
        reserved_positions: int = 0,
    ) -> _Prompt:
        """Tokenise and embed a batch for the block loop, the probe (B, d) appended last if given.

        ``reserved_positions`` counts the positions still to come after the prompt (the
        decoded tokens); the probe reserves its own.
        """
        probe = probe_embeddings is not None
        inputs = self.build_inputs(
            images, questions, plan.tiers, answers, reserved_positions=reserved_positions + (1 if probe else 0)
        )
        embeds = self.embed(inputs["input_ids"], inputs["pixel_values"])
        attention_mask = inputs["attention_mask"]
        if probe:
            # The probe goes last: causal attention keeps every other position blind to it.
            embeds = torch.cat([embeds, probe_embeddings[:, None, :].to(embeds)], dim=1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(attention_mask), 1)], dim=1)
        # Left padding: each row counts its own positions from 0, as transformers' generate does.
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        return _Prompt(embeds, attention_mask, position_ids, embeds.shape[1] - 1 if probe else None, inputs)

    def _run_block(self, idx: int, hidden, rows: "_HostPlan", ctx: dict) -> torch.Tensor:
        """Run block ``idx`` for the rows that execute it, with their top-k."""
        run = [r[idx] for r in rows.run_block]
        if not any(run):
            # Departs from OlmoeModel.forward: a block no row runs is not called at all
            # (its cache layer stays empty).
            return hidden
        # Departs from OlmoeModel.forward: the router's top-k is set per block (blocks
        # < p keep the default; rows still undecided in Mode A are before their p) and
        # per row: the router runs the batch's largest k and a hook zeroes each row's
        # weights past its own k.
        row_k = [k if (d and p <= idx) else self.default_top_k for k, d, p in zip(rows.top_k, rows.decided, rows.p)]
        layer = self.layers[idx]
        gate = layer.mlp.gate
        k_max = max(row_k)
        gate.top_k = k_max
        hook = None
        if min(row_k) < k_max:
            self._token_top_k = torch.tensor(row_k, device=hidden.device).repeat_interleave(hidden.shape[1])
            hook = gate.register_forward_hook(self._route_mask_hook)
        try:
            out = layer(
                hidden,
                attention_mask=ctx["mask"],
                position_ids=ctx["position_ids"],
                cache=ctx["cache"],
                use_cache=ctx["cache"] is not None,
                position_embeddings=ctx["position_embeddings"],
            )
        finally:
            if hook is not None:
                hook.remove()
            self._token_top_k = None
            gate.top_k = self.default_top_k
        if all(run):
            return out
        # Departs from OlmoeModel.forward: rows that skip this block keep their residual stream.
        keep = torch.tensor(run, device=hidden.device)
        return torch.where(keep[:, None, None], out, hidden)

    def _context(self, embeds, attention_mask, position_ids, cache, plan: RowPlan) -> dict:
        """The mask, positions, cache and rotary embeddings every block call shares."""
        lm = self.model.model.language_model
        # Departs from OlmoeModel.forward: the mask's key length comes from one cache
        # layer, by default layer 0. Use the first block any row runs, so a skipped
        # block 0 (block ranking) cannot silently shorten it.
        first_run = int(plan.run_block.any(0).nonzero()[0]) if bool(plan.run_block.any()) else 0
        mask = create_causal_mask(
            config=lm.config,
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            layer_idx=first_run,
        )
        return {
            "mask": mask,
            "position_ids": position_ids,
            "cache": cache,
            "position_embeddings": lm.rotary_emb(embeds, position_ids),
        }

    def forward_blocks(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        plan: RowPlan,
        cache: DynamicCache | None = None,
        *,
        probe_index: int | None = None,
        decide: Stage2Decider | None = None,
        stop_after: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the block loop over ``embeds`` (B, T, d) and return (hidden (B, T, d), latency tokens).

        This is ``OlmoeModel.forward``'s layer loop (one causal mask, rotary embeddings
        and cache for all blocks, the final norm left to ``logits``) with the departures
        marked in the code: per-row block skipping and top-k (``_run_block``), the mask's
        cache layer (``_context``), and the probe and pause here.

        With ``probe_index``, the hidden state at that position is read for row b after
        block ``p_b - 1`` (the latency token, (B, d)). With ``decide``, every row's
        Stage-2 knobs are undecided until its pause, where ``decide`` chooses them and
        the forward resumes from the same hidden states and cache. ``stop_after`` ends
        the loop after that many blocks (a partial forward).
        """
        ctx = self._context(embeds, attention_mask, position_ids, cache, plan)
        decided = torch.full((len(plan.tiers),), decide is None, dtype=torch.bool, device=plan.top_k.device)
        latency = None if probe_index is None else embeds.new_zeros(embeds.shape[0], embeds.shape[-1])
        hidden = embeds
        # The plan as Python lists, read once per forward: the per-block decisions then
        # cost no tensor ops or device syncs (measurable at batch 1, where overhead dominates).
        host = _HostPlan.of(plan, decided)
        for idx in range(self.num_layers):
            # Departs from OlmoeModel.forward: rows pause before block p, where the probe's
            # hidden state (after block p-1) is the latency token and Stage 2 decides.
            if probe_index is not None and idx in host.p:
                pausing = plan.insertion_positions == idx
                latency[pausing] = hidden[pausing, probe_index]
                undecided = pausing & ~decided
                if bool(undecided.any()):
                    rows = undecided.nonzero().squeeze(1)
                    self._apply_stage2(plan, rows, *decide(latency[rows], rows))
                    decided = decided | undecided
                    host = _HostPlan.of(plan, decided)
            if stop_after is not None and idx >= stop_after:
                break
            hidden = self._run_block(idx, hidden, host, ctx)
        return hidden, latency

    def _apply_stage2(self, plan: RowPlan, rows: torch.Tensor, top_k, num_active_blocks) -> None:
        # What ``decide`` returned comes from the caller's code: checked like any knob.
        if not len(top_k) == len(num_active_blocks) == len(rows):
            raise ValueError(
                f"decide returned {len(top_k)} top_k and {len(num_active_blocks)} num_active_blocks "
                f"values for {len(rows)} rows: expected one of each per row"
            )
        for row, k, n in zip(rows.tolist(), top_k, num_active_blocks):
            knobs = KnobConfig(plan.tiers[row], int(plan.insertion_positions[row]), int(k), int(n))
            self.knob_space.validate(knobs)
            plan.top_k[row] = knobs.top_k
            plan.run_block[row] = self.run_mask(knobs.insertion_position, knobs.num_active_blocks)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (..., V) of hidden states (..., d): the final norm, then the LM head."""
        return self.model.lm_head(self.model.model.language_model.norm(hidden))

    def _answer(
        self,
        images: Sequence[torch.Tensor],
        questions: Sequence[str],
        plan: RowPlan,
        max_new_tokens: int,
        min_new_tokens: int,
        probe_embeddings: torch.Tensor | None = None,
        decide: Stage2Decider | None = None,
    ) -> GenerationOutput:
        """Prefill with a KV cache (pausing for ``decide``), then greedy decoding: what every answering method runs."""
        # Every decoded token takes a position after the prompt.
        prompt = self._prompt(
            images, questions, plan, probe_embeddings=probe_embeddings, reserved_positions=max_new_tokens
        )
        cache = DynamicCache(config=self.model.config.text_config)
        hidden, latency = self.forward_blocks(
            prompt.embeds, prompt.attention_mask, prompt.position_ids, plan, cache,
            probe_index=prompt.probe_index, decide=decide,
        )
        attention_mask, position_ids = prompt.attention_mask, prompt.position_ids
        if prompt.probe_index is not None:
            # Remove the probe from the cache and the mask: decoding never sees it.
            cache.crop(-1)
            hidden, attention_mask, position_ids = hidden[:, :-1], attention_mask[:, :-1], position_ids[:, :-1]
        sequences = self._greedy_decode(
            self.logits(hidden[:, -1]), plan, cache, attention_mask, position_ids[:, -1:] + 1,
            max_new_tokens, min_new_tokens,
        )
        answers = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return GenerationOutput(
            answers=[a.strip() for a in answers],
            sequences=sequences,
            knobs=plan.knobs(),
            latency_tokens=latency,
            num_prompt_tokens=prompt.inputs["attention_mask"].sum(1),
        )

    def _greedy_decode(
        self,
        next_logits: torch.Tensor,
        plan: RowPlan,
        cache: DynamicCache,
        attention_mask: torch.Tensor,
        next_position: torch.Tensor,
        max_new_tokens: int,
        min_new_tokens: int,
    ) -> torch.Tensor:
        """Greedy tokens (B, T_new) from the prefill's last logits (B, V), one cached step per token.

        A row that has emitted eos gets pad from then on; decoding ends when every row has,
        but not before ``min_new_tokens`` (eos is masked until then).
        """
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        batch = next_logits.shape[0]
        unfinished = torch.ones(batch, dtype=torch.bool, device=next_logits.device)
        generated = []
        for step in range(max_new_tokens):
            if step < min_new_tokens:
                next_logits[:, eos] = -torch.inf
            token = next_logits.argmax(-1)
            token = torch.where(unfinished, token, torch.full_like(token, pad))
            generated.append(token)
            unfinished &= token != eos
            if step == max_new_tokens - 1 or (not bool(unfinished.any()) and step + 1 >= min_new_tokens):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
            step_embeds = self.input_embeddings(token[:, None])
            hidden, _ = self.forward_blocks(step_embeds, attention_mask, next_position, plan, cache)
            next_logits = self.logits(hidden[:, -1])
            next_position = next_position + 1
        return torch.stack(generated, dim=1)

    # --- answering ------------------------------------------------------------------
    @torch.inference_mode()
    def answer_with_knobs(
        self,
        images: Sequence[torch.Tensor],
        questions: Sequence[str],
        knobs: KnobConfig | Sequence[KnobConfig] | None = None,
        max_new_tokens: int = 3,
        *,
        probe_embeddings: torch.Tensor | None = None,
        min_new_tokens: int = 0,
    ) -> GenerationOutput:
        """Greedy answers with every knob known before the model runs (serving, Mode B, naive Mode A).

        Every knob is applied in prefill and in each cached decode step; rows of one batch
        may have different knobs.

        Args:
            images: B uint8 tensors (3, 48, 48), or one (B, 3, 48, 48) tensor.
            questions: B question strings.
            knobs: one ``KnobConfig`` for all rows or one per row. Defaults to the full configuration.
            max_new_tokens: most tokens to decode per row.
            probe_embeddings: (B, d) input embedding of the probe token. When given,
                ``latency_tokens`` are returned (the answers do not change).
            min_new_tokens: decode at least this many tokens (fixed-length latency profiling).
        """
        _check_token_counts(max_new_tokens, min_new_tokens)
        batch = self._check_request(images, questions, probe_embeddings)
        plan = self.plan(as_row_knobs(self.knob_space.full() if knobs is None else knobs, batch))
        return self._answer(images, questions, plan, max_new_tokens, min_new_tokens, probe_embeddings)

    @torch.inference_mode()
    def answer_resumable(
        self,
        images: Sequence[torch.Tensor],
        questions: Sequence[str],
        stage1: Sequence[tuple[str, int]],
        probe_embeddings: torch.Tensor,
        decide: Stage2Decider,
        max_new_tokens: int = 3,
        *,
        min_new_tokens: int = 0,
    ) -> GenerationOutput:
        """Resumable Mode A: one forward that pauses at each row's p for Stage 2, then answers.

        Each row runs blocks [0, p) with its tier and the default top-k. At its pause,
        ``decide`` maps the row's latency token (the probe's hidden state after block
        p-1) to (top_k, num_active_blocks); rows that share p are decided in one call, in
        block order. The forward then continues from the same hidden states and KV
        cache with those knobs, and decodes greedily.

        Args:
            images, questions, max_new_tokens, min_new_tokens: as in ``answer_with_knobs``.
            stage1: [(tier, insertion_position)] per row.
            probe_embeddings: (B, d) input embedding of the probe token.
            decide: a ``Stage2Decider``; what it returns is validated like any knob.

        Returns the answers with the decided configurations in ``knobs`` and the latency
        tokens (B, d).
        """
        _check_token_counts(max_new_tokens, min_new_tokens)
        batch = self._check_request(images, questions, probe_embeddings)
        if not callable(decide):
            raise TypeError(f"decide must be callable (a Stage2Decider), got {type(decide).__name__}")
        plan = self._stage1_plan(stage1, probe_embeddings, batch)
        return self._answer(images, questions, plan, max_new_tokens, min_new_tokens, probe_embeddings, decide)

    @torch.inference_mode()
    def generate_skipping(
        self,
        images: Sequence[torch.Tensor],
        questions: Sequence[str],
        skip_blocks: Sequence[int],
        max_new_tokens: int = 3,
    ) -> GenerationOutput:
        """Analysis only (the block ranking): greedy answers at the full configuration with
        exactly the blocks ``skip_blocks`` skipped in every row.

        Any block may be skipped, block 0 included, so the output's ``knobs`` report the
        blocks that ran and need not be a configuration of the knob space.
        """
        _check_token_counts(max_new_tokens, 0)
        batch = self._check_request(images, questions)
        bad = [b for b in skip_blocks if isinstance(b, bool) or not (isinstance(b, int) and 0 <= b < self.num_layers)]
        if bad:
            raise ValueError(f"skip_blocks={list(skip_blocks)} is invalid: blocks are 0..{self.num_layers - 1}")
        plan = self.plan([self.knob_space.full()] * batch)
        plan.run_block[:, list(skip_blocks)] = False
        return self._answer(images, questions, plan, max_new_tokens, 0)

    def generate(
        self,
        images: Sequence[torch.Tensor],
        questions: Sequence[str],
        knobs: KnobConfig | Sequence[KnobConfig] | None = None,
        max_new_tokens: int = 3,
        *,
        probe_embeddings: torch.Tensor | None = None,
        decide: Stage2Decider | None = None,
        stage1: Sequence[tuple[str, int]] | None = None,
        min_new_tokens: int = 0,
    ) -> GenerationOutput:
        """Greedy answers, either way: ``answer_with_knobs`` (``knobs``), or with ``stage1``
        and ``decide`` the resumable Mode-A forward ``answer_resumable``.

        For callers that choose the mode by their arguments (the trainers run every
        mode through one call); the arguments mean what they mean there.
        """
        if decide is None and stage1 is None:
            return self.answer_with_knobs(
                images, questions, knobs, max_new_tokens,
                probe_embeddings=probe_embeddings, min_new_tokens=min_new_tokens,
            )
        if decide is None:
            raise ValueError("`stage1` is only used by resumable Mode A: pass `decide` with it, or `knobs` alone")
        if stage1 is None or knobs is not None:
            raise ValueError("resumable Mode A takes `stage1` [(tier, insertion_position)] and `decide`, not `knobs`")
        return self.answer_resumable(
            images, questions, stage1, probe_embeddings, decide, max_new_tokens, min_new_tokens=min_new_tokens
        )

    @torch.inference_mode()
    def partial_forward(
        self,
        images: Sequence[torch.Tensor],
        questions: Sequence[str],
        stage1: Sequence[tuple[str, int]],
        probe_embeddings: torch.Tensor,
    ) -> torch.Tensor:
        """Naive Mode A's extra forward (as in the original system): vision + blocks [0, p) only.

        Returns the latency tokens (B, d), the same ones ``answer_resumable`` reads at its pause.
        """
        batch = self._check_request(images, questions, probe_embeddings)
        plan = self._stage1_plan(stage1, probe_embeddings, batch)
        prompt = self._prompt(images, questions, plan, probe_embeddings=probe_embeddings)
        _, latency = self.forward_blocks(
            prompt.embeds,
            prompt.attention_mask,
            prompt.position_ids,
            plan,
            probe_index=prompt.probe_index,
            stop_after=int(plan.insertion_positions.max()),
        )
        return latency

    def loss(
        self,
        images: Sequence[torch.Tensor],
        questions: Sequence[str],
        answers: Sequence[str],
        knobs: KnobConfig | Sequence[KnobConfig],
        aux_loss_weight: float = 0.01,
    ) -> tuple[torch.Tensor, dict]:
        """Teacher-forced cross-entropy on the answer tokens, with the knobs applied.

        Returns (loss, stats) where stats has ``ce`` and ``aux`` (the MoE load-balancing loss).
        """
        batch = self._check_request(images, questions)
        _check_questions(answers, "answers")
        if len(answers) != batch:
            raise ValueError(f"got {len(answers)} answers for a batch of {batch}")
        plan = self.plan(as_row_knobs(knobs, batch))
        prompt = self._prompt(images, questions, plan, answers)
        router_logits = []
        hooks = [
            layer.mlp.gate.register_forward_hook(lambda m, a, out: router_logits.append(out[0]))
            for layer in self.layers
        ]
        try:
            hidden, _ = self.forward_blocks(prompt.embeds, prompt.attention_mask, prompt.position_ids, plan)
        finally:
            for h in hooks:
                h.remove()
        logits = self.logits(hidden[:, :-1])
        labels = prompt.inputs["labels"][:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        aux = _load_balancing(router_logits, self.model.config.text_config.num_experts, self.default_top_k)
        return ce + aux_loss_weight * aux, {"ce": float(ce.detach()), "aux": float(aux.detach())}


def _load_balancing(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-style balancing loss over all routed tokens (keeps experts in use so top-k has a choice)."""
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    if not router_logits:
        return torch.zeros(())
    return load_balancing_loss_func(tuple(router_logits), num_experts, top_k)
