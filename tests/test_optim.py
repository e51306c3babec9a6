"""Optimizer groups, learning-rate schedules, gradient clipping and loss scaling.

The two-process tests compare every sharded layout with the same tensors held whole by one process.
"""

import math

import pytest
import torch
import torch.distributed as dist
from engine_harness import spawn_gloo
from torch import nn

from megatron_mellama.config import Config, ConfigError, parse_config, validate
from megatron_mellama.model.llama import Llama
from megatron_mellama.training.optim import (LossScaler, LRScheduler, build_lr_scheduler, build_optimizer,
                                             clip_grad_norm_, get_grad_norm)


def _config(*flags) -> Config:
    return parse_config(["--model", "tiny", "--global-batch-size", "4", *flags])


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    params = [nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))]
    return torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=lr)


def _lrs(sched: LRScheduler, iters: int, gbs: int) -> list[float]:
    """The lr in force before each of `iters` iterations, then after the last one."""
    out = [sched.get_lr()]
    for _ in range(iters):
        out.append(sched.step(gbs))
    return out


# ---------------------------------------------------------------- optimizer


def test_param_groups_decay_matrices_not_norms():
    cfg = _config("--weight-decay", "0.1", "--lr", "2e-5", "--adam-beta2", "0.95", "--adam-eps", "1e-6")
    with torch.device("meta"):
        model = Llama(cfg.model)
    opt = build_optimizer([model], cfg)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-6 and opt.defaults["lr"] == 2e-5


def test_param_groups_skip_frozen_and_shared_parameters():
    shared = nn.Linear(3, 3, bias=True)
    parts = [nn.Sequential(shared, nn.LayerNorm(3)), nn.Sequential(shared)]
    parts[0][1].weight.requires_grad_(False)
    decay, no_decay = build_optimizer(parts, Config()).param_groups
    assert [p.shape for p in decay["params"]] == [(3, 3)]
    assert [p.shape for p in no_decay["params"]] == [(3,), (3,)]  # the Linear bias and the LayerNorm bias


# ---------------------------------------------------------------- learning-rate schedules


def test_warmup_is_linear_and_schedule_counts_samples():
    cfg = _config("--lr", "1e-3", "--lr-warmup-iters", "4", "--train-iters", "20", "--lr-decay-style", "constant")
    sched = build_lr_scheduler(_optimizer(), cfg)
    assert sched.warmup_steps == 16 and sched.decay_steps == 80  # iterations x global batch size 4
    lrs = _lrs(sched, 6, 4)
    assert lrs[:5] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[5:] == pytest.approx([1e-3, 1e-3])
    assert all(g["lr"] == sched.get_lr() for g in sched.optimizer.param_groups)


def test_cosine_reaches_min_lr_at_decay_end():
    cfg = _config("--lr", "1.0", "--min-lr", "0.1", "--lr-warmup-iters", "2", "--train-iters", "12")
    sched = LRScheduler.from_config(_optimizer(), cfg)
    lrs = _lrs(sched, 14, 4)
    for it in range(2, 13):
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (it - 2) / 10))
        assert lrs[it] == pytest.approx(expected)
    assert lrs[7] == pytest.approx(0.55)  # half way: the midpoint of max and min
    assert lrs[12] == pytest.approx(0.1) and lrs[13:] == pytest.approx([0.1, 0.1])


def test_linear_decay_and_explicit_decay_iters():
    cfg = _config("--lr", "1.0", "--min-lr", "0.0", "--lr-decay-style", "linear", "--lr-decay-iters", "10",
                  "--train-iters", "20")
    lrs = _lrs(LRScheduler.from_config(_optimizer(), cfg), 12, 4)
    assert lrs[:11] == pytest.approx([1 - i / 10 for i in range(11)])
    assert lrs[11:] == pytest.approx([0.0, 0.0])


def test_constant_without_warmup():
    lrs = _lrs(LRScheduler.from_config(_optimizer(), _config("--lr", "3e-4", "--lr-decay-style", "constant",
                                                                "--train-iters", "5")), 8, 4)
    assert lrs == pytest.approx([3e-4] * 9)
    # Only a constant lr without warmup can do without the length of the run.
    assert build_lr_scheduler(_optimizer(), _config("--lr-decay-style", "constant")).step(4) == 3e-4
    with pytest.raises(ValueError, match="--train-iters"):
        build_lr_scheduler(_optimizer(), _config("--lr-decay-style", "cosine"))


