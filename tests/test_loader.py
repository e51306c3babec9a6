"""Global batches sharded over data-parallel ranks: same samples for any DP size, exact resumption."""

import pytest
import torch

from indexed_corpus import data_config, write_domains
from megatron_mellama.data.datasets import build_datasets
from megatron_mellama.data.loader import EvalBatches, GlobalBatchSampler, TrainBatches, eval_batches, train_batches


class IndexDataset(torch.utils.data.Dataset):
    """Sample i is the sequence [i, i, i, i]: a batch shows which global indices it holds."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        t = torch.full((4,), i, dtype=torch.int64)
        return {"tokens": t, "labels": t, "loss_mask": torch.ones(4), "position_ids": t}


def indices(global_batch):
    """The sample indices of one rank's global batch (a list of micro-batches), in order."""
    return [int(i) for mb in global_batch for i in mb["tokens"][:, 0]]


def steps(dataset, dp_size, n_steps, mbs=2, gbs=16, consumed=0, **kw):
    """Per step: the index lists of every DP rank."""
    ranks = [TrainBatches(dataset, micro_batch_size=mbs, global_batch_size=gbs, dp_rank=r, dp_size=dp_size,
                          consumed_samples=consumed, **kw) for r in range(dp_size)]
    return [[indices(next(b)) for b in ranks] for _ in range(n_steps)]


def test_micro_batches_are_dicts_of_tensors():
    batch = next(TrainBatches(IndexDataset(64), micro_batch_size=2, global_batch_size=8, dp_size=2))
    assert len(batch) == 2  # 8 / (2 x 2) micro-batches
    assert set(batch[0]) == {"tokens", "labels", "loss_mask"}
    assert batch[0]["tokens"].shape == (2, 4) and batch[0]["tokens"].dtype == torch.int64
    assert batch[0]["loss_mask"].dtype == torch.float32


def test_dp_ranks_split_the_same_global_batches():
    data = IndexDataset(1000)
    dp1 = steps(data, 1, 5)
    for dp, mbs in ((2, 4), (4, 2), (8, 1)):
        per_rank = steps(data, dp, 5, mbs=mbs)
        for step, (ranks, (single,)) in enumerate(zip(per_rank, dp1)):
            assert sorted(i for r in ranks for i in r) == sorted(single)
            # rank r holds the r-th contiguous slice of the global batch
            assert [i for r in ranks for i in r] == single == list(range(16 * step, 16 * (step + 1)))


def test_restart_from_consumed_samples_continues_exactly():
    data = IndexDataset(1000)
    for dp in (1, 4):
        uninterrupted = steps(data, dp, 10)
        resumed = steps(data, dp, 6, consumed=4 * 16)
        assert resumed == uninterrupted[4:]


def test_train_batches_stop_after_the_last_whole_global_batch():
    batches = TrainBatches(IndexDataset(50), micro_batch_size=2, global_batch_size=16)
    assert len(list(batches)) == 3 and batches.consumed_samples == 48


def test_sampler_checks_its_arguments():
    with pytest.raises(ValueError, match="multiple of micro batch size"):
        GlobalBatchSampler(100, 0, micro_batch_size=3, global_batch_size=16, dp_size=2)
    with pytest.raises(ValueError, match="data-parallel rank 2"):
        GlobalBatchSampler(100, 0, micro_batch_size=2, global_batch_size=16, dp_rank=2, dp_size=2)


def test_evaluation_reads_the_same_first_batches_each_time():
    data = IndexDataset(1000)
    ev = EvalBatches(data, eval_iters=3, micro_batch_size=2, global_batch_size=16, dp_rank=1, dp_size=2)
    first, second = ([indices(b) for b in ev] for _ in range(2))
    assert first == second == [list(range(16 * s + 8, 16 * s + 16)) for s in range(3)]
    with pytest.raises(ValueError, match="--eval-iters 100"):
        EvalBatches(data, eval_iters=100, micro_batch_size=2, global_batch_size=16)


# --- on the real blended dataset ---------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_domains(tmp_path_factory.mktemp("corpus"), num_docs=300)


def train_set(corpus, tokenizer_model, seed, cache):
    cfg = data_config([15, corpus["bio"], 1, corpus["clin"], 4, corpus["gen"]], tokenizer_model=tokenizer_model,
                      seed=seed, global_batch_size=16, micro_batch_size=2, train_iters=20, split="90,8,2",
                      cache=cache)
    return cfg, build_datasets(cfg)


def tokens_per_step(cfg, dataset, dp_size, n_steps, consumed=0):
    ranks = [train_batches(cfg, dataset, consumed_samples=consumed, dp_rank=r, dp_size=dp_size)
             for r in range(dp_size)]
    return [torch.cat([mb["tokens"] for b in ranks for mb in next(b)]) for _ in range(n_steps)]


@pytest.mark.slow
def test_real_data_order_depends_on_seed_not_dp_and_resumes(corpus, sentencepiece_model, tmp_path):
    cfg, ds = train_set(corpus, sentencepiece_model, 1234, str(tmp_path))
    cfg.data.num_workers = 2  # worker processes must see the same samples
    one = tokens_per_step(cfg, ds.train, 1, 8)
    cfg.train.micro_batch_size = 1
    four = tokens_per_step(cfg, ds.train, 4, 8)
    assert all(torch.equal(a, b) for a, b in zip(one, four))
    resumed = tokens_per_step(cfg, ds.train, 4, 3, consumed=5 * 16)
    assert all(torch.equal(a, b) for a, b in zip(one[5:], resumed))

    cfg, other_seed = train_set(corpus, sentencepiece_model, 99, str(tmp_path))
    cfg.data.num_workers = 0
    other = tokens_per_step(cfg, other_seed.train, 1, 8)
    assert not torch.equal(torch.cat(one), torch.cat(other))


def test_per_domain_eval_batches(corpus, sentencepiece_model, tmp_path):
    cfg, ds = train_set(corpus, sentencepiece_model, 1234, str(tmp_path))
    for name, valid in ds.valid_per_domain.items():
        ev = eval_batches(cfg, valid, dp_rank=0, dp_size=2)
        batches = list(ev)
        assert len(batches) == cfg.train.eval_iters == 2
        assert len(batches[0]) == cfg.train.global_batch_size // (2 * cfg.train.micro_batch_size)
        assert torch.equal(torch.cat([mb["tokens"] for mb in batches[0]]),
                           torch.stack([valid[i]["tokens"] for i in range(8)]))
