"""compare_runs and plot_run on runs the trainer made: a run resumed from its checkpoint compares
equal to the uninterrupted run, a run with another seed fails naming the metric, the TensorBoard
folder reads back as the JSON log does, the images are whole PNGs, and bad input is one line
naming the path (and line) with exit 2."""

import json
import math

import matplotlib.image
import pytest

from megatron_mellama.pretrain import main as pretrain
from megatron_mellama.tools.compare_runs import difference, main as compare_runs
from megatron_mellama.tools.plot_run import main as plot_run, running_mean
from megatron_mellama.tools.run_logs import read_run

WORDS = ["patient", "heart", "river", "city", "music", "school", "market", "garden"]
ITERS = 4


def _task(path) -> str:
    items = [{"question": f"Which word follows the {WORDS[i]}?", "choices": [WORDS[(i + k) % 8] for k in range(4)],
              "answer": i % 4} for i in range(4)]
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sentencepiece_model):
    """Three domains, validation per domain and a downstream task at iterations 2 and 4:
    `whole` (4 iterations, JSON log and TensorBoard), `resumed` (stopped at 2 with a checkpoint,
    then resumed to 4, one JSON log), `other_seed` (the first 2 iterations with another seed)."""
    from indexed_corpus import write_domains

    root = tmp_path_factory.mktemp("runs")
    (root / "data").mkdir()
    corpus = write_domains(root / "data", num_docs=20)
    blend = [t for weight, name in zip((15, 1, 4), ("bio", "clin", "gen")) for t in (str(weight), corpus[name])]
    run = ["--model", "tiny", "--num-layers", "2", "--data-path", *blend, "--tokenizer-model", sentencepiece_model,
           "--split", "90,10,0", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
           "--lr", "3e-3", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1", "--eval-iters", "1",
           "--eval-interval", "2", "--log-interval", "1", "--num-workers", "0", "--train-iters", str(ITERS),
           "--eval-tasks", f"general={_task(root / 'task.jsonl')}"]
    paths = {name: root / name for name in ("whole", "resumed", "other_seed")}
    for path in paths.values():
        path.mkdir()
    save = str(paths["resumed"] / "ckpt")
    assert pretrain(run + ["--log-file", str(paths["whole"] / "log.jsonl"),
                           "--tensorboard-dir", str(paths["whole"] / "tb")]) == 0
    assert pretrain(run + ["--log-file", str(paths["resumed"] / "log.jsonl"), "--save", save,
                           "--exit-interval", "2"]) == 0
    assert pretrain(run + ["--log-file", str(paths["resumed"] / "log.jsonl"), "--save", save, "--load", save]) == 0
    assert pretrain(run + ["--log-file", str(paths["other_seed"] / "log.jsonl"), "--seed", "4321",
                           "--exit-interval", "2"]) == 0
    return paths


def _png_shape(path):
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[2] in (3, 4), image.shape
    return image.shape


def test_a_resumed_run_compares_equal_to_the_uninterrupted_one(runs, capsys):
    whole, resumed = runs["whole"] / "log.jsonl", runs["resumed"] / "log.jsonl"
    assert compare_runs([str(whole), str(resumed)]) == 0
    out = capsys.readouterr().out
    assert "common iterations: 4 (1-4" in out and "PASS" in out
    for metric in ("lm loss", "lm loss validation/bio", "lm loss validation/gen", "downstream/general/acc",
                   "learning-rate", "grad-norm", "consumed samples/bio"):
        assert any(line.startswith(metric + " ") and line.endswith(" ok") for line in out.splitlines()), metric
    # tokens/s and memory are the machine's: listed, not held to the tolerance
    assert any(line.startswith("tokens-per-sec ") and line.endswith("unchecked") for line in out.splitlines())
    height, width, _ = _png_shape(runs["whole"] / "compare_runs.png")
    assert width > 1000 and height > 800
    assert not list(runs["whole"].glob("*.partial"))


def test_a_run_with_another_seed_fails_and_names_the_metric(runs, capsys, tmp_path):
    whole, other = str(runs["whole"] / "log.jsonl"), str(runs["other_seed"] / "log.jsonl")
    output = tmp_path / "seeds.png"
    assert compare_runs([whole, other, "--output", str(output)]) == 1
    out = capsys.readouterr().out
    verdict = out.strip().splitlines()[-2]
    assert verdict.startswith("FAIL") and "lm loss (from iteration 1:" in verdict, out
    assert any(line.startswith("lm loss ") and line.endswith("DIFFERS") for line in out.splitlines())
    assert "common iterations: 2 (1-2" in out
    _png_shape(output)
    # the same losses within a loose tolerance: a tolerance is what CI sets for runs that may differ
    assert compare_runs([whole, other, "--metrics", "lm loss", "--rtol", "0.05", "--no-plot"]) == 0
    assert "PASS: 1 checked metric within --rtol 0.05" in capsys.readouterr().out