@pytest.mark.parametrize("style, shape", [
    ("exponential", lambda r: 2 * 0.5 ** r - 1),  # Megatron-LM's default --lr-wsd-decay-style
    ("linear", lambda r: 1 - r),
    ("cosine", lambda r: 0.5 * (1 + math.cos(math.pi * r))),
    ("minus_sqrt", lambda r: 1 - math.sqrt(r)),
])
def test_wsd_stable_then_decays_to_min_lr(style, shape):
    gbs = 4
    sched = LRScheduler(_optimizer(), max_lr=1.0, min_lr=0.1, warmup_steps=2 * gbs, decay_steps=20 * gbs,
                        decay_style="WSD", wsd_decay_steps=5 * gbs, wsd_decay_style=style)
    lrs = _lrs(sched, 22, gbs)
    assert lrs[1] == pytest.approx(0.5)
    assert lrs[2:16] == pytest.approx([1.0] * 14)  # stable until the last 5 iterations of the span
    for it in range(16, 21):
        assert lrs[it] == pytest.approx(0.1 + 0.9 * shape((it - 15) / 5))
    assert lrs[20:] == pytest.approx([0.1] * 3)


def test_wsd_from_flags_uses_exponential_and_needs_its_length():
    cfg = _config("--lr", "1.0", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "4", "--train-iters", "10")
    sched = LRScheduler.from_config(_optimizer(), cfg)
    assert (sched.wsd_decay_style, sched.wsd_decay_steps) == ("exponential", 16)
    lrs = _lrs(sched, 10, 4)
    assert lrs[6] == 1.0 and lrs[8] == pytest.approx(2 * 0.5 ** 0.5 - 1) and lrs[10] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="--lr-wsd-decay-iters"):
        LRScheduler.from_config(_optimizer(), _config("--lr-decay-style", "WSD", "--train-iters", "10"))


def test_inverse_square_root():
    cfg = _config("--lr", "1.0", "--min-lr", "0.2", "--lr-decay-style", "inverse-square-root",
                  "--lr-warmup-iters", "4", "--train-iters", "100", "--global-batch-size", "1")
    lrs = _lrs(LRScheduler.from_config(_optimizer(), cfg), 101, 1)
    assert lrs[2] == pytest.approx(0.5) and lrs[4] == pytest.approx(1.0)
    assert lrs[16] == pytest.approx(0.5) and lrs[64] == pytest.approx(0.25) and lrs[81] == pytest.approx(2 / 9)
    assert lrs[100] == pytest.approx(0.2) and lrs[101] == 0.2  # min_lr past the decay span


def test_me_llama_recipe():
    # Me-LLaMA: peak 8e-6, cosine to 0, 5% warmup of the decay span.
    cfg = _config("--lr", "8e-6", "--lr-warmup-fraction", "0.05", "--train-iters", "1000",
                  "--global-batch-size", "128")
    sched = LRScheduler.from_config(_optimizer(), cfg)
    assert sched.warmup_steps == pytest.approx(50 * 128)
    lrs = _lrs(sched, 1000, 128)
    assert lrs[0] == 0.0 and lrs[25] == pytest.approx(4e-6) and lrs[50] == pytest.approx(8e-6)
    assert lrs[525] == pytest.approx(4e-6)  # half way through the decay
    assert lrs[288] == pytest.approx(4e-6 * (1 + math.cos(math.pi * 238 / 950)))
    assert lrs[1000] == pytest.approx(0.0, abs=1e-20)


def test_sample_based_schedule():
    cfg = parse_config(["--model", "tiny", "--global-batch-size", "8", "--train-samples", "800",
                        "--lr", "1.0", "--lr-warmup-samples", "80", "--lr-decay-style", "linear"])
    sched = LRScheduler.from_config(_optimizer(), cfg)
    assert (sched.warmup_steps, sched.decay_steps) == (80, 800)
    lrs = _lrs(sched, 100, 8)
    assert lrs[5] == pytest.approx(0.5) and lrs[10] == 1.0 and lrs[55] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="samples"):
        LRScheduler.from_config(_optimizer(), parse_config(
            ["--model", "tiny", "--train-samples", "800", "--lr-warmup-iters", "3"]))


def test_scheduler_state_dict_round_trip():
    cfg = _config("--lr", "1e-3", "--lr-warmup-fraction", "0.1", "--train-iters", "50")
    sched = LRScheduler.from_config(_optimizer(), cfg)
    _lrs(sched, 17, 4)
    state = sched.state_dict()
    resumed = LRScheduler.from_config(_optimizer(), cfg)
    resumed.load_state_dict(state)
    assert resumed.num_steps == 68 and resumed.get_lr() == sched.get_lr()
    assert resumed.optimizer.param_groups[0]["lr"] == sched.get_lr()
    assert _lrs(resumed, 5, 4) == _lrs(sched, 5, 4)

    changed = LRScheduler.from_config(_optimizer(), _config("--lr", "2e-3", "--lr-warmup-fraction", "0.1",
                                                            "--train-iters", "50"))
    with pytest.raises(ValueError, match="max_lr"):
        changed.load_state_dict(state)
    changed.load_state_dict(state, override=True)
    assert changed.num_steps == 68 and changed.max_lr == 2e-3


