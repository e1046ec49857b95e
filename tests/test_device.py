"""Device correctness of the VLM, the controller and the GRPO trainer.

* On the CPU (always runs): every tensor the library creates while it generates, scores,
  samples, trains or checkpoints is made on the module's device: a ``TorchFunctionMode``
  (no monkeypatching) records factory calls (``torch.tensor``, ``torch.ones``, ...) made
  from knoblib's model-side files without ``device=``, and ``.cpu()`` calls there.
* On CUDA (skipped unless ``torch.cuda.is_available()``): generate, partial_forward and
  loss match the CPU model, GRPO steps run in every mode through ``make_trainer(device=)``
  and checkpoints save and load (also into a CPU trainer).
"""

import copy
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import knoblib
from knoblib.controller import ControllerConfig, ModeADecider, TwoStageController
from knoblib.features import LanguageFeatureExtractor
from knoblib.grpo import GRPOConfig, JointGRPOTrainer, run_controller
from knoblib.latency import BudgetSampler
from knoblib.training import make_trainer

PACKAGE_DIR = Path(knoblib.__file__).resolve().parent
# Files whose tensors must follow the model's device.
MODEL_FILES = {"vlm.py", "controller.py", "features.py", "grpo.py", "training.py"}
# Host-side data that is CPU by design: correctness flags (metrics; the reward reaches the
# loss only through grpo_loss, which moves it) and the budgets of a validation sweep (the
# budget encoder moves them).
HOST_SITES = {("grpo.py", "rollout"), ("grpo.py", "validate")}
FACTORIES = {
    torch.tensor, torch.as_tensor, torch.ones, torch.zeros, torch.full, torch.empty, torch.arange,
    torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye,
}
MODES = ("B", "A-resumable", "A-naive")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class DeviceRecorder(TorchFunctionMode):
    """Counts tensor creations without ``device=`` (and ``.cpu()`` calls) made from MODEL_FILES."""

    def __init__(self) -> None:
        super().__init__()
        self.undeviced: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        creates = func in FACTORIES and not (func is torch.as_tensor and args and isinstance(args[0], torch.Tensor))
        if (creates and "device" not in kwargs) or func is torch.Tensor.cpu:
            frame = sys._getframe(1)
            path = Path(frame.f_code.co_filename)
            if path.parent == PACKAGE_DIR and path.name in MODEL_FILES:
                if (path.name, frame.f_code.co_name) not in HOST_SITES:
                    name = getattr(func, "__name__", str(func))
                    self.undeviced[f"{path.name}:{frame.f_lineno} ({frame.f_code.co_name}) {name}"] += 1
        return func(*args, **kwargs)


