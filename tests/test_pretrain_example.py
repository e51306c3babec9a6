"""The built-in example of `megatron_mellama.pretrain` and its command line."""

import math
import subprocess
import sys

from megatron_mellama.pretrain import load_run_config, main, run_example


def test_example_runs_forward_and_backward(capsys):
    cfg = load_run_config(["--model", "tiny", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
                           "--seq-length", "32", "--vocab-size", "1000"])
    result = run_example(cfg)
    out = capsys.readouterr().out
    assert result["num_microbatches"] == 2
    # random tokens, untrained model: the loss is near ln(vocab)
    assert abs(result["lm_loss"] - math.log(1000)) < 0.5
    assert result["grad_norm"] > 0 and math.isfinite(result["grad_norm"])
    assert "lm loss" in out and "parameters" in out


def test_example_bf16(capsys):
    assert main(["--model", "tiny", "--mock-data", "--bf16", "--seq-length", "16", "--vocab-size", "100"]) == 0
    assert "lm loss" in capsys.readouterr().out


def test_real_data_and_multi_process_are_refused_clearly(capsys, monkeypatch):
    assert main(["--model", "tiny", "--data-path", "bio", "--tokenizer-model", "x.model", "--vocab-size", "100"]) == 2
    assert "--data-path" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--model", "tiny", "--mock-data"]) == 2
    assert "WORLD_SIZE=2" in capsys.readouterr().err


def test_help():
    proc = subprocess.run([sys.executable, "-m", "megatron_mellama.pretrain", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in ("--tensor-model-parallel-size", "--data-path", "--num-query-groups", "--config", "--model"):
        assert flag in proc.stdout