def test_extending_a_run_and_the_schedule_flags():
    cfg = _config("--lr", "1e-3", "--lr-warmup-iters", "2", "--train-iters", "10")
    sched = LRScheduler.from_config(_optimizer(), cfg)
    _lrs(sched, 10, 4)
    state = sched.state_dict()
    longer = _config("--lr", "1e-3", "--lr-warmup-iters", "2", "--train-iters", "100")
    with pytest.raises(ValueError, match=r"decay_steps: checkpoint 40, now 400\): --override-opt_param-scheduler "
                                         r"continues .* --use-checkpoint-opt_param-scheduler with the checkpoint's"):
        LRScheduler.from_config(_optimizer(), longer).load_state_dict(state)
    # override: the new, longer cosine from the checkpoint's position (40 of 400 samples)
    new = LRScheduler.from_config(_optimizer(), longer)
    new.load_state_dict(state, override=True)
    fresh = LRScheduler.from_config(_optimizer(), longer)
    fresh.step(40)
    assert new.get_lr() == fresh.get_lr() and 0 < new.get_lr() < 1e-3
    # use the checkpoint's: the old schedule, already decayed to --min-lr
    old = LRScheduler.from_config(_optimizer(), longer)
    old.load_state_dict(state, use_checkpoint=True)
    assert old.decay_steps == 40 and old.get_lr() == sched.get_lr() == 0.0
    with pytest.raises(ValueError, match="exclude each other"):
        old.load_state_dict(state, override=True, use_checkpoint=True)
    with pytest.raises(ConfigError, match="exclude each other"):
        validate(parse_config(["--model", "tiny", "--train-iters", "10", "--override-opt_param-scheduler",
                               "--use-checkpoint-opt_param-scheduler"]))

    # a constant rate has no decay span: a longer run resumes without either flag
    const = LRScheduler.from_config(_optimizer(), _config("--lr-decay-style", "constant", "--train-iters", "10"))
    _lrs(const, 10, 4)
    extended = LRScheduler.from_config(_optimizer(), _config("--lr-decay-style", "constant", "--train-iters", "100"))
    extended.load_state_dict(const.state_dict())
    assert extended.num_steps == 40


# ---------------------------------------------------------------- loss scaler


def test_dynamic_loss_scaler_grows_backs_off_with_hysteresis_and_floors():
    s = LossScaler.from_config(_config("--fp16"))
    assert s.loss_scale == 2.0 ** 32 and (s.growth_interval, s.hysteresis, s.min_scale) == (1000, 2, 1.0)
    s = LossScaler(2.0 ** 4, growth_interval=3, hysteresis=2, min_scale=4.0)
    for _ in range(3):
        s.update(False)
    assert s.loss_scale == 32.0
    s.update(True)
    assert s.loss_scale == 32.0  # the first overflow only uses up hysteresis
    s.update(True)
    assert s.loss_scale == 16.0
    s.update(False)
    s.update(True)  # hysteresis is refilled only by growth, so this backs off at once
    assert s.loss_scale == 8.0 and s.growth_tracker == 0
    for _ in range(5):
        s.update(True)
    assert s.loss_scale == 4.0  # never below min_scale


def test_loss_scaler_scale_unscale_and_static_and_disabled():
    s = LossScaler(1024.0)
    assert s.scale(torch.tensor(2.0)).item() == 2048.0
    grads = [torch.full((3,), 2048.0), torch.full((2, 2), 1024.0)]
    assert s.unscale_(grads) is False and grads[0].tolist() == [2.0] * 3 and grads[1].sum().item() == 4.0
    assert s.unscale_([torch.tensor([1.0, float("inf")])]) is True
    # Parameters stand for their gradients; the weights themselves are never touched.
    p, frozen = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2), requires_grad=False)
    p.grad = torch.full((2,), 4096.0)
    assert s.unscale_([p, frozen]) is False
    assert p.tolist() == [1.0, 1.0] and p.grad.tolist() == [4.0, 4.0] and frozen.tolist() == [1.0, 1.0]

    static = LossScaler.from_config(_config("--fp16", "--loss-scale", "128"))
    static.update(True)
    static.update(True)
    assert static.loss_scale == 128.0 and not static.dynamic

    for flags in ((), ("--bf16",)):
        off = LossScaler.from_config(_config(*flags))
        loss = torch.tensor(3.0)
        assert off.loss_scale == 1.0 and off.scale(loss) is loss
        g = torch.tensor([float("nan")])
        assert off.unscale_([g]) is False and torch.isnan(g).all()
        off.update(True)
        assert off.loss_scale == 1.0


