"""The default process group as a GPU run starts it: NCCL beside gloo, bound to the local GPU, with
--distributed-timeout-minutes (checked with init_process_group mocked: there is no GPU here)."""

from datetime import timedelta
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from megatron_mellama.config import ConfigError, parse_config
from megatron_mellama.parallel import mesh


def _init(monkeypatch, cuda: bool, **kwargs):
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", mock.Mock())
    with mock.patch.object(dist, "is_initialized", return_value=False), \
            mock.patch.object(dist, "init_process_group") as init:
        device = mesh.init_distributed(**kwargs)
    return device, init


def test_gpu_run_starts_nccl_beside_gloo_bound_to_its_gpu(monkeypatch):
    device, init = _init(monkeypatch, cuda=True, timeout_minutes=45)
    assert device == torch.device("cuda", 3)
    torch.cuda.set_device.assert_called_once_with(device)
    (backend,), kwargs = init.call_args
    # NCCL alone fails on the first CPU tensor or object; gloo carries those
    assert backend == "cpu:gloo,cuda:nccl"
    assert kwargs == dict(timeout=timedelta(minutes=45), device_id=device)


def test_cpu_run_starts_gloo(monkeypatch):
    device, init = _init(monkeypatch, cuda=False, timeout_minutes=7.5)
    assert device == torch.device("cpu")
    assert init.call_args.args == ("gloo",) and init.call_args.kwargs == dict(timeout=timedelta(minutes=7.5))


def test_forced_backends(monkeypatch):
    assert _init(monkeypatch, cuda=True, backend="gloo")[1].call_args.args == ("gloo",)
    assert _init(monkeypatch, cuda=True, backend="nccl")[1].call_args.args == ("cpu:gloo,cuda:nccl",)
    with pytest.raises(ConfigError, match="--distributed-backend nccl needs GPUs"):
        _init(monkeypatch, cuda=False, backend="nccl")


def test_timeout_flag_reaches_the_process_group(monkeypatch, tmp_path):
    from megatron_mellama.training import loop

    cfg = parse_config(["--model", "tiny", "--vocab-size", "128", "--seq-length", "16", "--train-iters", "1",
                        "--distributed-timeout-minutes", "90"], world_size=2)
    assert cfg.parallel.distributed_timeout_minutes == 90
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = {}

    def fake_init(backend, timeout_minutes):
        seen.update(backend=backend, timeout_minutes=timeout_minutes)
        raise RuntimeError("stop here")

    monkeypatch.setattr(loop, "init_distributed", fake_init)
    with pytest.raises(RuntimeError, match="stop here"):
        loop.train(cfg)
    assert seen == dict(backend=None, timeout_minutes=90)
    with pytest.raises(ConfigError, match="--distributed-timeout-minutes must be positive"):
        parse_config(["--model", "tiny", "--vocab-size", "128", "--seq-length", "16",
                      "--distributed-timeout-minutes", "0"])
