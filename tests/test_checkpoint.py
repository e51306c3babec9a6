"""Checkpoints resume exactly, reshard across layouts, survive a crash mid-save, and fail clearly."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoint_harness import (copy_checkpoint, drop_checksums, edit_train_state, load_with, train_segment,
                                train_segment_distributed)
from engine_harness import TINY
from megatron_mellama.checkpoint.layout import CheckpointError, latest_iteration
from megatron_mellama.checkpoint.manager import CheckpointManager
from megatron_mellama.config import parse_config
from megatron_mellama.training.engine import Engine

# a warmup-then-cosine schedule over the 6 steps, so a resume must also continue the LR schedule
BASE = TINY + ["--lr-decay-style", "cosine", "--lr-warmup-iters", "2", "--train-iters", "6"]
# DCP announces every single-process call; the manager silences it, pytest's warning capture does not
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def uninterrupted():
    return train_segment(BASE, 0, 6, save=False)


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def _merged(results):
    params = {}
    for r in results:
        params.update(r["params"])
    return params


def assert_continues(losses, params, ref, rtol):
    assert all(_rel(a, b) <= rtol for a, b in zip(losses, ref["losses"][3:])), (losses, ref["losses"][3:])
    assert set(params) == set(ref["params"])
    for name, want in ref["params"].items():
        assert ((params[name] - want).norm() / want.norm()).item() <= rtol, name


@pytest.mark.slow
def test_resume_is_bitwise_identical(uninterrupted, tmp_path):
    first = train_segment(BASE + ["--save", str(tmp_path)], 0, 3, save=True)
    second = train_segment(BASE + ["--load", str(tmp_path)], 3, 6, save=False)
    assert second["state"]["consumed_samples"] == 24 and second["state"]["skipped_total"] == 0
    assert first["losses"] + second["losses"] == uninterrupted["losses"]
    assert all(torch.equal(second["params"][k], v) for k, v in uninterrupted["params"].items())
    assert latest_iteration(str(tmp_path)) == 3
    assert sorted(os.listdir(tmp_path)) == ["iter_0000003", "latest"]


def test_lr_schedule_and_rng_are_restored(tmp_path):
    cfg = parse_config(BASE + ["--save", str(tmp_path), "--load", str(tmp_path)])
    engine = Engine(cfg)
    engine.scheduler.step(3 * cfg.train.global_batch_size)
    torch.manual_seed(5)
    CheckpointManager(cfg, engine).save(3, 24)
    expected = torch.rand(3)
    fresh = Engine(cfg)
    CheckpointManager(cfg, fresh).load()
    assert fresh.scheduler.num_steps == engine.scheduler.num_steps
    assert fresh.optimizer.param_groups[0]["lr"] == engine.optimizer.param_groups[0]["lr"] > 0
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.slow
def test_tp2_checkpoint_loads_into_fsdp_and_one_process(uninterrupted, tmp_path):
    save = str(tmp_path / "ckpt")
    saved = train_segment_distributed(BASE + ["--tensor-model-parallel-size", "2", "--save", save], 2, 0, 3,
                                      True, str(tmp_path))
    assert all(_rel(a, b) <= 1e-5 for a, b in zip(saved[0]["losses"], uninterrupted["losses"][:3]))
    fsdp = train_segment_distributed(BASE + ["--data-parallel-sharding", "full", "--load", save], 2, 3, 6,
                                     False, str(tmp_path))
    assert_continues(fsdp[0]["losses"], _merged(fsdp), uninterrupted, 1e-5)
    single = train_segment(BASE + ["--load", save], 3, 6, save=False)
    assert_continues(single["losses"], single["params"], uninterrupted, 1e-5)


@pytest.mark.slow
def test_pp2_checkpoint_loads_into_one_process(uninterrupted, tmp_path):
    # two virtual stages per rank: each rank's several parts are saved as one model
    save = str(tmp_path / "ckpt")
    train_segment_distributed(BASE + ["--pipeline-model-parallel-size", "2",
                                      "--num-layers-per-virtual-pipeline-stage", "1", "--save", save],
                              2, 0, 3, True, str(tmp_path))
    single = train_segment(BASE + ["--load", save], 3, 6, save=False)
    assert_continues(single["losses"], single["params"], uninterrupted, 1e-5)


@pytest.mark.slow
def test_killed_during_save_leaves_latest_on_the_previous_checkpoint(tmp_path):
    save = str(tmp_path / "ckpt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "checkpoint_harness.py"), save], env=env)
    marker = os.path.join(save, "data-written")
    deadline = time.time() + 60
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.exists(marker), "the save never reached its data-written point"
    proc.send_signal(signal.SIGKILL)  # after iteration 2's tensors are written, before it is finalised
    proc.wait()
    assert latest_iteration(save) == 1
    assert os.path.isdir(os.path.join(save, "iter_0000002.partial"))
    assert not os.path.exists(os.path.join(save, "iter_0000002"))
    state = train_segment(TINY + ["--load", save, "--save", save], 1, 2, save=True)["state"]
    assert state["iteration"] == 1
    # the next save cleared the leftover and completed iteration 2
    assert sorted(n for n in os.listdir(save) if n.startswith("iter_")) == ["iter_0000001", "iter_0000002"]
    assert latest_iteration(save) == 2


def test_keep_last(tmp_path):
    cfg = parse_config(TINY + ["--save", str(tmp_path), "--keep-last", "2"])
    manager = CheckpointManager(cfg, Engine(cfg))
    for it in (1, 2, 3, 4):
        manager.save(it, it * 8)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000003", "iter_0000004", "latest"]
    assert latest_iteration(str(tmp_path)) == 4


@pytest.mark.slow
def test_finetune_loads_weights_only(tmp_path):
    trained = train_segment(BASE + ["--save", str(tmp_path)], 0, 3, save=True)
    cfg = parse_config(BASE + ["--load", str(tmp_path), "--finetune"])
    engine = Engine(cfg)
    state = CheckpointManager(cfg, engine).load()
    assert (state["iteration"], state["consumed_samples"]) == (0, 0)
    assert all(torch.equal(engine.full_state()[k], v) for k, v in trained["params"].items())
    assert not engine.optimizer.state and engine.scheduler.num_steps == 0


@pytest.mark.slow
def test_no_load_optim_and_no_load_rng(tmp_path):
    train_segment(BASE + ["--save", str(tmp_path)], 0, 3, save=True)
    cfg = parse_config(BASE + ["--load", str(tmp_path), "--no-load-optim", "--no-load-rng"])
    engine = Engine(cfg)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    state = CheckpointManager(cfg, engine).load()
    assert state["iteration"] == 3 and not engine.optimizer.state and engine.scheduler.num_steps == 0
    assert torch.equal(torch.rand(3), expected)


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    cfg = parse_config(TINY + ["--save", str(root)])
    CheckpointManager(cfg, Engine(cfg)).save(1, 8)
    return str(root)




def test_nothing_to_load_is_not_an_error(tmp_path):
    assert load_with([]) is None
    # Megatron-LM's first launch of --save X --load X: X empty or not there yet
    assert load_with(["--load", str(tmp_path), "--save", str(tmp_path)]) is None
    assert load_with(["--load", str(tmp_path / "new"), "--save", str(tmp_path / "new")]) is None


def test_missing_load_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"--load .*nope: no such directory"):
        load_with(["--load", str(tmp_path / "nope")])


def test_latest_naming_a_missing_iteration(saved_checkpoint, tmp_path):
    (tmp_path / "latest").write_text("7\n")
    with pytest.raises(CheckpointError, match=r"names iteration 7 but .*iter_0000007 does not exist"):
        load_with(["--load", str(tmp_path)])
    (tmp_path / "iter_0000007").mkdir()
    with pytest.raises(CheckpointError, match=r"iter_0000007: incomplete checkpoint \(missing .metadata"):
        load_with(["--load", str(tmp_path)])






def test_truncated_data_file(saved_checkpoint, tmp_path):
    root = copy_checkpoint(saved_checkpoint, tmp_path / "c")
    data = os.path.join(root, "iter_0000001", "__0_0.distcp")
    with open(data, "r+b") as fh:
        fh.truncate(os.path.getsize(data) // 2)
    with pytest.raises(CheckpointError, match=r"iter_0000001: unreadable or corrupt checkpoint"):
        load_with(["--load", root])


def test_garbage_metadata_and_train_state(saved_checkpoint, tmp_path):
    root = copy_checkpoint(saved_checkpoint, tmp_path / "c")
    meta = os.path.join(root, "iter_0000001", ".metadata")
    with open(meta, "wb") as fh:
        fh.write(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"iter_0000001: unreadable or corrupt checkpoint"):
        load_with(["--load", root])
    drop_checksums(root)  # as a checkpoint saved before checksums: the file itself is read
    with open(os.path.join(root, "iter_0000001", "train_state.json"), "w") as fh:
        fh.write("{not json")
    with pytest.raises(CheckpointError, match=r"train_state.json: unreadable train state"):
        load_with(["--load", root])


def test_model_flags_differing_from_the_checkpoint(saved_checkpoint):
    with pytest.raises(CheckpointError, match=r"--hidden-size 128 but the checkpoint has 64"):
        load_with(["--load", saved_checkpoint, "--hidden-size", "128"])


def test_tensor_shape_mismatch_names_the_tensor(saved_checkpoint, tmp_path):
    # a checkpoint whose recorded config agrees with the flags but whose tensors do not
    root = copy_checkpoint(saved_checkpoint, tmp_path / "c")
    edit_train_state(root, 1, lambda state: state["config"]["model"].update(ffn_hidden_size=64))
    with pytest.raises(CheckpointError, match=r"tensor layers\.\d\.mlp\.\w+_proj\.weight has shape \[\d+, \d+\] "
                                              r"in the checkpoint but \[64, 64\] in this model"):
        load_with(["--load", root, "--ffn-hidden-size", "64"])


@pytest.mark.slow
def test_async_save_round_trip(uninterrupted, tmp_path):
    from engine_harness import global_batches, micro_batches_of

    cfg = parse_config(BASE + ["--save", str(tmp_path), "--async-save"])
    engine, batches = Engine(cfg), global_batches(cfg, 6)
    manager = CheckpointManager(cfg, engine)
    for b in batches[:3]:
        engine.step(micro_batches_of(b, cfg, 0, 1))
    manager.save(3, 24)
    # training goes on while the checkpoint is written: what was saved is the state at the save
    for b in batches[3:]:
        engine.step(micro_batches_of(b, cfg, 0, 1))
    manager.close()
    assert latest_iteration(str(tmp_path)) == 3
    second = train_segment(BASE + ["--load", str(tmp_path)], 3, 6, save=False)
    assert second["losses"] == uninterrupted["losses"][3:]
    assert all(torch.equal(second["params"][k], v) for k, v in uninterrupted["params"].items())


@pytest.mark.slow
def test_async_save_with_two_processes(uninterrupted, tmp_path):
    save = str(tmp_path / "ckpt")
    train_segment_distributed(BASE + ["--data-parallel-sharding", "optimizer", "--async-save", "--save", save],
                              2, 0, 3, True, str(tmp_path))
    assert sorted(os.listdir(save)) == ["iter_0000003", "latest"]
    single = train_segment(BASE + ["--load", save], 3, 6, save=False)
    assert_continues(single["losses"], single["params"], uninterrupted, 1e-5)