def test_loss_scaler_state_dict_round_trip():
    s = LossScaler(2.0 ** 10, growth_interval=4)
    for found in (False, False, True, False):
        s.update(found)
    restored = LossScaler(2.0 ** 20, growth_interval=4)
    restored.load_state_dict(s.state_dict())
    assert restored.state_dict() == s.state_dict() == {"scale": 1024.0, "growth_tracker": 1, "hysteresis_tracker": 1}
    for found in (False, False, False, True):
        s.update(found)
        restored.update(found)
        assert restored.state_dict() == s.state_dict()


# ---------------------------------------------------------------- gradient clipping, one process


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_matches_torch_on_plain_tensors(max_norm):
    torch.manual_seed(0)
    ours = [nn.Parameter(torch.randn(7, 5)), nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3, 3))]
    for p in ours:
        p.grad = torch.randn_like(p)
    ours[2].grad = None  # parameters without gradients are skipped
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    for p, q in zip(ours, ref):
        q.grad = None if p.grad is None else p.grad.clone()
    norm = clip_grad_norm_(ours, max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    torch.testing.assert_close(norm, ref_norm)
    for p, q in zip(ours[:2], ref[:2]):
        torch.testing.assert_close(p.grad, q.grad)


def test_the_norm_is_one_multi_tensor_kernel_and_equals_the_sum_of_squares(monkeypatch):
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.zeros(s)) for s in [(7, 5), (5,), (3, 3), (0,)]]
    params.append(nn.Parameter(torch.zeros(11, dtype=torch.bfloat16)))  # a second dtype: its own call
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 3).to(p.dtype)
    # the formula the norm was computed with before, one reduction per gradient
    want = torch.stack([p.grad.float().square().sum() for p in params]).sum().sqrt()
    calls = []
    foreach_norm = torch._foreach_norm

    def counting_foreach_norm(tensors, *args, **kwargs):
        calls.append(len(tensors))
        return foreach_norm(tensors, *args, **kwargs)

    squares = []
    square = torch.Tensor.square

    def counting_square(t):
        squares.append(t.numel())
        return square(t)

    monkeypatch.setattr(torch, "_foreach_norm", counting_foreach_norm)
    monkeypatch.setattr(torch.Tensor, "square", counting_square)
    norm = get_grad_norm(params)
    monkeypatch.undo()
    # one call per (device, dtype) and no element-wise square of a gradient: at most one of each
    # group's stacked norms
    assert sorted(calls) == [1, 4] and sorted(squares) in ([], [1, 4])
    torch.testing.assert_close(norm, want, rtol=1e-6, atol=0)
    # without torch._foreach_norm (a build that lacks it) the norm is the same
    monkeypatch.delattr(torch, "_foreach_norm")
    torch.testing.assert_close(get_grad_norm(params), want, rtol=1e-6, atol=0)


def test_clip_disabled_and_non_finite_norms_leave_gradients_alone():
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)
    assert clip_grad_norm_([p], 0.0).item() == pytest.approx(6.0) and p.grad.tolist() == [3.0] * 4
    p.grad[0] = float("inf")
    norm = clip_grad_norm_([p], 1.0)
    assert not torch.isfinite(norm) and p.grad[1:].tolist() == [3.0] * 3
    p.grad[0] = float("nan")
    assert torch.isnan(clip_grad_norm_([p], 1.0))


# ---------------------------------------------------------------- two processes (gloo)


