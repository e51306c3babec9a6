"""`megatron_mellama.pretrain`: the training run on mock and blended data, the built-in example,
and its command line."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from indexed_corpus import write_domains
from megatron_mellama.pretrain import load_run_config, main
from megatron_mellama.training.loop import train

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mock_data_training_lowers_the_loss(capsys):
    cfg = load_run_config(["--model", "tiny", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
                           "--seq-length", "32", "--vocab-size", "256", "--train-iters", "12", "--lr", "3e-3",
                           "--eval-iters", "1", "--eval-interval", "6", "--log-interval", "4"])
    history = train(cfg)
    out = capsys.readouterr().out
    assert len(history["losses"]) == 12
    # untrained on 256 tokens: the first loss is near ln(256); megatron-core's mock data is learnable
    assert abs(history["losses"][0] - math.log(256)) < 0.5
    assert history["losses"][-1] < history["losses"][0] - 0.5
    assert [v["iteration"] for v in history["validation"]] == [6, 12]
    assert re.search(r"consumed samples:\s+48 ", out) and "lm loss validation" in out


def test_blended_training_reports_each_domain(tmp_path, sentencepiece_model, capsys):
    prefixes = write_domains(tmp_path, num_docs=300)
    argv = ["--model", "tiny", "--tokenizer-model", sentencepiece_model, "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "1", "--train-iters", "2",
            "--data-path", "15", prefixes["bio"], "1", prefixes["clin"], "4", prefixes["gen"],
            "--split", "90,8,2", "--data-cache-path", str(tmp_path / "cache")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("bio", "clin", "gen"):
        assert f"lm loss validation/{name}" in out
    assert "lm loss validation:" in out  # the blended validation set as well
    assert "vocab 400" in out  # from the tokenizer


def test_missing_inputs_are_refused_clearly(tmp_path, sentencepiece_model, capsys):
    missing = str(tmp_path / "nothing_text_document")
    assert main(["--model", "tiny", "--data-path", missing, "--tokenizer-model", sentencepiece_model,
                 "--train-iters", "1"]) == 2
    err = capsys.readouterr().err
    assert "--data-path" in err and missing in err and err.count("\n") == 1
    assert main(["--model", "tiny", "--train-iters", "1"]) == 2
    assert "--mock-data" in capsys.readouterr().err
    assert main(["--model", "tiny", "--mock-data"]) == 2
    assert "--train-iters" in capsys.readouterr().err
    missing_ckpt = str(tmp_path / "no_checkpoint_here")
    assert main(["--model", "tiny", "--mock-data", "--train-iters", "1", "--load", missing_ckpt]) == 2
    err = capsys.readouterr().err
    assert missing_ckpt in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """examples/quickstart.sh, run once for the tests of both examples: (its output folder, stdout)."""
    out = tmp_path_factory.mktemp("examples") / "quickstart"
    env = dict(os.environ, NPROC="4", ITERS="20", OUT=str(out))
    proc = subprocess.run(["bash", str(REPO / "examples" / "quickstart.sh")], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
def test_quickstart_runs_the_whole_pipeline(quickstart):
    """examples/quickstart.sh: corpus, tokenizer, preprocessing, HF import, TP2 x PP2 training on the
    15:1:4 blend with a stop and a resume, per-domain evaluation, HF export and a generation."""
    root, out = quickstart
    losses = [float(m) for m in re.findall(r"^ iteration .*\| lm loss: ([0-9.E+-]+)", out, re.M)]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 1.0
    assert "TP 2 x PP 2 x DP 1" in out and "resumed from" in out and "iteration 10" in out
    for domain in ("bio", "clin", "gen"):
        assert f"lm loss validation/{domain}" in out
    assert "generation by the exported model" in out and "== summary" in out
    assert re.search(r"^downstream accuracy at iteration 20: general acc [0-9.]+ acc_norm", out, re.M)
    assert (root / "hf_final" / "config.json").is_file()
    assert (root / "checkpoints" / "latest").read_text().strip() == "20"
    # the run's curves, drawn at the end
    assert f"curves:              {root / 'metrics.png'}" in out
    assert (root / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_chat_example_instruction_tunes_the_quickstart_model(quickstart):
    """examples/quickstart_chat.sh: the quickstart's model, instruction-tuned with DP2 FSDP on questions
    about made-up patient records, answers held-out ones through transformers' chat template."""
    root, _ = quickstart
    proc = subprocess.run(["bash", str(REPO / "examples" / "quickstart_chat.sh")], capture_output=True, text=True,
                          env=dict(os.environ, OUT=str(root)), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    accuracy = {m.group(1): int(m.group(2)) for m in
                re.finditer(r"^chat accuracy (before|after) instruction tuning: (\d+)/100", out, re.M)}
    assert accuracy["before"] <= 20 and accuracy["after"] >= 90, out[-3000:]
    assert "TP 1 x PP 1 x DP 2 (full sharding)" in out
    tokenizer_config = json.loads((root / "chat" / "hf_chat" / "tokenizer_config.json").read_text())
    assert "[/INST]" in tokenizer_config["chat_template"]


@pytest.mark.slow
def test_help():
    proc = subprocess.run([sys.executable, "-m", "megatron_mellama.pretrain", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for flag in ("--tensor-model-parallel-size", "--data-path", "--num-query-groups", "--config", "--model"):
        assert flag in proc.stdout
