"""tools/evaluate_tasks.py: a Hugging Face folder and our checkpoint of the same weights score the same;
the rows, the metrics and the batching behave as documented; bad input is one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from evaluation_helpers import make_hf_llama, task_lines, write_task  # noqa: E402

from megatron_mellama.evaluation.requests import build_rows, encode_pair, encode_requests, hf_encoder  # noqa: E402
from megatron_mellama.evaluation.scoring import row_loglikelihoods, score_items  # noqa: E402
from megatron_mellama.evaluation.tasks import Item  # noqa: E402
from megatron_mellama.tools.evaluate import main as evaluate  # noqa: E402
from megatron_mellama.tools.hf_to_mellama import main as hf_to_mellama  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_hf_folder_and_our_checkpoint_score_the_same(tmp_path, hf_tokenizer_dir, sentencepiece_model):
    make_hf_llama(hf_tokenizer_dir, out_dir=tmp_path / "hf")
    assert hf_to_mellama(["--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "ours"), "--no-progress"]) == 0
    tasks = ["--tasks", f"a={write_task(tmp_path / 'a.jsonl', task_lines(12, seed=1))}",
             f"b={write_task(tmp_path / 'b.jsonl', task_lines(6, seed=2))}", "--batch-size", "5", "--no-progress"]
    assert evaluate([*tasks, "--hf-dir", str(tmp_path / "hf"), "--output", str(tmp_path / "hf.json")]) == 0
    # our checkpoint with our SentencePiece tokenizer: the ids must equal the HF tokenizer's too
    assert evaluate([*tasks, "--load", str(tmp_path / "ours"), "--tokenizer-type", "Llama2Tokenizer",
                     "--tokenizer-model", sentencepiece_model, "--output", str(tmp_path / "ours.json")]) == 0
    hf = json.loads((tmp_path / "hf.json").read_text())
    ours = json.loads((tmp_path / "ours.json").read_text())
    assert hf["seq_length"] == ours["seq_length"] == 64
    for name, items in (("a", 12), ("b", 6)):
        h, o = hf["tasks"][name], ours["tasks"][name]
        assert h["items"] == o["items"] == items and len(o["predictions"]) == items
        lls_h = torch.tensor([p["loglikelihoods"] for p in h["predictions"]])
        lls_o = torch.tensor([p["loglikelihoods"] for p in o["predictions"]])
        assert lls_h.shape == (items, 4) and (lls_h - lls_o).abs().max().item() <= 1e-5
        assert [p["pred"] for p in h["predictions"]] == [p["pred"] for p in o["predictions"]]
        assert h["acc"] == o["acc"] and h["acc_norm"] == o["acc_norm"]
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file


def test_limit_and_table(tmp_path, hf_tokenizer_dir, capsys):
    make_hf_llama(hf_tokenizer_dir, out_dir=tmp_path / "hf")
    task = write_task(tmp_path / "t.jsonl", task_lines(9))
    assert evaluate(["--tasks", f"medqa={task}", "--hf-dir", str(tmp_path / "hf"), "--limit", "3",
                     "--no-progress"]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["task", "items", "acc", "acc_norm", "seconds"]
    assert row.split()[:2] == ["medqa", "3"]


@pytest.mark.slow
def test_wrapper_runs_from_a_clone(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate_tasks.py"), "--help"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 0 and "--tasks NAME=PATH" in proc.stdout, proc.stderr


def _error(argv, capsys) -> str:
    capsys.readouterr()
    assert evaluate(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("evaluate: error: ")
    return err


def test_bad_input_is_one_line(tmp_path, capsys):
    good = write_task(tmp_path / "good.jsonl", task_lines(2))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(task_lines(1)[0]) + "\n" + '{"question": "q", "choices": ["a"], "answer": 0}\n')
    # the task files are checked before the model is looked at
    assert f"{bad}:2: " in _error(["--tasks", f"x={bad}", "--hf-dir", str(tmp_path / "nope")], capsys)
    assert "no such directory" in _error(["--tasks", f"x={good}", "--hf-dir", str(tmp_path / "nope")], capsys)
    assert "expected NAME=PATH" in _error(["--tasks", good, "--hf-dir", str(tmp_path)], capsys)
    assert "--load needs --tokenizer-type" in _error(["--tasks", f"x={good}", "--load", str(tmp_path)], capsys)
    assert "--batch-size 0" in _error(["--tasks", f"x={good}", "--hf-dir", str(tmp_path), "--batch-size", "0"],
                                      capsys)
    assert "one of the arguments --hf-dir --load is required" in _error(["--tasks", f"x={good}"], capsys)
    assert evaluate(["--help"]) == 0


def test_choice_longer_than_the_window_names_its_line(tmp_path, hf_tokenizer_dir, capsys):
    make_hf_llama(hf_tokenizer_dir, out_dir=tmp_path / "hf")
    task = write_task(tmp_path / "t.jsonl", [{"question": "q?", "choices": ["a", "b"], "answer": 0},
                                             {"question": "q?", "choices": ["a", "heart blood cancer"], "answer": 0}])
    err = _error(["--tasks", f"t={task}", "--hf-dir", str(tmp_path / "hf"), "--seq-length", "2", "--no-progress"],
                 capsys)
    assert f"{task}:2: choice 1: the continuation alone is" in err and "longer than the sequence length 2" in err
    err = _error(["--tasks", f"t={task}", "--hf-dir", str(tmp_path / "hf"), "--seq-length", "65", "--no-progress"],
                 capsys)
    assert "--seq-length 65: longer than the model's 64 positions" in err


def test_rows_follow_lm_eval_layout(hf_tokenizer_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    encode = hf_encoder(tokenizer)
    # trailing spaces of the context belong to the continuation
    context_enc, continuation_enc = encode_pair(encode, "Answer: ", "yes")
    assert context_enc == encode("Answer:")
    assert context_enc + continuation_enc == encode("Answer: yes")
    item = Item(prompt="Question: does the dose matter?\nAnswer:", choices=("yes", "no"), answer=0)
    rows = build_rows([item], encode, seq_length=32)
    whole = encode(item.prompt + " yes")
    n = len(whole) - 1
    assert rows.tokens.shape == rows.labels.shape == rows.loss_mask.shape == (2, 32)
    assert rows.tokens[0, :n].tolist() == whole[:-1] and rows.labels[0, :n].tolist() == whole[1:]
    assert rows.loss_mask[0].nonzero().flatten().tolist() == list(range(n - len(continuation_of(encode, item)), n))
    assert rows.item == [0, 0] and rows.choice == [0, 1]
    # too short a window keeps the last S + 1 tokens
    short = build_rows([item], encode, seq_length=6)
    assert short.tokens[0].tolist() == whole[-7:-1] and short.labels[0].tolist() == whole[-6:]


def continuation_of(encode, item):
    return encode_pair(encode, item.prompt, item.continuations[0])[1]


def test_metrics_and_fixed_batches():
    items = [Item(prompt="q", choices=("aa", "b", "cccc"), answer=2)] * 3
    # item 0: summed, choice 0 (-2.0); per character (not per token), choice 2 (-2.4 / 4 = -0.6);
    # items 1 and 2: ties go to the first choice, per character (-1.0 each) and summed
    scores = score_items(items, [[-2.0, -3.0, -2.4], [-2.0, -1.0, -9.0], [-1.0, -1.0, -9.0]])
    assert [(s.pred, s.pred_norm) for s in scores.items] == [(0, 2), (1, 0), (0, 0)]
    assert scores.acc == 0.0 and scores.acc_norm == pytest.approx(1 / 3)

    requests = encode_requests(items, lambda text: [ord(ch) for ch in text])  # 3 items x 3 choices
    shapes = []

    def loglikelihood_fn(tokens, labels, loss_mask):
        shapes.append(tuple(tokens.shape))
        return (labels.float() * loss_mask).sum(-1)

    values = row_loglikelihoods(requests, 8, loglikelihood_fn, batch_size=4)
    assert shapes == [(4, 8)] * 3  # the last batch, one real row, is filled up to the same shape
    assert values == [float(sum(ord(ch) for ch in " " + c)) for c in items[0].choices] * 3


# -- issue 23: a broken model is an error, never a chance-level score ------------------------------------
def test_a_nan_loglikelihood_is_an_error_naming_the_row():
    from megatron_mellama.evaluation.scoring import NonFiniteLoglikelihood

    items = [Item(prompt="q", choices=("a", "b"), answer=1)] * 3
    requests = encode_requests(items, lambda text: [ord(ch) for ch in text])

    def nan_for_item_2(tokens, labels, loss_mask):
        values = (labels.float() * loss_mask).sum(-1)
        values[((labels == ord("b")) & (loss_mask > 0)).any(-1)] = float("nan")  # choice 1 of every item
        return values

    with pytest.raises(NonFiniteLoglikelihood) as info:
        row_loglikelihoods(requests, 8, nan_for_item_2, batch_size=4)
    assert info.value.choice == 1 and "nan" in info.value.where("t", "t.jsonl", 3)


def test_a_model_with_a_nan_weight_fails_instead_of_scoring_chance(tmp_path, hf_tokenizer_dir, capsys):
    model, _ = make_hf_llama(hf_tokenizer_dir, out_dir=tmp_path / "hf")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "hf")
    task = write_task(tmp_path / "t.jsonl", task_lines(8))
    out = tmp_path / "out.json"
    err = _error(["--tasks", f"medqa={task}", "--hf-dir", str(tmp_path / "hf"), "--output", str(out),
                  "--no-progress"], capsys)
    assert "task medqa: " in err and f"{task}:" in err and "log-likelihood is nan" in err, err
    assert not out.exists()


def test_the_results_file_is_strict_json(tmp_path):
    from megatron_mellama.tools.cli import UsageError
    from megatron_mellama.tools.evaluate import _write_json_atomically

    with pytest.raises(UsageError, match="not a finite number"):
        _write_json_atomically(str(tmp_path / "r.json"), {"acc": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_a_tokenizer_other_than_the_trained_one(tmp_path, sentencepiece_model, capsys):
    from evaluation_helpers import other_sentencepiece_model, train_tiny_checkpoint

    ckpt = train_tiny_checkpoint(tmp_path / "ckpt", sentencepiece_model)
    other = other_sentencepiece_model(tmp_path)
    task = write_task(tmp_path / "t.jsonl", task_lines(4))
    argv = ["--tasks", f"t={task}", "--load", ckpt, "--tokenizer-type", "Llama2Tokenizer", "--no-progress"]
    err = _error(argv + ["--tokenizer-model", other], capsys)
    assert f"--tokenizer-model {other} (sha256 " in err and f"trained with: {sentencepiece_model} (sha256 " in err
    assert evaluate(argv + ["--tokenizer-model", sentencepiece_model]) == 0
    assert evaluate(argv + ["--tokenizer-model", other, "--allow-tokenizer-mismatch"]) == 0