def test_the_tensorboard_folder_reads_back_as_the_json_log(runs, capsys):
    from_json, from_tensorboard = read_run(str(runs["whole"] / "log.jsonl")), read_run(str(runs["whole"] / "tb"))
    assert (from_json.form, from_tensorboard.form) == ("json", "tensorboard")
    assert {"lm loss", "lm loss validation/clin", "downstream/general/acc_norm", "memory"} <= set(from_json.metrics)
    # TensorBoard also holds the batch size (and the loss scale with fp16); nothing else differs
    assert set(from_tensorboard.metrics) - set(from_json.metrics) <= {"batch-size", "loss-scale"}
    for metric, values in from_json.metrics.items():
        # TensorBoard keeps float32
        assert from_tensorboard.metrics[metric] == pytest.approx(values, rel=1e-6, abs=1e-30), metric
    assert from_json.metrics["lm loss validation/bio"].keys() == {2, 4}
    assert compare_runs([str(runs["whole"] / "tb"), str(runs["resumed"] / "log.jsonl"), "--no-plot"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_plot_run_draws_one_png_beside_the_run(runs, capsys, tmp_path):
    log = runs["whole"] / "log.jsonl"
    assert plot_run([str(log)]) == 0
    assert capsys.readouterr().out.strip() == str(runs["whole"] / "log.png")
    height, width, _ = _png_shape(runs["whole"] / "log.png")
    assert width > 1000 and height > 1000  # six panels: loss, lr, grad norm, accuracy, tokens/s, memory
    assert plot_run([str(runs["whole"] / "tb"), "--output", str(tmp_path / "tb.png")]) == 0
    assert _png_shape(tmp_path / "tb.png") == (height, width, 4)
    assert not list(runs["whole"].glob("*.partial")) and not list(tmp_path.glob("*.partial"))


def _record(iteration, loss):
    return json.dumps({"iteration": iteration, "consumed_samples": 4 * iteration, "lm_loss": loss, "lr": 1e-3,
                       "grad_norm": 1.0, "mfu": None, "memory_gib": None})


def test_a_history_that_went_back_keeps_the_later_records(tmp_path):
    log = tmp_path / "log.jsonl"
    # iterations 1-5, then a rollback to 3: 3 and 4 again, 5 abandoned; a skipped step's loss is null
    log.write_text("\n".join(_record(i, loss) for i, loss in
                             [(1, 5.0), (2, 4.0), (3, 3.0), (4, 2.0), (5, 1.0), (3, 3.5), (4, None)]) + "\n")
    run = read_run(str(log))
    assert list(run.metrics["lm loss"].items())[:3] == [(1, 5.0), (2, 4.0), (3, 3.5)]
    assert math.isnan(run.metrics["lm loss"][4]) and run.iterations == [1, 2, 3, 4]
    assert "mfu" not in run.metrics and "memory" not in run.metrics  # not measured, not NaN


def test_a_long_run_is_drawn_with_its_running_mean(tmp_path, capsys):
    log = tmp_path / "long.jsonl"
    log.write_text("\n".join(_record(i, None if i == 7 else 2.0 + (i % 2)) for i in range(1, 1001)) + "\n")
    assert plot_run([str(log)]) == 0
    _png_shape(tmp_path / "long.png")
    window, means = running_mean([2.0 + (i % 2) if i != 7 else math.nan for i in range(1, 1001)])
    assert window == 5 and len(means) == 996
    assert means[0] == pytest.approx(2.6) and means[-1] == pytest.approx(2.4)
    assert means[2] == pytest.approx(2.5)  # iterations 3-7: the skipped step's NaN left out of the mean
    assert running_mean([1.0] * 500) is None


def test_differences_of_nan_and_zero():
    assert difference(math.nan, math.nan) == (0.0, 0.0)  # the same skipped step
    assert difference(1.0, math.nan) == (math.inf, math.inf)
    assert difference(0.0, 1e-9) == (1e-9, math.inf)
    assert difference(2.0, 1.0) == (1.0, 0.5)


@pytest.mark.parametrize("case", ["not json", "no iteration", "a list", "empty", "missing", "no events", "output"])
def test_bad_input_is_one_line_naming_the_path_and_exits_2(case, tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text(_record(1, 2.0) + "\n")
    bad = tmp_path / "bad.jsonl"
    args, named = [str(good), str(bad)], f"{bad}:2"
    if case == "not json":
        bad.write_text(_record(1, 2.0) + "\n" + "iteration 2 | lm loss 2.0\n")
    elif case == "no iteration":
        bad.write_text(_record(1, 2.0) + "\n" + json.dumps({"lm_loss": 2.0}) + "\n")
    elif case == "a list":
        bad.write_text(_record(1, 2.0) + "\n[1, 2]\n")
    elif case == "empty":
        bad.write_text("\n")
        named = f"{bad}: no training"
    elif case == "missing":
        named = f"{bad}: no such file"
    elif case == "no events":
        bad = tmp_path / "tb"
        bad.mkdir()
        args, named = [str(good), str(bad)], f"{bad}: a folder without TensorBoard event files"
    else:
        args, named = [str(good), str(good), "--output", str(tmp_path / "image.jpg")], "image.jpg"
    assert compare_runs(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mellama-compare-runs: error: ") and named in err, err
    if case != "output":
        assert plot_run([str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mellama-plot-run: error: ") and named in err, err
    assert not list(tmp_path.glob("*.png"))


def test_help_describes_the_commands(capsys):
    assert compare_runs(["--help"]) == 0 and "--rtol" in capsys.readouterr().out
    assert plot_run(["--help"]) == 0 and "--output" in capsys.readouterr().out
