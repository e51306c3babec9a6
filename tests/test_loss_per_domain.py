"""--log-loss-per-domain: each domain's training loss equals a recomputation by hand (the per-row
losses of the batch scored on the same weights, rows assigned to domains by their tokens), the
domains' token-weighted mean is the logged lm loss, and TP2, PP2 and DP2 gloo layouts log what one
process logs."""

import json

import pytest
import torch

from engine_harness import loader_batches, spawn_gloo
from indexed_corpus import domain_of, write_domains
from megatron_mellama.data.datasets import build_datasets
from megatron_mellama.pretrain import load_run_config
from megatron_mellama.tools.run_logs import read_run
from megatron_mellama.training.domain_loss import DomainLosses
from megatron_mellama.training.engine import Engine
from megatron_mellama.training.loop import train

SEQ = 16


@pytest.fixture(scope="module")
def run_flags(tmp_path_factory, sentencepiece_model):
    root = tmp_path_factory.mktemp("domains")
    corpus = write_domains(root, num_docs=30)
    blend = [t for weight, name in zip((2, 1, 1), ("bio", "clin", "gen")) for t in (str(weight), corpus[name])]
    return ["--model", "tiny", "--num-layers", "2", "--data-path", *blend, "--tokenizer-model", sentencepiece_model,
            "--split", "90,10,0", "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "8",
            "--lr", "3e-3", "--lr-warmup-iters", "1", "--eval-iters", "1", "--eval-interval", "100",
            "--log-interval", "1", "--num-workers", "0", "--train-iters", "3", "--log-loss-per-domain"]


def _by_hand(cfg, micro_batches) -> dict:
    """Each domain's token-mean loss of one global batch on a fresh engine's (the run's initial) weights."""
    engine = Engine(cfg)
    rows = -engine.sequence_loglikelihoods(micro_batches)
    tokens = torch.cat([mb["tokens"] for mb in micro_batches])
    trained = torch.cat([mb["loss_mask"] for mb in micro_batches]).sum(dim=1)
    sums, counts = {}, {}
    for row_tokens, loss, count in zip(tokens, rows.tolist(), trained.tolist()):
        name = domain_of(row_tokens)
        sums[name], counts[name] = sums.get(name, 0.0) + loss, counts.get(name, 0.0) + count
    return {name: sums[name] / counts[name] for name in sums}


@pytest.mark.slow
def test_each_domains_loss_is_its_rows_loss_and_they_average_to_the_lm_loss(run_flags, tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    cfg = load_run_config(run_flags + ["--log-file", str(log)])
    train(cfg)
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(" iteration "))
    assert all(f"lm loss/{name}: " in first for name in ("bio", "clin", "gen"))
    records = [r for r in map(json.loads, log.read_text().splitlines()) if "lm_loss" in r]
    assert [r["iteration"] for r in records] == [1, 2, 3]

    want = _by_hand(cfg, loader_batches(cfg, 1, 0, 1)[0])
    got = records[0]["loss_per_domain"]
    assert set(got) == set(want) == {"bio", "clin", "gen"}
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-5), name

    before = {"bio": 0, "clin": 0, "gen": 0}
    for r in records:
        # every trained token counts (no EOD masking): a domain's tokens are SEQ per sample it had
        rows = {name: r["consumed_samples_per_domain"][name] - before[name] for name in before}
        before = r["consumed_samples_per_domain"]
        mean = sum(r["loss_per_domain"][n] * rows[n] for n in rows if rows[n]) / sum(rows.values())
        assert mean == pytest.approx(r["lm_loss"], rel=1e-5), r["iteration"]
        assert set(r["loss_per_domain"]) == {n for n in rows if rows[n]}
    # compare_runs and plot_run read them under the TensorBoard tag
    assert read_run(str(log)).metrics["lm loss/gen"][3] == records[2]["loss_per_domain"]["gen"]


LAYOUTS = {"dp2": [], "tp2-sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
           "pp2": ["--pipeline-model-parallel-size", "2"]}


def _layout_rank(rank: int, world: int, argv: list) -> dict:
    from megatron_mellama.parallel.mesh import ParallelDims

    out = {}
    for name, flags in LAYOUTS.items():
        # as a run reads its flags: the vocabulary is the tokenizer's
        cfg = load_run_config(argv + flags, world_size=world)
        dims = ParallelDims.from_config(cfg, world)
        engine, coords, dp_size = Engine(cfg, dims.build_mesh("cpu")), dims.coordinates(rank), dims.dp
        engine.domain_losses = DomainLosses.for_run(engine, build_datasets(cfg).train, coords["tp"])
        for micro_batches in loader_batches(cfg, 2, coords["dp"], dp_size):
            engine.step(micro_batches)
        out[name] = engine.domain_losses.reduce()
    return out


@pytest.mark.slow
def test_layouts_log_what_one_process_logs(run_flags, tmp_path):
    cfg = load_run_config(run_flags)
    one = Engine(cfg)
    one.domain_losses = DomainLosses.for_run(one, build_datasets(cfg).train, 0)
    for micro_batches in loader_batches(cfg, 2, 0, 1):
        one.step(micro_batches)
    want = one.domain_losses.reduce()
    assert set(want) == {"bio", "clin", "gen"}
    assert one.domain_losses.reduce() == {}  # the window starts again after each log
    ranks = spawn_gloo(_layout_rank, 2, (run_flags,), str(tmp_path))
    for name in LAYOUTS:
        for rank in ranks:
            assert set(rank[name]) == set(want), name
            for domain, loss in want.items():
                assert rank[name][domain] == pytest.approx(loss, rel=1e-4), (name, domain)