def mixed_knobs(space, n=4):
    """n configurations spread over the space: mixed tiers, p, top-k and active blocks."""
    configs = list(space)
    return [configs[i * (len(configs) - 1) // (n - 1)] for i in range(n)]


def grpo_trainer(vlm, controller_config, table, pool, mode, **overrides):
    cfg = GRPOConfig(mode=mode, steps=4, batch_size=2, val_every=0, val_size=4, seed=0, **overrides)
    return JointGRPOTrainer(vlm, TwoStageController(controller_config), table, pool[:16], pool[16:], cfg)


# --- on the CPU: tensors are created on the module's device -------------------------------
def test_tensors_are_created_on_the_module_device(tiny_vlm, samples, table, pool, tmp_path):
    vlm = copy.deepcopy(tiny_vlm)
    space = vlm.knob_space
    images, questions = [s.image() for s in samples[:4]], [s.question for s in samples[:4]]
    answers = [s.answer for s in samples[:4]]
    knobs = mixed_knobs(space)
    sampler = BudgetSampler(table)
    configs = {
        mode: ControllerConfig.for_vlm(vlm, sampler.relative_range, mode="B" if mode == "B" else "A", seed=0)
        for mode in MODES
    }
    controller_a = TwoStageController(configs["A-resumable"])
    language = LanguageFeatureExtractor.from_vlm(vlm)
    budgets = torch.tensor([60.0, 120.0, 180.0, 240.0])
    trainers = {mode: grpo_trainer(vlm, configs[mode], table, pool, mode, kl_coef=0.1) for mode in MODES}

    with DeviceRecorder() as recorder:
        vlm.generate(images, questions, knobs, 3)
        vlm.generate_skipping(images, questions, [2, 5], 3)
        stage1 = [(k.tier, k.insertion_position) for k in knobs]
        probe = controller_a.probe_embeddings(table.relative(budgets))
        vlm.partial_forward(images, questions, stage1, probe)
        position = torch.tensor([k.insertion_position - 1 for k in knobs])
        tier = torch.zeros(4, dtype=torch.long)
        decider = ModeADecider(controller_a, tier, position, generator=torch.Generator().manual_seed(1))
        vlm.generate(images, questions, None, 3, probe_embeddings=probe, decide=decider, stage1=stage1)
        decider.decisions()
        vlm.loss(images, questions, answers, knobs)
        for mode in MODES:
            controller = trainers[mode].controller
            run_controller(vlm, controller, language, images, questions, budgets, table, mode, 3,
                           generator=torch.Generator().manual_seed(0))
            run_controller(vlm, controller, language, images, questions, budgets, table, mode, 3, greedy=True)
            trainers[mode].train_step()
            trainers[mode].validate()
            trainers[mode].save_checkpoint(tmp_path / mode)
            trainers[mode].load_checkpoint(tmp_path / mode)
    assert not recorder.undeviced, (
        "tensors created without device= (they would stay on the CPU next to a CUDA model):\n"
        + "\n".join(f"  {site} x{count}" for site, count in sorted(recorder.undeviced.items()))
    )


def test_make_trainer_moves_the_vlm_and_the_controller(tiny_vlm, table):
    trainer = make_trainer(copy.deepcopy(tiny_vlm), table, GRPOConfig(val_size=4), train_size=8, device="cpu")
    assert trainer.vlm.device.type == "cpu"
    assert {p.device.type for p in trainer.controller.parameters()} == {"cpu"}


# --- on CUDA ---------------------------------------------------------------------------------
@pytest.fixture
def exact_float32():
    """CUDA results comparable with the CPU's: no TF32 in matmuls or convolutions (CLIP's patch conv)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@cuda
def test_vlm_generate_partial_forward_and_loss_on_cuda(tiny_vlm, samples, table, exact_float32, prefill_logits):
    cpu = copy.deepcopy(tiny_vlm)
    gpu = copy.deepcopy(tiny_vlm).to("cuda")
    assert gpu.device.type == "cuda"
    images, questions = [s.image() for s in samples[:4]], [s.question for s in samples[:4]]
    knobs = mixed_knobs(gpu.knob_space)
    tol = {"rtol": 1e-3, "atol": 1e-3}

    out = gpu.generate(images, questions, knobs, 3)
    ref = cpu.generate(images, questions, knobs, 3)
    assert out.sequences.device.type == "cuda" and out.sequences.shape[0] == 4
    assert out.knobs == ref.knobs
    assert out.num_prompt_tokens.tolist() == ref.num_prompt_tokens.tolist()
    # The first greedy decision.
    logits = prefill_logits(gpu, images, questions, knobs)
    assert logits.device.type == "cuda"
    torch.testing.assert_close(logits.cpu(), prefill_logits(cpu, images, questions, knobs), **tol)

    # Mode A on a CUDA controller with a CPU generator: partial forward and resumable pause.
    sampler = BudgetSampler(table)
    controller = TwoStageController(ControllerConfig.for_vlm(cpu, sampler.relative_range, mode="A")).to("cuda")
    budgets = table.relative(torch.tensor([60.0, 120.0, 180.0, 240.0]))
    probe = controller.probe_embeddings(budgets)
    assert probe.device.type == "cuda"
    stage1 = [(k.tier, k.insertion_position) for k in knobs]
    latency = gpu.partial_forward(images, questions, stage1, probe)
    assert latency.device.type == "cuda"
    torch.testing.assert_close(latency.cpu(), cpu.partial_forward(images, questions, stage1, probe.cpu()), **tol)
    position = torch.tensor([k.insertion_position - 1 for k in knobs])
    decider = ModeADecider(
        controller, torch.zeros(4, dtype=torch.long), position, generator=torch.Generator().manual_seed(1)
    )
    out = gpu.generate(images, questions, None, 3, probe_embeddings=probe, decide=decider, stage1=stage1)
    decisions = decider.decisions()
    assert decider.latency_tokens.device.type == "cuda" and not decider.latency_tokens.isnan().any()
    assert [(k.top_k, k.num_active_blocks) for k in out.knobs] == [
        (k.top_k, k.num_active_blocks) for k in decisions.to_knobs(gpu.knob_space)
    ]
    log_prob, _ = controller.evaluate_actions(
        decisions, LanguageFeatureExtractor.from_vlm(gpu)(questions), controller.encode_budget(budgets),
        latency_token=decider.latency_tokens,
    )
    assert log_prob.device.type == "cuda" and torch.isfinite(log_prob).all()

    # Teacher-forced loss: same value, gradients on the GPU (a trainer may have frozen the fixture).
    answers = [s.answer for s in samples[:4]]
    gpu.requires_grad_(True)
    loss, stats = gpu.loss(images, questions, answers, knobs)
    ref_loss, ref_stats = cpu.loss(images, questions, answers, knobs)
    assert loss.device.type == "cuda"
    assert stats["ce"] == pytest.approx(ref_stats["ce"], rel=1e-3)
    torch.testing.assert_close(loss.detach().cpu(), ref_loss.detach(), **tol)
    loss.backward()
    grads = [p.grad for p in gpu.parameters() if p.grad is not None]
    assert grads and all(g.device.type == "cuda" for g in grads)


@cuda
@pytest.mark.parametrize("mode", MODES)
def test_grpo_train_step_on_cuda(tiny_vlm, table, mode):
    cfg = GRPOConfig(mode=mode, batch_size=2, val_size=4, seed=0, kl_coef=0.1 if mode == "B" else 0.0)
    trainer = make_trainer(copy.deepcopy(tiny_vlm), table, cfg, train_size=16, device="cuda")
    assert trainer.vlm.device.type == "cuda"
    assert {p.device.type for p in trainer.controller.parameters()} == {"cuda"}
    before = [p.detach().clone() for p in trainer.controller.parameters()]
    metrics = trainer.train_step()
    for key in ("reward_mean", "accuracy", "loss", "grad_norm", "clip_fraction", "kl", "entropy_tier"):
        assert math.isfinite(metrics[key]), key
    assert metrics["full_forwards"] == 2 * cfg.group_size
    changed = any(not torch.equal(a, b) for a, b in zip(before, trainer.controller.parameters()))
    assert changed or metrics["zero_std_fraction"] == 1.0
    val = trainer.validate()
    assert all(math.isfinite(v) for v in val.values())


@cuda
def test_grpo_checkpoint_save_and_load_on_cuda(tiny_vlm, table, tmp_path):
    cfg = GRPOConfig(mode="A-resumable", batch_size=2, val_size=4, seed=0)
    trainer = make_trainer(copy.deepcopy(tiny_vlm), table, cfg, train_size=16, device="cuda")
    trainer.train_step()
    trainer.save_checkpoint(tmp_path / "ckpt")
    saved = {k: v.detach().cpu().clone() for k, v in trainer.controller.state_dict().items()}

    resumed = make_trainer(copy.deepcopy(tiny_vlm), table, cfg, train_size=16, device="cuda")
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.step_count == 1
    for k, v in resumed.controller.state_dict().items():
        assert v.device.type == "cuda", k
        assert torch.equal(v.cpu(), saved[k]), k
    for state in resumed.optimizer.state.values():
        assert state["exp_avg"].device.type == "cuda"
    assert torch.equal(resumed.generator.get_state(), trainer.generator.get_state())
    assert math.isfinite(resumed.train_step()["loss"])

    # A CUDA checkpoint also resumes on the CPU (map_location).
    on_cpu = make_trainer(copy.deepcopy(tiny_vlm), table, cfg, train_size=16)
    on_cpu.load_checkpoint(tmp_path / "ckpt")
    for k, v in on_cpu.controller.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, saved[k]), k
    assert math.isfinite(on_cpu.train_step()["loss"])
