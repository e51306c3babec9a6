"""Per-row log-likelihoods from the parallel engine (`Engine.sequence_loglikelihoods`), the scores of
downstream evaluation during training: one process equals the standalone scorer
(`evaluation/loglikelihood.py`) on the same weights, and TP2 x PP2 with sequence parallelism and DP2
(FSDP) equal one process, before and after a training step."""

import pytest
import torch

from engine_harness import TINY, micro_batches_of, rank_engine, spawn_gloo
from megatron_mellama.evaluation.requests import build_rows
from megatron_mellama.evaluation.tasks import Item

TOL = 1e-5
LAYOUTS = {
    "tp2-pp2-sp": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                       "--sequence-parallel"]),
    "dp2-fsdp": (2, ["--data-parallel-sharding", "full"]),
}


def _encode(text: str) -> list:
    """A toy tokenizer for the tiny model's 128 ids: BOS (1), then one id per character."""
    return [1] + [2 + ord(c) % 120 for c in text]


def task_batch(cfg) -> dict:
    """One global batch of task rows: two 4-choice items, prompts short and left-truncated."""
    items = [Item(prompt="Question: ab?\nAnswer:", choices=("c", "dd", "eee", "f g"), answer=1),
             Item(prompt="a much longer prompt than the sixteen tokens of a row", choices=("x", "yy", "z", "w"),
                  answer=0)]
    rows = build_rows(items, _encode, cfg.seq_length)
    assert len(rows) == cfg.train.global_batch_size
    return dict(tokens=rows.tokens, labels=rows.labels, loss_mask=rows.loss_mask)


def test_the_fused_loss_sums_each_row():
    from megatron_mellama.kernels import IGNORE_INDEX, linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(3, 7, 16, generator=g), torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[1, :4] = IGNORE_INDEX
    want = torch.nn.functional.cross_entropy((hidden @ weight.T).transpose(1, 2), labels, reduction="none").sum(1)
    # chunks of 5 tokens straddle the rows
    got = linear_cross_entropy(hidden, weight, labels, chunk_tokens=5, per_row=True)
    assert got.shape == (3,) and torch.allclose(got, want, rtol=1e-6, atol=1e-5), (got, want)
    with pytest.raises(RuntimeError, match="no_grad"):
        linear_cross_entropy(hidden, weight.requires_grad_(), labels, per_row=True)


def _train_batch(cfg) -> dict:
    g = torch.Generator().manual_seed(3)
    data = torch.randint(0, cfg.model.vocab_size, (cfg.train.global_batch_size, cfg.seq_length + 1), generator=g)
    return dict(tokens=data[:, :-1], labels=data[:, 1:], loss_mask=torch.ones(data.shape[0], cfg.seq_length))


def before_and_after_a_step(cfg, engine, dp_rank: int, dp_size: int) -> dict:
    task = micro_batches_of(task_batch(cfg), cfg, dp_rank, dp_size)
    before = engine.sequence_loglikelihoods(task).cpu()
    engine.step(micro_batches_of(_train_batch(cfg), cfg, dp_rank, dp_size))
    after = engine.sequence_loglikelihoods(task).cpu()
    return dict(before=before, after=after)


def _layout_rank(rank, world, argv):
    cfg, engine, coords, dp_size = rank_engine(rank, world, argv)
    return before_and_after_a_step(cfg, engine, coords["dp"], dp_size)


@pytest.fixture(scope="module")
def one_process():
    from megatron_mellama.config import parse_config
    from megatron_mellama.training.engine import Engine

    cfg = parse_config(TINY)
    engine = Engine(cfg)
    initial = engine.full_state()
    return cfg, initial, before_and_after_a_step(cfg, engine, 0, 1)


def test_one_process_equals_the_standalone_scorer(one_process):
    from megatron_mellama.evaluation.loglikelihood import llama_loglikelihood_fn
    from megatron_mellama.model import build_model

    cfg, initial, got = one_process
    model = build_model(cfg.model)
    model.load_state_dict(initial, strict=False)  # the rotary tables are not parameters
    batch = task_batch(cfg)
    want = llama_loglikelihood_fn(model.eval())(batch["tokens"], batch["labels"], batch["loss_mask"])
    assert got["before"].shape == (cfg.train.global_batch_size,)
    assert (want < 0).all()
    assert torch.allclose(got["before"], want, rtol=0, atol=TOL), (got["before"] - want).abs().max()
    # the training step changed the scores: the "after" comparisons below test something
    assert (got["after"] - got["before"]).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_equals_one_process(name, one_process, tmp_path):
    _, _, want = one_process
    world, flags = LAYOUTS[name]
    results = spawn_gloo(_layout_rank, world, (TINY + flags,), str(tmp_path))
    for rank, got in enumerate(results):
        for when in ("before", "after"):
            diff = (got[when] - want[when]).abs().max().item()
            assert diff <= TOL, (name, rank, when, diff)


def test_cut_columns_score_as_whole_rows(monkeypatch):
    """Without PP and CP the in-training scorer cuts the columns past the last scored position."""
    from megatron_mellama.config import parse_config
    from megatron_mellama.evaluation import in_training
    from megatron_mellama.training.engine import Engine

    cfg = parse_config(TINY)
    engine = Engine(cfg)
    items = [Item(prompt="ab:", choices=("c", "dd", "e", "ff"), answer=0),
             Item(prompt="xyz?", choices=("u", "v w", "t", "s"), answer=1)]
    rows = build_rows(items, _encode, cfg.seq_length)
    whole = engine.sequence_loglikelihoods(micro_batches_of(
        dict(tokens=rows.tokens, labels=rows.labels, loss_mask=rows.loss_mask), cfg, 0, 1))
    widths = []
    scored = engine.sequence_loglikelihoods
    monkeypatch.setattr(engine, "sequence_loglikelihoods",
                        lambda mbs: widths.append(mbs[0]["tokens"].shape[1]) or scored(mbs))
    monkeypatch.setattr(in_training, "COLUMN_MULTIPLE", 4)
    cut = in_training.engine_loglikelihood_fn(cfg, engine, 0, 1)(rows.tokens, rows.labels, rows.loss_mask)
    assert widths == [8]  # the longest row scores up to its 8th column (BOS, 4 prompt, 3 choice tokens)
    assert (cut - whole).abs().max() <= TOL
