"""The built-in example of `megatron_mellama.pretrain` and its command line."""

import math
import subprocess
import sys

from indexed_corpus import write_domains
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


def test_example_on_the_15_1_4_blend_reports_each_domain(tmp_path, sentencepiece_model, capsys):
    prefixes = write_domains(tmp_path, num_docs=300)
    argv = ["--model", "tiny", "--tokenizer-model", sentencepiece_model, "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "1",
            "--data-path", "15", prefixes["bio"], "1", prefixes["clin"], "4", prefixes["gen"],
            "--split", "90,8,2", "--data-cache-path", str(tmp_path / "cache")]
    result = run_example(load_run_config(argv))
    out = capsys.readouterr().out
    assert set(result["validation"]) == {"bio", "clin", "gen"}
    # vocabulary from the tokenizer (400), untrained model: every loss near ln(400)
    for loss in [result["lm_loss"], *result["validation"].values()]:
        assert abs(loss - math.log(400)) < 0.5
    assert "lm loss validation/clin" in out and "vocab 400" in out


def test_missing_data_and_multi_process_are_refused_clearly(tmp_path, sentencepiece_model, capsys, monkeypatch):
    missing = str(tmp_path / "nothing_text_document")
    assert main(["--model", "tiny", "--data-path", missing, "--tokenizer-model", sentencepiece_model]) == 2
    err = capsys.readouterr().err
    assert "--data-path" in err and missing in err and err.count("\n") == 1
    assert main(["--model", "tiny"]) == 2
    assert "--mock-data" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--model", "tiny", "--mock-data"]) == 2
    assert "WORLD_SIZE=2" in capsys.readouterr().err


def test_help():
    proc = subprocess.run([sys.executable, "-m", "megatron_mellama.pretrain", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in ("--tensor-model-parallel-size", "--data-path", "--num-query-groups", "--config", "--model"):
        assert flag in proc.stdout
