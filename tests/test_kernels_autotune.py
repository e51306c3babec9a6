"""`auto`'s timing runs in a child process: a backend that kills or hangs its process costs the run
only its timing (every operation then takes the reference), never the run itself; and only global
rank 0 times.

On a GPU the child protects the parent's CUDA context from a faulting kernel; here the child runs on
the CPU (Triton under its interpreter, tiny shapes), and this module is itself a backend ("faulty")
whose operations abort, hang or raise.
"""

import logging
import os
import resource
import time

import pytest
import torch

from megatron_mellama import kernels
from megatron_mellama.kernels import autotune, choice, dispatch, reference

SHAPES = dict(batch=1, seq=8, norm_seq=8, hidden=32, heads=2, kv_heads=1, head_dim=8, ffn=48, vocab=40,
              positions=16, eps=1e-5, dtype=torch.float32, param_dtype=torch.float32)


def swiglu(gate, up):
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file left behind
    os.abort()  # as a process whose CUDA context a kernel has poisoned would end, or worse


def rms_norm(x, weight, eps):
    time.sleep(3600)


def attention(q, k, v):
    raise RuntimeError("no kernel for these shapes")


def apply_rotary_qk(q, k, cos, sin):
    # rotates by the tables' angles alone, as Transformer Engine's RoPE does: YaRN's attention
    # factor, which the tables carry, is lost
    angles = torch.atan2(sin.float(), cos.float())[:q.shape[2]]
    return tuple((t.float() * angles.cos() + reference.rotate_half(t.float()) * angles.sin()).to(t.dtype)
                 for t in (q, k))


@pytest.fixture(autouse=True)
def _faulty_backend():
    dispatch.register_backend("faulty", __name__)
    with kernels.use_backends(kernels.selected()):
        yield
    dispatch.unregister_backend("faulty")


@pytest.mark.slow
def test_the_child_times_the_candidates_and_the_parent_logs_the_timings(caplog):
    pytest.importorskip("triton")
    candidates = {"rms_norm": ["torch", "triton"], "cross_entropy": ["torch", "triton"], "swiglu": ["torch"]}
    with caplog.at_level(logging.INFO, logger="megatron_mellama.kernels.autotune"):
        table = autotune.measure_isolated(candidates, "cpu", SHAPES, timeout_s=240)
    assert table["swiglu"] == "torch"
    for op in ("rms_norm", "cross_entropy"):
        assert table[op] in ("torch", "triton")
        assert any(r.getMessage().startswith(f"{op}: ") and "ms" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.slow
def test_a_backend_that_raises_is_skipped_and_the_others_are_still_timed(caplog):
    candidates = {"attention": ["torch", "faulty"], "rotary": ["torch", "torch"]}
    with caplog.at_level(logging.WARNING, logger="megatron_mellama.kernels.autotune"):
        table = autotune.measure_isolated(candidates, "cpu", SHAPES, timeout_s=240)
    assert table == {"attention": "torch", "rotary": "torch"}
    assert any("'faulty' failed on attention" in r.getMessage() for r in caplog.records)


def test_a_backend_that_disagrees_with_the_reference_is_not_timed(monkeypatch):
    # the check's rotary tables carry an attention factor even where the run's do not (SHAPES:
    # plain RoPE), so a rotary that keeps only the tables' angles shows
    timed = []
    monkeypatch.setattr(autotune, "time_backend", lambda op, backend, *args: timed.append(backend) or 1.0)
    result = autotune.measure({"rotary": ["torch", "faulty"]}, "cpu", SHAPES)
    assert result["table"] == {"rotary": "torch"} and timed == ["torch"]
    assert "differs from the torch reference's" in result["failures"]["rotary"]["faulty"]
    assert autotune.disagreement("rotary", "torch", "cpu", SHAPES) == 0.0


@pytest.mark.slow
def test_a_child_that_dies_leaves_the_reference_for_everything(caplog):
    candidates = {"swiglu": ["torch", "faulty"], "rms_norm": ["torch", "triton"]}
    with caplog.at_level(logging.WARNING, logger="megatron_mellama.kernels.autotune"):
        table = autotune.measure_isolated(candidates, "cpu", SHAPES, timeout_s=240)
    assert table == {"swiglu": "torch", "rms_norm": "torch"}
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "ended without an answer" in warning and "every operation uses the torch reference" in warning


@pytest.mark.slow
def test_a_child_that_hangs_is_ended_at_the_time_limit(caplog):
    candidates = {"rms_norm": ["torch", "faulty"]}
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="megatron_mellama.kernels.autotune"):
        table = autotune.measure_isolated(candidates, "cpu", SHAPES, timeout_s=10)
    assert time.monotonic() - start < 60
    assert table == {"rms_norm": "torch"}
    assert any("no answer within 10 s" in r.getMessage() for r in caplog.records)


def test_nothing_to_choose_spawns_no_child(monkeypatch):
    monkeypatch.setattr(autotune.multiprocessing, "get_context", None)  # would fail if called
    assert autotune.measure_isolated({"swiglu": ["torch"], "attention": []}, "cpu") == {
        "swiglu": "torch", "attention": "torch"}


class _FakeDist:
    """A process group of two seen from `rank`: broadcast delivers rank 0's objects."""

    def __init__(self, rank, sent):
        self.rank, self.sent = rank, sent

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self):
        return 2

    def get_rank(self):
        return self.rank

    def broadcast_object_list(self, objects, src):
        assert src == 0
        if self.rank == 0:
            self.sent.extend(objects)
        else:
            objects[:] = self.sent


def test_only_rank_zero_times_and_every_rank_takes_its_table(monkeypatch):
    timed = []
    rank0_table = {op: "triton" if op == "rms_norm" else "torch" for op in kernels.OPERATIONS}

    def fake_measure(candidates, device, shapes, timeout_s):
        timed.append(device)
        return dict(rank0_table)

    monkeypatch.setattr(choice, "measure_isolated", fake_measure)
    sent = []
    monkeypatch.setattr(choice, "dist", _FakeDist(0, sent))
    assert kernels.configure("auto", "cuda") == rank0_table
    monkeypatch.setattr(choice, "dist", _FakeDist(1, sent))
    assert kernels.configure("auto", "cuda") == rank0_table
    assert len(timed) == 1 and kernels.selected() == rank0_table


def test_auto_on_the_cpu_times_nothing(monkeypatch):
    monkeypatch.setattr(choice, "measure_isolated", None)  # would fail if called
    assert set(kernels.configure("auto", "cpu").values()) == {"torch"}
