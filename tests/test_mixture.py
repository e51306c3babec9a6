"""The training sample order: Megatron-LM's within an epoch, a stable prefix of any longer run, and
a blend that changes on resume with every domain continuing where it stopped."""

import collections
import os
import warnings

import numpy
import pytest
import torch
from indexed_corpus import data_config, domain_of, write_domains

from megatron_mellama.data.core_datasets import MegatronTokenizerAdapter, build_once_per_node, gpt_config
from megatron_mellama.data.datasets import build_datasets
from megatron_mellama.data.mixture import blend_indices
from megatron_mellama.data.tokenizer import build_tokenizer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

BLEND = {"bio": 15, "clin": 1, "gen": 4}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_domains(tmp_path_factory.mktemp("corpus"), num_docs=1000)


def config(corpus, tokenizer, cache, blend=BLEND, **kwargs):
    path = [t for name, w in blend.items() for t in (w, corpus[name])]
    return data_config(path, tokenizer_model=tokenizer, cache=str(cache), **kwargs)


def tokens(dataset, indices):
    return torch.stack([dataset[i]["tokens"] for i in indices])


def test_one_epoch_is_megatron_lm_order(corpus, sentencepiece_model, tmp_path):
    # 2,000 samples read less than one epoch of every domain (bio, 1,500 of them, the most)
    cfg = config(corpus, sentencepiece_model, tmp_path, train_iters=20)
    ours = build_datasets(cfg).train
    prefixes = [corpus[name] for name in BLEND]
    adapter = MegatronTokenizerAdapter.wrap(build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model))
    megatron_cfg = gpt_config(cfg, adapter, (prefixes, list(BLEND.values())))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, _, _ = build_once_per_node(BlendedMegatronDatasetBuilder(GPTDataset, [2000, 10, 10], lambda: True,
                                                                         megatron_cfg).build)
    assert min(s.epoch_length for s in ours.streams.values()) > 1600
    every = range(0, 2000, 7)
    assert torch.equal(tokens(ours, every), tokens(theirs, every))


@pytest.mark.slow
def test_a_longer_run_reads_the_same_first_samples(corpus, sentencepiece_model, tmp_path):
    short = build_datasets(config(corpus, sentencepiece_model, tmp_path, train_iters=60)).train
    long = build_datasets(config(corpus, sentencepiece_model, tmp_path, train_iters=100_000)).train
    # 6,000 samples: bio (3/4 of them) is in its second epoch
    assert max(short.locate(i)[1] for i in range(6000)) > next(iter(short.streams.values())).epoch_length
    every = range(0, 6000, 3)
    assert torch.equal(tokens(short, every), tokens(long, every))


@pytest.mark.slow
def test_each_epoch_reads_every_sample_once(corpus, sentencepiece_model, tmp_path):
    train = build_datasets(config(corpus, sentencepiece_model, tmp_path)).train
    stream = train.streams[train.keys[0]]
    n = stream.epoch_length
    for epoch in range(3):
        positions = [stream.position(epoch * n + j) for j in range(n)]
        assert sorted(positions) == list(range(n))
    assert [stream.position(n + j) for j in range(20)] != list(range(20))  # epoch 1 is another order
    assert [stream.position(n + j) for j in range(20)] != [stream.position(2 * n + j) for j in range(20)]


def stream_reads(train, begin, end):
    """{domain key: the stream samples read by global samples [begin, end), in order}."""
    reads = collections.defaultdict(list)
    for i in range(begin, end):
        key, k = train.locate(i)
        reads[key].append(k)
    return reads


