"""Issue 16, "nothing lost, nothing silently wrong": one test per finding.

Each bad input gets a clear error (or the correct behaviour), and nothing on disk
changes unless the command was asked to write there. Commands run in-process from a
temporary working directory, so their default outputs (``runs/...``) land there.
"""

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from knoblib.__main__ import build_parser, main
from knoblib.assets import load_samples
from knoblib.data import data_path
from knoblib.knobs import KnobConfig
from knoblib.outputs import check_output
from knoblib.vlm import KnobVLM

REPO = Path(__file__).resolve().parent.parent


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (what "untouched" means here)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def data_digest():
    return tree_digest(data_path())


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run commands from an empty working directory (their runs/ goes there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def no_work(monkeypatch):
    """Make loading the model fail loudly: a refusal must come before any work starts."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command started its work before refusing")

    monkeypatch.setattr(KnobVLM, "from_pretrained", classmethod(refuse))


# --- 1. files lost or overwritten --------------------------------------------------------------
COMMAND_DEFAULTS = {
    "pretrain": "runs/model",
    "rank-blocks": "runs/model_ranked",
    "profile-latency": "runs/latency_table.json",
    "knob-table": "runs/knob_table.json",
    "expert-ablation": "runs/expert_ablation.json",
    "evaluate": "runs/eval",
}


@pytest.mark.parametrize("command, default", sorted(COMMAND_DEFAULTS.items()))
def test_every_command_writes_to_runs_by_default(command, default):
    args = build_parser().parse_args([command])
    assert args.out == default and not args.overwrite
    data = build_parser().parse_args(["data"])
    assert (data.out, data.tokenizer_out) == ("runs/vqa", "runs/tokenizer")
    # config-accuracy and train pick their default from --split / --mode: runs/config_accuracy_<split>.json, runs/<mode>.
    assert build_parser().parse_args(["config-accuracy"]).out is None
    assert build_parser().parse_args(["train"]).out is None


@pytest.mark.slow
def test_pretrain_by_default_leaves_the_shipped_model_alone(in_tmp, data_digest):
    main(["pretrain", "--steps", "1", "--batch-size", "2"])
    assert (in_tmp / "runs" / "model" / "model.safetensors").is_file()
    assert tree_digest(data_path()) == data_digest


def test_config_accuracy_by_default_leaves_data_alone(in_tmp, data_digest):
    main(["config-accuracy", "--n", "2"])
    saved = json.loads((in_tmp / "runs" / "config_accuracy_val.json").read_text())
    assert saved["split"] == "val" and saved["rows"]
    assert tree_digest(data_path()) == data_digest


@pytest.mark.parametrize(
    "argv",
    [
        ["config-accuracy", "--n", "2", "--out", "{data}/config_accuracy_val.json"],
        ["config-accuracy", "--n", "2", "--out", "{data}/a_new_file.json"],
        ["pretrain", "--steps", "1", "--out", "{data}/model"],
        ["profile-latency", "--out", "{data}/latency_table.json"],
        ["knob-table", "--out", "{data}/knob_table.json"],
        ["expert-ablation", "--out", "{data}/expert_ablation.json"],
        ["evaluate", "--out", "{data}/eval"],
        ["rank-blocks", "--model", "{data}/model", "--out", "{data}/model"],
        ["data", "--out", "{data}/vqa", "--tokenizer-out", "{data}/tokenizer"],
    ],
)
def test_writing_into_data_needs_overwrite(argv, in_tmp, no_work, data_digest):
    with pytest.raises(ValueError, match="--overwrite"):
        main([a.format(data=data_path()) for a in argv])
    assert tree_digest(data_path()) == data_digest
    assert not (in_tmp / "runs").exists()


def test_data_itself_is_never_an_output(tmp_path):
    for path in (data_path(), data_path().parent):
        with pytest.raises(ValueError, match="data folder"):
            check_output(path, True, "--out", kind="dir")
    # The wrong kind is refused whatever --overwrite says.
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(ValueError, match="is a file"):
        check_output(tmp_path / "file.json", True, "--out", kind="dir")
    with pytest.raises(ValueError, match="is a folder"):
        check_output(tmp_path, True, "--out", kind="file")


def test_an_existing_output_needs_overwrite(in_tmp, no_work):
    out = in_tmp / "knob_table.json"
    out.write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["knob-table", "--n", "2", "--out", str(out)])
    assert out.read_text() == "keep me"
    # A folder with files counts as existing output too; an empty one does not.
    (in_tmp / "runs" / "eval").mkdir(parents=True)
    (in_tmp / "runs" / "eval" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["evaluate", "--n", "2"])
    assert (in_tmp / "runs" / "eval" / "notes.txt").read_text() == "mine"


def test_evaluate_onto_an_existing_file_fails_before_the_sweep(in_tmp, no_work):
    out = in_tmp / "sweep_here"
    out.write_text("a file, not a folder")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(ValueError, match="is a file"):
            main(["evaluate", "--n", "2", "--out", str(out)] + extra)
    assert out.read_text() == "a file, not a folder"


def test_rank_blocks_writes_a_copy_and_in_place_needs_overwrite(in_tmp, data_digest):
    model = in_tmp / "model"
    shutil.copytree(data_path("model"), model)
    before = tree_digest(model)
    main(["rank-blocks", "--model", str(model), "--n", "2"])
    ranked = in_tmp / "runs" / "model_ranked"
    saved = json.loads((ranked / "block_importance.json").read_text())
    assert saved["n"] == 2 and len(saved["importance"]) == 8
    assert KnobVLM.from_pretrained(ranked).block_importance == saved["importance"]
    assert (ranked / "pretrain_log.json").is_file()  # the rest of the model folder is copied
    assert tree_digest(model) == before
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["rank-blocks", "--model", str(model), "--out", str(model), "--n", "2"])
    assert tree_digest(model) == before
    main(["rank-blocks", "--model", str(model), "--out", str(model), "--n", "2", "--overwrite"])
    assert json.loads((model / "block_importance.json").read_text())["n"] == 2
    assert sorted(p.name for p in in_tmp.iterdir()) == ["model", "runs"]  # no staging folders left
    assert tree_digest(data_path()) == data_digest


def test_export_refuses_a_folder_holding_other_files(in_tmp, no_work, data_digest):
    export = in_tmp / "mine"
    export.mkdir()
    (export / "notes.txt").write_text("do not delete")
    (export / "config.json").write_text("{}")
    before = tree_digest(export)
    for extra in ([], ["--overwrite"]):
        with pytest.raises(ValueError, match="notes.txt"):
            main(["train", "--steps", "2", "--out", str(in_tmp / "R"), "--export", str(export)] + extra)
    assert tree_digest(export) == before
    assert not (in_tmp / "R").exists()
    # Not even with --overwrite is data/ itself an export folder.
    with pytest.raises(ValueError, match="data folder"):
        main(["train", "--steps", "2", "--out", str(in_tmp / "R"), "--export", str(data_path()), "--overwrite"])
    assert tree_digest(data_path()) == data_digest


def test_export_over_an_earlier_export_needs_overwrite(in_tmp, no_work, data_digest):
    export = in_tmp / "controller"
    shutil.copytree(data_path("controller_B"), export)
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["train", "--steps", "2", "--out", str(in_tmp / "R"), "--export", str(export)])
    with pytest.raises(ValueError, match="--overwrite"):
        main(["train", "--steps", "2", "--out", str(in_tmp / "R"), "--export", str(data_path("controller_B"))])
    # A folder with only an export's file names but another model's config is not an export.
    (export / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="not an earlier controller export"):
        main(["train", "--steps", "2", "--out", str(in_tmp / "R"), "--export", str(export), "--overwrite"])
    assert tree_digest(data_path()) == data_digest


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """``train --steps 1`` (Mode B) exporting over an earlier export with --overwrite: (run folder, export folder)."""
    root = tmp_path_factory.mktemp("trained")
    export = root / "export"
    shutil.copytree(data_path("controller_B"), export)
    (export / "metrics.jsonl").write_text("old\n")
    main(["train", "--mode", "B", "--steps", "1", "--out", str(root / "R"), "--export", str(export), "--overwrite"])
    return root / "R", export


@pytest.mark.slow
def test_export_replaces_an_earlier_export_whole(trained_run):
    run, export = trained_run
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "metrics.jsonl", "model.safetensors"]
    assert (export / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()
    assert sorted(p.name for p in export.parent.iterdir()) == ["R", "export"]  # no temporary folders left


def test_make_artifacts_names_each_data_path_and_overwrites():
    makefile = (REPO / "Makefile").read_text()
    macros = dict(re.findall(r"^([A-Z_]+)\s*:?=\s*(.*)$", makefile, flags=re.M))
    recipe = makefile.split("\nartifacts:", 1)[1].split("\n\n", 1)[0]
    for _ in range(3):  # macros name macros: $(TRAIN_B) holds $(PRICE)
        recipe = re.sub(r"\$\(([A-Z_]+)\)", lambda m: macros.get(m.group(1), m.group(0)), recipe)
    commands = [line.strip().rstrip("; \\") for line in recipe.splitlines() if "-m knoblib" in line]
    assert len(commands) >= 12  # data .. expert-ablation, three trainings, two evaluations
    for line in commands:
        assert "--overwrite" in line and (" data/" in line), line
    argv = [line.split("-m knoblib ", 1)[1].replace("$$suffix", "").replace("$$seed", "0").split() for line in commands]
    parser = build_parser()
    for args in argv:
        parser.parse_args(args)  # every recipe line is a valid command line


# --- 2. numeric options --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, option",
    [
        (["config-accuracy", "--n", "-998"], "--n"),
        (["evaluate", "--n", "0"], "--n"),
        (["train", "--steps", "0"], "--steps"),
        (["pretrain", "--batch-size", "0"], "--batch-size"),
        (["pretrain", "--lr", "nan"], "--lr"),
        (["train", "--lr", "-1"], "--lr"),
        (["train", "--lr", "inf"], "--lr"),
        (["train", "--kl-coef", "-0.1"], "--kl-coef"),
        (["profile-latency", "--repeats", "0"], "--repeats"),
        (["knob-table", "--repeats", "0"], "--repeats"),
        (["evaluate", "--budgets", "1"], "--budgets"),
        (["oracle-gap", "--budgets", "1"], "--budgets"),
        (["rank-blocks", "--n", "two"], "--n"),
    ],
)
def test_numeric_options_are_checked_where_they_enter(argv, option, in_tmp, no_work, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "invalid" in err, err
    assert not (in_tmp / "runs").exists()


# --- 3. honest resume ----------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_refuses_changed_settings_and_override_records_what_runs(trained_run, tmp_path):
    run = tmp_path / "R"
    shutil.copytree(trained_run[0], run)
    before = tree_digest(run)
    with pytest.raises(ValueError, match=r"lr: saved 0\.001, requested 0\.5; seed: saved 0, requested 9") as err:
        main(["train", "--resume", "--steps", "2", "--lr", "0.5", "--seed", "9", "--out", str(run)])
    assert "--override" in str(err.value)
    # The warm start cannot be changed after the fact, not even with --override.
    with pytest.raises(ValueError, match="warm_start_steps: saved 0, requested 3"):
        main(["train", "--resume", "--steps", "2", "--warm-start-steps", "3", "--out", str(run), "--override"])
    assert tree_digest(run) == before

    main(["train", "--resume", "--steps", "2", "--lr", "0.5", "--seed", "9", "--out", str(run), "--override"])
    state = torch.load(run / "last" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2
    assert (state["config"]["lr"], state["config"]["seed"]) == (0.5, 9)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [0.5]
    # Without changes (only --steps), a resume needs no --override.
    main(["train", "--resume", "--steps", "3", "--out", str(run)])
    assert torch.load(run / "last" / "trainer_state.pt", weights_only=False)["step"] == 3


# --- 4. questions a person types -----------------------------------------------------------------
def test_shipped_splits_tokenize_exactly_as_before(tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers

    # The tokenizer before issue 16: the same vocabulary, split at whitespace only.
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    old = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    old.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    texts = sorted({t for split in ("train", "val", "test") for s in load_samples(split)
                    for t in (s.question, s.answer)})
    new_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    old_ids = [e.ids for e in old.encode_batch(texts, add_special_tokens=False)]
    assert new_ids == old_ids
    assert all(1 not in ids for ids in new_ids)  # and none of them is unknown
    # The model carries the same tokenizer as data/tokenizer.
    assert (data_path("model") / "tokenizer.json").read_bytes() == (data_path("tokenizer") / "tokenizer.json").read_bytes()


def test_case_and_punctuation_spacing_do_not_change_the_ids(tokenizer):
    ids = lambda q: tokenizer(q, add_special_tokens=False)["input_ids"]  # noqa: E731
    expected = ids("what color is the shape ?")
    assert ids("what color is the shape?") == expected
    assert ids("What color is the shape ?") == expected
    assert ids("WHAT COLOR IS THE SHAPE?") == expected
    assert 1 not in expected


def test_unknown_words_are_reported(tiny_vlm):
    assert tiny_vlm.unknown_words("What color is the shape?") == []
    assert tiny_vlm.unknown_words("What Colour is the blob, please?") == ["Colour", "blob", ",", "please"]
    with pytest.raises(TypeError, match="question"):
        tiny_vlm.unknown_words(["what color is the shape ?"])


def test_a_question_longer_than_the_context_is_refused(tiny_vlm, samples):
    limit = tiny_vlm.max_positions
    long_question = " ".join(["what color is the shape"] * 640) + " ?"
    with pytest.raises(ValueError, match=f"limit of {limit} positions"):
        tiny_vlm.build_inputs([samples[0].image()], [long_question], ["high"])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        tiny_vlm.generate([samples[0].image()], [long_question])
    # Just inside the limit, with the decoded tokens reserved, still runs.
    image_tokens = 10 * tiny_vlm.tokens_per_crop
    fits = " ".join(["red"] * (limit - 1 - image_tokens - 3))
    assert len(tiny_vlm.generate([samples[0].image()], [fits], max_new_tokens=3).answers) == 1


def test_a_single_string_is_not_a_list_of_questions(tiny_vlm, samples):
    from knoblib.features import LanguageFeatureExtractor

    question, image = samples[0].question, samples[0].image()
    with pytest.raises(TypeError, match="questions must be a list"):
        tiny_vlm.generate([image], question)
    with pytest.raises(TypeError, match="questions must be a list"):
        tiny_vlm.build_inputs([image], question, ["high"])
    with pytest.raises(TypeError, match="questions must be a list"):
        LanguageFeatureExtractor.from_vlm(tiny_vlm)(question)
    # Images keep their clear errors: one image instead of a list, or the wrong shape / dtype.
    with pytest.raises(TypeError, match="wrap a single image"):
        tiny_vlm.generate(image, [question])
    with pytest.raises(ValueError, match=r"shape \(3, 32, 32\)"):
        tiny_vlm.generate([torch.zeros(3, 32, 32, dtype=torch.uint8)], [question])
    with pytest.raises(TypeError, match="torch.Tensor"):
        tiny_vlm.generate([image.numpy()], [question])


# --- 5. knob values ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, match",
    [
        (("high", 1, 4.0, 8), "top_k=4.0"),
        (("high", 1, 4, 7.0), "num_active_blocks=7.0"),
        (("high", 1, True, 8), "top_k=True"),
        ((3, 1, 4, 8), "tier=3"),
    ],
)
def test_knob_values_must_be_ints(args, match):
    with pytest.raises(ValueError, match=match):
        KnobConfig(*args)


def test_numpy_integers_are_knob_values():
    knobs = KnobConfig("high", np.int64(1), np.int32(4), np.int64(8))
    assert knobs == KnobConfig("high", 1, 4, 8) and type(knobs.top_k) is int


def test_token_counts_must_be_ints(tiny_vlm, samples):
    images, questions = [samples[0].image()], [samples[0].question]
    for kwargs, match in (
        ({"max_new_tokens": "3"}, "max_new_tokens='3'"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"max_new_tokens": 2.0}, "max_new_tokens=2.0"),
        ({"min_new_tokens": -1}, "min_new_tokens=-1"),
        ({"min_new_tokens": "1"}, "min_new_tokens='1'"),
    ):
        with pytest.raises(ValueError, match=match):
            tiny_vlm.generate(images, questions, **kwargs)


@pytest.mark.parametrize(
    "knobs",
    [{"tier": "high", "insertion_position": 1, "top_k": 4, "num_active_blocks": 8}, ("high", 1, 4, 8), "high/p1/k4/b8"],
    ids=["dict", "tuple", "str"],
)
def test_knobs_of_the_wrong_type_say_what_is_expected(tiny_vlm, samples, knobs):
    with pytest.raises(TypeError, match="a KnobConfig or a list of KnobConfig"):
        tiny_vlm.generate([samples[0].image()], [samples[0].question], knobs)
    with pytest.raises(TypeError, match="a KnobConfig or a list of KnobConfig"):
        tiny_vlm.loss([samples[0].image()], [samples[0].question], [samples[0].answer], knobs)


# --- 6. the reward -------------------------------------------------------------------------------
def test_reward_refuses_budgets_that_make_it_non_finite():
    from knoblib.reward import compute_reward, original_reward

    correct, latency = torch.tensor([True]), torch.tensor([20.0])
    with pytest.raises(ValueError, match="budget_ms"):
        compute_reward(correct, latency, torch.tensor([1e-45]))
    with pytest.raises(ValueError, match="budget_ms"):
        original_reward(correct, latency, torch.tensor([1e-45]), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="not finite"):
        compute_reward(correct, torch.tensor([3e38]), torch.tensor([1e-3]))
    reward, _ = compute_reward(correct, latency, torch.tensor([1e-3]))  # tiny but finite: a finite penalty
    assert math.isfinite(float(reward))


# --- 7. loading names the file and the problem -------------------------------------------------
@pytest.fixture
def saved_vlm(tiny_vlm, tmp_path):
    folder = tmp_path / "vlm"
    tiny_vlm.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_weights_file_is_named(saved_vlm, damage):
    weights = saved_vlm / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a safetensors file at all")
    with pytest.raises(ValueError, match="model.safetensors is truncated or corrupt") as err:
        KnobVLM.from_pretrained(saved_vlm)
    assert str(weights) in str(err.value)


def test_a_missing_tokenizer_is_named(saved_vlm):
    (saved_vlm / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        KnobVLM.from_pretrained(saved_vlm)


def test_a_controller_whose_config_and_weights_disagree_is_named(tmp_path):
    from knoblib.controller import TwoStageController

    folder = tmp_path / "controller"
    shutil.copytree(data_path("controller_A"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_dim": 32}))
    with pytest.raises(ValueError, match="config.json and model.safetensors disagree") as err:
        TwoStageController.from_pretrained(folder)
    assert str(folder) in str(err.value) and "stage1.trunk.0.weight" in str(err.value)
    (folder / "config.json").write_text(json.dumps(config))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        TwoStageController.from_pretrained(folder)


@pytest.fixture(scope="module")
def shipped_checkpoint(tmp_path_factory):
    """A step-0 checkpoint of the shipped model's Mode-B trainer, as ``train`` writes it: run folder."""
    from knoblib.grpo import GRPOConfig
    from knoblib.training import load_assets, make_trainer

    run = tmp_path_factory.mktemp("ckpt") / "R"
    vlm, table = load_assets()
    make_trainer(vlm, table, GRPOConfig(mode="B"), train_size=16).save_checkpoint(run / "last")
    return run


@pytest.mark.parametrize("damaged", ["trainer_state.pt", "model.safetensors"])
def test_resume_from_a_truncated_checkpoint_names_the_file(shipped_checkpoint, tmp_path, damaged):
    run = tmp_path / "R"
    shutil.copytree(shipped_checkpoint, run)
    target = run / "last" / damaged
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated") as err:
        main(["train", "--resume", "--steps", "2", "--out", str(run)])
    assert str(target) in str(err.value)


# --- 3. a larger budget never makes the controller worse ------------------------------------------
def saturation_setup(tiny_vlm):
    from knoblib.controller import ControllerConfig, TwoStageController
    from knoblib.latency import LatencyTable

    space = tiny_vlm.knob_space
    latency = {k: 20.0 + 3.0 * k.num_active_blocks + {"low": 0, "medium": 6, "high": 12}[k.tier] + k.top_k for k in space}
    table = LatencyTable(latency_ms=latency, knob_space=space.as_dict())
    controller = TwoStageController(ControllerConfig.for_vlm(tiny_vlm, (0.6, 1.1), mode="B", seed=1)).eval()
    with torch.no_grad():  # a policy that would pick something else far outside its range, if it were asked
        for p in controller.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return table, controller


@pytest.mark.filterwarnings("ignore::knoblib.features.BudgetOutOfRangeWarning")
def test_budgets_past_the_trained_range_never_buy_a_cheaper_configuration(tiny_vlm, samples):
    from knoblib.evaluate import ControllerPolicy

    table, controller = saturation_setup(tiny_vlm)
    policy = ControllerPolicy(controller, tiny_vlm, table=table)
    top = 1.1 * table.reference_ms  # the edge of the range the controller was trained on
    for s in samples:
        latencies = [table.latency(policy.decider.knobs(*policy.decide(s.question, f * top))) for f in (1, 2, 10, 1000, 1e9)]
        assert latencies == sorted(latencies) and len(set(latencies)) == 1


def test_served_budgets_of_10x_and_1000x_give_the_configuration_of_2x(tiny_vlm, samples):
    from knoblib.serving import BudgetedVLM

    table, controller = saturation_setup(tiny_vlm)
    served = BudgetedVLM(tiny_vlm, controller, table, reserve_ms=0.0, monitor=False)
    for s in samples[:4]:
        knobs = [served.answer([s.image()], [s.question], f * table.reference_ms)[0].knobs for f in (2, 10, 1000)]
        assert knobs[0] == knobs[1] == knobs[2]


def test_the_first_budget_outside_the_range_warns_once_naming_it(tiny_vlm):
    from knoblib.features import BudgetOutOfRangeWarning

    _, controller = saturation_setup(tiny_vlm)
    with pytest.warns(BudgetOutOfRangeWarning, match=r"outside the range \[0.600, 1.100\]") as record:
        controller.encode_budget(torch.tensor([5.0]))
        controller.encode_budget(torch.tensor([50.0]))
    assert len(record) == 1


# --- 7. every policy checks budgets the same way ------------------------------------------------------
@pytest.mark.parametrize("budget", [0.0, -5.0, float("nan"), float("inf")])
def test_every_policy_refuses_a_budget_that_is_not_a_positive_number(tiny_vlm, samples, budget):
    from knoblib.evaluate import ControllerPolicy, FullModelPolicy, LookupTablePolicy, RandomFeasiblePolicy

    table, controller = saturation_setup(tiny_vlm)
    accuracy = {k: {"all": 0.5} for k in tiny_vlm.knob_space}
    policies = [
        LookupTablePolicy(table, accuracy),
        RandomFeasiblePolicy(table),
        FullModelPolicy(tiny_vlm.knob_space),
        ControllerPolicy(controller, tiny_vlm, table=table),
    ]
    images = [samples[0].image()]
    for policy in policies:
        with pytest.raises(ValueError, match="finite and > 0"):
            policy.choose(tiny_vlm, samples[:1], images, torch.tensor([budget]))
    for policy in policies[:3]:
        with pytest.raises(ValueError, match="finite and > 0"):
            policy.choose_one(budget)


# --- 11. budgets of the wrong type, a latency table missing a configuration -----------------------------
def test_run_controller_takes_budget_lists_and_refuses_strings(tiny_vlm, samples):
    from knoblib.features import LanguageFeatureExtractor
    from knoblib.grpo import run_controller

    table, controller = saturation_setup(tiny_vlm)
    language = LanguageFeatureExtractor.from_vlm(tiny_vlm)
    images, questions = [s.image() for s in samples[:2]], [s.question for s in samples[:2]]
    run = run_controller(tiny_vlm, controller, language, images, questions, [40.0, 50.0], table, "B", 3, greedy=True)
    assert len(run.knobs) == 2
    with pytest.raises(ValueError, match="strings"):
        run_controller(tiny_vlm, controller, language, images, questions, ["40", "50"], table, "B", 3)
    with pytest.raises(ValueError, match="got 1 budgets for 2 questions"):
        run_controller(tiny_vlm, controller, language, images, questions, [40.0], table, "B", 3)


def test_a_latency_table_missing_a_configuration_is_caught_at_load(tmp_path):
    from knoblib.latency import LatencyTable

    data = json.loads(data_path("latency_table.json").read_text())
    data["rows"].pop(7)
    path = tmp_path / "latency_table.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"corrupt latency table {path}: it lacks 1 of the 54 configurations"):
        LatencyTable.load(path)