def _full_tensors(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = {"w_rows": (8, 6), "w_cols": (6, 8), "w_uneven": (5, 3), "w_2d": (4, 6), "w_partial": (3, 4),
              "norm": (6,), "plain": (2, 3)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _check_sharded_clip(rank, max_norm):
    """TP/FSDP-style DTensor gradients give the norm and clipped gradients of the full tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    mesh2d = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
    layouts = {"w_rows": (mesh, [Shard(0)]), "w_cols": (mesh, [Shard(1)]), "w_uneven": (mesh, [Shard(0)]),
               "w_2d": (mesh2d, [Shard(0), Shard(1)]), "norm": (mesh, [Replicate()])}
    weights, grads = _full_tensors(1), _full_tensors(2)
    params = []
    for name, (m, placements) in layouts.items():
        p = nn.Parameter(distribute_tensor(weights[name], m, placements))
        p.grad = distribute_tensor(grads[name], m, placements)
        params.append(p)
    # A partial gradient: the full one is the sum of the ranks' pieces.
    part = grads["w_partial"] * (0.25 if rank == 0 else 0.75)
    p = nn.Parameter(distribute_tensor(weights["w_partial"], mesh, [Replicate()]))
    p.grad = DTensor.from_local(part, mesh, [Partial()])
    params.append(p)
    p = nn.Parameter(weights["plain"].clone())  # a plain replicated tensor (DDP)
    p.grad = grads["plain"].clone()
    params.append(p)

    names = list(layouts) + ["w_partial", "plain"]
    ref = [nn.Parameter(weights[n].clone()) for n in names]
    for q, n in zip(ref, names):
        q.grad = grads[n].clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    norm = clip_grad_norm_(params, max_norm)
    torch.testing.assert_close(norm, ref_norm)
    for p, q in zip(params, ref):
        full = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        torch.testing.assert_close(full, q.grad)
    return mesh


def _check_pipeline_clip(rank, max_norm):
    """Two pipeline stages with disjoint parameters: the norm is that of their union."""
    full = _full_tensors(3)
    stage = [["w_rows", "norm"], ["w_cols", "plain", "w_uneven"]]
    params = []
    for name in stage[rank]:
        p = nn.Parameter(torch.zeros_like(full[name]))
        p.grad = full[name].clone()
        params.append(p)
    ref = [nn.Parameter(torch.zeros_like(full[n])) for s in stage for n in s]
    for q, n in zip(ref, [n for s in stage for n in s]):
        q.grad = full[n].clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    norm = clip_grad_norm_(params, max_norm, pp_group=dist.group.WORLD)
    torch.testing.assert_close(norm, ref_norm)
    mine = ref[:2] if rank == 0 else ref[2:]
    for p, q in zip(params, mine):
        torch.testing.assert_close(p.grad, q.grad)
    # An overflow on one stage is seen by both, and nobody's gradients change.
    if rank == 1:
        params[0].grad[0, 0] = float("inf")
    before = [p.grad.clone() for p in params]
    assert not torch.isfinite(clip_grad_norm_(params, max_norm, pp_group=dist.group.WORLD))
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before) if torch.isfinite(b).all())
    # The loss scaler agrees on the overflow across ranks too.
    grads = [torch.ones(2)] + ([torch.tensor([float("nan")])] if rank == 1 else [])
    assert LossScaler(2.0).unscale_(grads) is True


def _check_sharded_optimizer_matches_one_process(rank, mesh):
    """AdamW over DTensor shards steps exactly like one process over the full tensors."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8, bias=False), nn.LayerNorm(8, bias=False), nn.Linear(8, 4, bias=False))

    cfg = Config()
    cfg.optim.weight_decay = 0.1
    ref, sharded = model(), model()
    placements = [[Shard(0)], [Replicate()], [Shard(1)]]
    for mod, pl in zip(sharded, placements):
        mod.weight = nn.Parameter(distribute_tensor(mod.weight.detach(), mesh, pl))
    opt_ref, opt = build_optimizer([ref], cfg), build_optimizer([sharded], cfg)
    for step in range(3):
        torch.manual_seed(10 + step)
        for p_ref, p, pl in zip(ref.parameters(), sharded.parameters(), placements):
            g = torch.randn_like(p_ref)
            p_ref.grad = g
            p.grad = distribute_tensor(g.clone(), mesh, pl)
        opt_ref.step()
        opt.step()
    for p_ref, p in zip(ref.parameters(), sharded.parameters()):
        torch.testing.assert_close(p.full_tensor(), p_ref.detach(), rtol=1e-6, atol=0)


def _two_process_checks(rank, world_size):
    for max_norm in (0.5, 1e3):
        mesh = _check_sharded_clip(rank, max_norm)
        _check_pipeline_clip(rank, max_norm)
    _check_sharded_optimizer_matches_one_process(rank, mesh)
    # A stage without gradients still joins the pipeline reduction.
    p = nn.Parameter(torch.zeros(1))
    p.grad = torch.ones(1)
    assert get_grad_norm([] if rank == 0 else [p], dist.group.WORLD).item() == 1.0


@pytest.mark.slow
def test_two_process_clip_pipeline_and_optimizer(tmp_path):
    spawn_gloo(_two_process_checks, 2, (), str(tmp_path))
