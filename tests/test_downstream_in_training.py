"""--eval-tasks: multiple-choice tasks scored at every evaluation of a training run (console line,
TensorBoard scalars, JSON-lines record) as the standalone tool scores the saved weights, and a bad
task file stopping the run before any work."""

import json
import re

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megatron_mellama.pretrain import load_run_config, main
from megatron_mellama.tools.evaluate import main as evaluate
from megatron_mellama.training import loop

RUN = ["--model", "tiny", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
       "--lr", "3e-3", "--eval-iters", "1", "--eval-interval", "2", "--log-interval", "1", "--train-iters", "3",
       "--num-workers", "0"]
WORDS = ["patient", "heart", "river", "city", "music", "school", "market", "garden"]


def write_task(path, items: int) -> str:
    lines = []
    for i in range(items):
        choices = [WORDS[(i + k) % len(WORDS)] for k in range(4)]
        lines.append(json.dumps({"question": f"Which word follows the {WORDS[i % len(WORDS)]} of the day?",
                                 "choices": choices, "answer": i % 4}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.slow
def test_each_evaluation_scores_the_tasks(sentencepiece_model, tmp_path, capsys):
    task = write_task(tmp_path / "general.jsonl", 6)
    cfg = load_run_config(RUN + ["--tokenizer-model", sentencepiece_model, "--eval-tasks", f"general={task}",
                                 "--eval-tasks-limit", "5", "--log-file", str(tmp_path / "run.jsonl"),
                                 "--tensorboard-dir", str(tmp_path / "tb"), "--save", str(tmp_path / "ckpt")])
    history = loop.train(cfg)
    out = capsys.readouterr().out

    # at --eval-interval 2 and at the end (iteration 3)
    lines = re.findall(r"^downstream general acc (\d\.\d{3}) acc_norm (\d\.\d{3}) \(5 items, \d+\.\d s\)$", out, re.M)
    assert len(lines) == 2, out
    assert [h["iteration"] for h in history["downstream"]] == [2, 3]
    records = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    records = [r for r in records if "downstream" in r]
    assert [r["iteration"] for r in records] == [2, 3]
    for record, (acc, acc_norm), kept in zip(records, lines, history["downstream"]):
        got = record["downstream"]["general"]
        assert got["items"] == 5 and got["seconds"] >= 0
        # a mean over 5 items, the same in the record, on the console and in the run's history
        assert round(got["acc"] * 5, 6) == int(round(got["acc"] * 5))
        assert f"{got['acc']:.3f}" == acc and f"{got['acc_norm']:.3f}" == acc_norm
        assert got["acc"] == kept["general"]["acc"] and got["acc_norm"] == kept["general"]["acc_norm"]

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    for metric in ("acc", "acc_norm"):
        scalars = events.Scalars(f"downstream/general/{metric}")
        assert [e.step for e in scalars] == [2, 3]
        assert [round(e.value, 6) for e in scalars] == [round(r["downstream"]["general"][metric], 6) for r in records]

    # the standalone tool on the checkpoint saved after the last evaluation scores the same
    assert evaluate(["--tasks", f"general={task}", "--load", str(tmp_path / "ckpt"), "--tokenizer-type",
                     "Llama2Tokenizer", "--tokenizer-model", sentencepiece_model, "--seq-length", "32", "--limit", "5",
                     "--device", "cpu", "--no-progress", "--output", str(tmp_path / "standalone.json")]) == 0
    standalone = json.loads((tmp_path / "standalone.json").read_text())["tasks"]["general"]
    last = records[-1]["downstream"]["general"]
    assert (standalone["acc"], standalone["acc_norm"]) == (last["acc"], last["acc_norm"])


def test_a_bad_task_file_stops_the_run_before_any_work(sentencepiece_model, tmp_path, capsys):
    task = tmp_path / "broken.jsonl"
    write_task(task, 3)
    with task.open("a", encoding="utf-8") as fh:
        fh.write('{"question": "Which?", "choices": ["a", "b"], "answer": 2}\n')
    rc = main(RUN + ["--tokenizer-model", sentencepiece_model, "--eval-tasks", f"broken={task}"])
    captured = capsys.readouterr()
    assert rc == 2
    err = captured.err.strip()
    assert "\n" not in err and f"{task}:4: \"answer\" 2 is out of range" in err, err
    # stopped before the engine was built (it names its kernels) or any iteration ran
    assert "kernels:" not in captured.out and "iteration" not in captured.out