@pytest.mark.slow
def test_changing_the_blend_continues_every_domain(corpus, sentencepiece_model, tmp_path):
    before = build_datasets(config(corpus, sentencepiece_model, tmp_path)).train
    position = 3000
    saved = before.state(position)
    assert sum(saved["consumed"].values()) == position

    after, lines = build_datasets(config(corpus, sentencepiece_model, tmp_path, blend={"bio": 1, "clin": 1, "gen": 2})
                                  ).train.continued(saved, position)
    assert len(lines) == 1 and "data blend changed at sample 3000" in lines[0]
    assert "bio 0.7500 -> 0.2500" in lines[0] and "clin 0.0500 -> 0.2500" in lines[0]
    first, then = stream_reads(before, 0, position), stream_reads(after, position, 10_000)
    for key in before.keys:
        read = first[key] + then[key]
        assert read == list(range(len(read))), key  # no sample repeated, none skipped
    counts = collections.Counter(domain_of(after[i]["tokens"]) for i in range(position, 10_000))
    assert abs(counts["gen"] / 3500 - 1) < 0.01 and abs(counts["clin"] / 1750 - 1) < 0.01
    assert sum(after.consumed_per_domain(10_000).values()) == 10_000

    # unchanged weights: the same order as a run that never stopped
    again, lines = build_datasets(config(corpus, sentencepiece_model, tmp_path)).train.continued(saved, position)
    assert lines == [] and [again.locate(i) for i in range(position, 4000)] == [before.locate(i) for i in
                                                                                range(position, 4000)]
    fresh = build_datasets(config(corpus, sentencepiece_model, tmp_path)).train
    assert fresh.continued(saved, position)[0]._domain is fresh._domain  # the blend is not built twice


@pytest.mark.slow
def test_a_dropped_domain_keeps_its_place(corpus, sentencepiece_model, tmp_path):
    full = build_datasets(config(corpus, sentencepiece_model, tmp_path)).train
    saved = full.state(2000)
    no_clin, _ = build_datasets(config(corpus, sentencepiece_model, tmp_path, blend={"bio": 15, "gen": 4})
                                ).train.continued(saved, 2000)
    assert all(domain_of(no_clin[i]["tokens"]) != "clin" for i in range(2000, 3000))
    saved = no_clin.state(3000)
    clin_key = next(k for k in full.keys if "clin" in k)
    assert saved["consumed"][clin_key] == full.consumed_per_domain(2000)[clin_key]
    back, _ = build_datasets(config(corpus, sentencepiece_model, tmp_path)).train.continued(saved, 3000)
    reads = stream_reads(full, 0, 2000)[clin_key] + stream_reads(back, 3000, 5000)[clin_key]
    assert reads == list(range(len(reads)))
    assert len(back.segments) == 3


def test_blend_indices_are_a_stable_prefix():
    weights = [0.75, 0.05, 0.2]
    short, long = blend_indices(weights, 1000), blend_indices(weights, 50_000)
    assert numpy.array_equal(short[0], long[0][:1000]) and numpy.array_equal(short[1], long[1][:1000])


@pytest.mark.slow
def test_one_prefix_spelt_two_ways_is_one_domain(corpus, sentencepiece_model, tmp_path, monkeypatch):
    # `gen` under two spellings beside `clin`: every domain's stream must serve its own text
    monkeypatch.chdir(os.path.dirname(corpus["gen"]))
    gen, clin = os.path.basename(corpus["gen"]), os.path.basename(corpus["clin"])
    cfg = data_config([2, gen, 2, f"./{gen}", 1, clin], tokenizer_model=sentencepiece_model, cache=str(tmp_path))
    sets = build_datasets(cfg)
    train = sets.train
    assert sorted(train.names.values()) == ["clin", "gen"]
    seen = collections.Counter()
    for i in range(0, 500, 3):
        key, _ = train.locate(i)
        name = train.names[key]
        assert domain_of(train[i]["tokens"]) == name
        seen[name] += 1
    assert seen["clin"] > 0 and abs(seen["gen"] / sum(seen.values()) - 0.8) < 0.05
    assert [domain_of(s["tokens"]) for s in (sets.valid_per_domain["clin"][i] for i in range(5))] == ["clin"] * 5
    assert any(f"'{gen}' and './{gen}' are one prefix" in line for line in sets.notes)


def test_a_dropped_domain_is_reported_by_its_name(corpus, sentencepiece_model, tmp_path):
    full = build_datasets(config(corpus, sentencepiece_model, tmp_path)).train
    no_clin, lines = build_datasets(config(corpus, sentencepiece_model, tmp_path, blend={"bio": 15, "gen": 4})
                                    ).train.continued(full.state(2000), 2000)
    assert set(no_clin.named(no_clin.consumed_per_domain(2500))) == {"bio", "clin", "gen"}
    assert "clin 0.0500 -> 0.0000" in lines[0]
