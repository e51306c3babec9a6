"""Pipeline parallelism: stage splitting, and each schedule against one process on the same model and batch."""

import pytest
import torch
import torch.nn.functional as F
from engine_harness import spawn_gloo

from megatron_mellama.config import parse_config
from megatron_mellama.config.validate import ZERO_BUBBLE_TORCH, torch_at_least
from megatron_mellama.model import Llama, build_model, materialise
from megatron_mellama.parallel.pipeline import build_schedule, run_pipeline_step, split_into_stages

SEED = 1234
N_MICROBATCHES = 4
MICRO_BATCH = 2


def _model_config(num_layers=4):
    return parse_config(["--model", "tiny", "--vocab-size", "128", "--seq-length", "16",
                         "--num-layers", str(num_layers)]).model


def _meta_model(cfg) -> Llama:
    with torch.device("meta"):
        return Llama(cfg)


# ---- splitting ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pp,layers_per_vstage,schedule,expected", [
    (2, None, "1f1b", [[0], [1]]),
    (4, None, "1f1b", [[0], [1], [2], [3]]),
    (2, 2, "interleaved-1f1b", [[0, 2], [1, 3]]),
    (4, 1, "interleaved-1f1b", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    (2, 1, "interleaved-1f1b", [[0, 2, 4, 6], [1, 3, 5, 7]]),
    (2, None, "zero-bubble", [[0], [1]]),
    (4, 1, "zero-bubble", [[0, 4], [1, 5], [2, 6], [3, 7]]),
])
def test_split_partitions_layers_and_keeps_names(pp, layers_per_vstage, schedule, expected):
    model = _meta_model(_model_config(num_layers=8))
    full_names = {name for name, _ in model.named_parameters()}
    num_stages = sum(len(s) for s in expected)
    seen_names, seen_layers = [], []
    for rank in range(pp):
        parts = split_into_stages(model, rank, pp, layers_per_vstage, schedule)
        assert [stage for stage, _ in parts] == expected[rank]
        for stage, part in parts:
            assert (part.embed_tokens is not None) == (stage == 0)
            assert (part.norm is not None) == (part.lm_head is not None) == (stage == num_stages - 1)
            layers = [int(i) for i in part.layers]
            per_stage = 8 // num_stages
            assert layers == list(range(stage * per_stage, (stage + 1) * per_stage))
            seen_layers += layers
            seen_names += [name for name, _ in part.named_parameters()]
    assert sorted(seen_layers) == list(range(8))
    assert len(seen_names) == len(set(seen_names)) and set(seen_names) == full_names
    assert len(model.layers) == 8 and model.embed_tokens is not None  # the original is untouched


@pytest.mark.parametrize("pp,layers_per_vstage,schedule", [
    (2, None, "gpipe"),
    (2, 2, "1f1b"),  # two stages per rank need an interleaved schedule
    (4, 3, "interleaved-1f1b"),  # 8 layers do not split into stages of 3
    (3, None, "1f1b"),  # 8 layers do not split into 3 stages
])
def test_split_rejects_impossible_layouts(pp, layers_per_vstage, schedule):
    with pytest.raises(ValueError):
        split_into_stages(_meta_model(_model_config(num_layers=8)), 0, pp, layers_per_vstage, schedule)


# ---- schedules against one process -------------------------------------------------------------

def _batch(cfg):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.padded_vocab_size, (N_MICROBATCHES * MICRO_BATCH, 16), generator=g)
    labels = torch.randint(0, cfg.padded_vocab_size, tokens.shape, generator=g)
    return tokens, labels


def _loss_fn(num_tokens):
    def loss_fn(summed_loss, target):
        # the last stage returns its microbatch's summed token loss; over the global token count the
        # microbatch losses add up to the mean
        return summed_loss / num_tokens
    return loss_fn


def _reference(cfg):
    # full logits and torch's cross-entropy: an independent check of the stages' fused loss
    model = build_model(cfg, seed=SEED)
    tokens, labels = _batch(cfg)
    total = 0.0
    for t, l in zip(tokens.chunk(N_MICROBATCHES), labels.chunk(N_MICROBATCHES)):
        loss = F.cross_entropy(model(t).flatten(0, 1).float(), l.flatten(), reduction="sum") / labels.numel()
        loss.backward()
        total += loss.item()
    return total, {name: p.grad for name, p in model.named_parameters()}


ALL_CASES = [
    ("1f1b", None),
    ("interleaved-1f1b", 1),  # 4 layers, 2 ranks: 2 virtual stages per rank
    ("zero-bubble", None),
    ("zero-bubble", 1),
]
# zero-bubble before torch 2.13 is refused by the configuration
CASES = [c for c in ALL_CASES if c[0] != "zero-bubble" or torch_at_least(ZERO_BUBBLE_TORCH)]


def _run_case(rank, world_size, schedule, layers_per_vstage):
    cfg = _model_config()
    parts = split_into_stages(_meta_model(cfg), rank, world_size, layers_per_vstage, schedule)
    for _, part in parts:
        materialise(part, cfg, "cpu", seed=SEED)
    tokens, labels = _batch(cfg)
    pipe = build_schedule(parts, torch.distributed.group.WORLD, "cpu", N_MICROBATCHES, schedule)
    losses = run_pipeline_step(pipe, parts, tokens, labels, _loss_fn(labels.numel()))
    grads = {name: p.grad.clone() for _, part in parts for name, p in part.named_parameters()}
    # validation through the same schedule object: forward only, gradients untouched
    eval_losses = run_pipeline_step(pipe, parts, tokens, labels, _loss_fn(labels.numel()), train=False)
    for _, part in parts:
        for name, p in part.named_parameters():
            assert torch.equal(p.grad, grads[name]), name
    return dict(losses=losses, eval_losses=eval_losses, grads=grads)


def _run_cases(rank, world_size):
    # one pair of processes runs every case: starting processes costs more than the cases
    return {case: _run_case(rank, world_size, *case) for case in CASES}


@pytest.fixture(scope="module")
def pipeline_results(tmp_path_factory):
    return spawn_gloo(_run_cases, 2, (), str(tmp_path_factory.mktemp("pipeline")))


@pytest.fixture(scope="module")
def reference():
    return _reference(_model_config())


@pytest.mark.slow
@pytest.mark.parametrize("schedule,layers_per_vstage", [
    pytest.param(*c, marks=pytest.mark.skipif(c not in CASES, reason=f"needs torch {ZERO_BUBBLE_TORCH}"))
    for c in ALL_CASES])
def test_schedule_matches_single_process(schedule, layers_per_vstage, pipeline_results, reference):
    results = [r[schedule, layers_per_vstage] for r in pipeline_results]
    ref_loss, ref_grads = reference

    # only the rank holding the last stage (rank 1 in the loop placement) sees the losses
    assert results[0]["losses"] is None and results[0]["eval_losses"] is None
    assert len(results[1]["losses"]) == N_MICROBATCHES
    assert sum(l.item() for l in results[1]["losses"]) == pytest.approx(ref_loss, rel=1e-5)
    assert sum(l.item() for l in results[1]["eval_losses"]) == pytest.approx(ref_loss, rel=1e-5)

    names = [name for r in results for name in r["grads"]]
    assert sorted(names) == sorted(ref_grads)
    for r in results:
        for name, grad in r["grads"].items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
