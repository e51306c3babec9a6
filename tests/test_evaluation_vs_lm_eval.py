"""Our multiple-choice scoring equals lm-evaluation-harness's on the same model and items.

lm-eval runs its HF model (`HFLM`) on a local task read from the same JSONL (a YAML task over
`dataset_path: json`); nothing is downloaded. Per row (item x choice) the log-likelihoods agree
to 1e-5, and per item the choices by `acc` and `acc_norm` are the same, with BOS as lm-eval adds
it by default (the tokenizer's default); without it (`add_bos_token=False`) the log-likelihoods
of lm-eval's model agree too.
"""

import os

# lm-eval reads the task's JSONL through `datasets`: nothing may reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's HF model imports it

from evaluation_helpers import make_hf_llama, task_lines, write_task  # noqa: E402

from megatron_mellama.evaluation.loglikelihood import hf_loglikelihood_fn  # noqa: E402
from megatron_mellama.evaluation.requests import hf_encoder  # noqa: E402
from megatron_mellama.evaluation.scoring import score_task  # noqa: E402
from megatron_mellama.evaluation.tasks import load_task  # noqa: E402

SEQ_LENGTH = 40  # short enough that the few-shot items are left-truncated, as lm-eval truncates them

# The prompt rule of `evaluation.tasks`, written as lm-eval's task config writes prompts.
TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{% if fewshot %}}{{{{fewshot}}}}{{% endif %}}{{% if context %}}{{{{context}}}}{{% else %}}\
Question: {{{{question}}}}\\nAnswer:{{% endif %}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def run_lm_eval(model, tokenizer, data: str, tmp_path):
    """lm-eval's per-item samples (in item order) and its task metrics."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    name = "mellama_equality_check"
    tasks_dir = tmp_path / "lm_eval_tasks"
    tasks_dir.mkdir(exist_ok=True)
    (tasks_dir / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data, cache=tmp_path / "datasets"))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=SEQ_LENGTH, batch_size=8, device="cpu")
    # only our task: indexing lm-eval's built-in tasks would cost seconds
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, log_samples=True, bootstrap_iters=0,
                                  verbosity="ERROR")
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    return samples, out["results"][name]


@pytest.mark.slow
def test_scores_equal_lm_eval(hf_tokenizer_dir, tmp_path):
    """The whole task through lm-eval's pipeline, BOS as it adds it by default (the tokenizer's)."""
    model, tokenizer = make_hf_llama(hf_tokenizer_dir)
    data = write_task(tmp_path / "items.jsonl", task_lines(20))
    items = load_task("check", data).items
    encode = hf_encoder(tokenizer)

    ours = score_task(items, encode, SEQ_LENGTH, hf_loglikelihood_fn(model), batch_size=6)
    samples, metrics = run_lm_eval(model, tokenizer, data, tmp_path)

    # the comparison covers what it claims: BOS first, some prompts longer than the model's window
    assert encode("Question:")[0] == tokenizer.bos_token_id
    full_lengths = [len(encode(item.prompt + c)) for item in items for c in item.continuations]
    assert sum(n > SEQ_LENGTH + 1 for n in full_lengths) >= 4

    assert len(samples) == len(items)
    theirs = np.array([[resp[0][0] for resp in s["resps"]] for s in samples])
    mine = np.array([s.loglikelihoods for s in ours.items])
    assert theirs.shape == mine.shape == (20, 4)
    assert np.abs(mine - theirs).max() <= 1e-5
    for item, sample, score in zip(items, samples, ours.items):
        assert sample["arguments"][0][0] == item.prompt
        assert sample["acc"] == float(score.pred == item.answer)
        assert sample["acc_norm"] == float(score.pred_norm == item.answer)
    assert ours.acc == pytest.approx(metrics["acc,none"]) and ours.acc_norm == pytest.approx(metrics["acc_norm,none"])
    # the normalisation matters on these items: some item's choice differs between acc and acc_norm
    assert any(s.pred != s.pred_norm for s in ours.items)


def test_loglikelihoods_without_bos_equal_lm_eval(hf_tokenizer_dir, tmp_path):
    """`add_bos=False` against HFLM's `add_bos_token=False`, through its loglikelihood requests."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = make_hf_llama(hf_tokenizer_dir)
    items = load_task("check", write_task(tmp_path / "items.jsonl", task_lines(20))).items
    encode = hf_encoder(tokenizer, add_bos=False)
    assert encode("Question:")[0] != tokenizer.bos_token_id

    ours = score_task(items, encode, SEQ_LENGTH, hf_loglikelihood_fn(model), batch_size=6)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=SEQ_LENGTH, batch_size=8, device="cpu",
              add_bos_token=False)
    requests = [Instance("loglikelihood", {}, (item.prompt, continuation), idx)
                for item in items for idx, continuation in enumerate(item.continuations)]
    theirs = np.array([ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]).reshape(20, 4)
    mine = np.array([s.loglikelihoods for s in ours.items])
    assert np.abs(mine - theirs).max() <= 1e-5
    # without BOS the numbers are not those with it: the flag reaches the tokens
    with_bos = score_task(items, hf_encoder(tokenizer), SEQ_LENGTH, hf_loglikelihood_fn(model), batch_size=6)
    assert np.abs(np.array([s.loglikelihoods for s in with_bos.items]) - mine).max() > 0.1
