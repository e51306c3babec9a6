"""The blended datasets: blend proportions, per-domain validation sets, splits, seeds, errors, and
index caches built once per node across processes."""

import collections
import os
from unittest import mock

import numpy
import pytest
import torch
from engine_harness import spawn_gloo
from indexed_corpus import data_config, domain_of, write_corpus, write_domains

from megatron_mellama.config import ConfigError
from megatron_mellama.data.blend import domain_names
from megatron_mellama.data.datasets import build_datasets
from megatron_mellama.data.sample_set import dataset_sizes

BLEND = {"bio": 15, "clin": 1, "gen": 4}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_domains(tmp_path_factory.mktemp("corpus"), num_docs=1000)


def blend_path(corpus):
    return [t for name, w in BLEND.items() for t in (w, corpus[name])]


@pytest.fixture(scope="module")
def blended(corpus, sentencepiece_model, tmp_path_factory):
    cfg = data_config(blend_path(corpus), tokenizer_model=sentencepiece_model,
                      cache=str(tmp_path_factory.mktemp("cache")))
    return cfg, build_datasets(cfg)


def test_sizes(blended):
    cfg, ds = blended
    # train 100 iterations x 100; valid and test: the 2 x 100 samples an evaluation reads, whatever
    # the run's length
    assert dataset_sizes(cfg) == (10_000, 200, 200)
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (10_000, 200, 200)


def test_blend_delivers_15_1_4(blended):
    _, ds = blended
    counts = collections.Counter(domain_of(ds.train[i]["tokens"]) for i in range(10_000))
    total = sum(BLEND.values())
    for name, weight in BLEND.items():
        expected = 10_000 * weight / total
        assert abs(counts[name] / expected - 1) < 0.01, (name, counts[name], expected)


def test_samples_are_shifted_sequences_without_attention_mask(blended):
    cfg, ds = blended
    for i in (0, 1, 9_999):
        s = ds.train[i]
        assert "attention_mask" not in s
        assert s["tokens"].shape == s["labels"].shape == s["loss_mask"].shape == (cfg.data.seq_length,)
        assert s["tokens"].dtype == s["labels"].dtype == torch.int64
        assert torch.equal(s["tokens"][1:], s["labels"][:-1])
        assert torch.equal(s["loss_mask"], torch.ones(cfg.data.seq_length))  # EOD is not masked


def test_per_domain_validation_sets_hold_only_their_domain(blended):
    cfg, ds = blended
    assert list(ds.valid_per_domain) == ["bio", "clin", "gen"]
    for name, valid in ds.valid_per_domain.items():
        assert len(valid) >= cfg.train.eval_iters * cfg.train.global_batch_size
        assert {domain_of(valid[i]["tokens"]) for i in range(len(valid))} == {name}
        # the same documents as this domain's share of the blended validation set
        assert valid.indices.min() == 949 and valid.indices.max() == 998
    assert {domain_of(ds.valid[i]["tokens"]) for i in range(len(ds.valid))} == set(BLEND)


@pytest.mark.slow
def test_split_proportions(corpus, sentencepiece_model, tmp_path):
    cfg = data_config([corpus["bio"]], tokenizer_model=sentencepiece_model, split="8,1,1", cache=str(tmp_path))
    ds = build_datasets(cfg)
    train, = (stream.one_epoch for stream in ds.train.streams.values())
    for split, (lo, hi) in zip((train, ds.valid, ds.test), ((0, 800), (800, 900), (900, 1000))):
        assert numpy.array_equal(numpy.sort(numpy.unique(split.indices)), numpy.arange(lo, hi))
    assert ds.valid_per_domain == {}  # one prefix: `valid` is its domain's set

    cfg = data_config(blend_path(corpus), tokenizer_model=sentencepiece_model, split="8,2", cache=str(tmp_path))
    ds = build_datasets(cfg)
    assert ds.test is None
    for component in (stream.one_epoch for stream in ds.train.streams.values()):
        assert (component.indices.min(), component.indices.max()) == (0, 799)
    for component in ds.valid.datasets:
        assert (component.indices.min(), component.indices.max()) == (800, 999)


def first_tokens(dataset, n=50):
    return torch.stack([dataset[i]["tokens"] for i in range(n)])


@pytest.mark.slow
def test_order_depends_on_the_seed(corpus, sentencepiece_model, tmp_path):
    def train(seed):
        cfg = data_config(blend_path(corpus), tokenizer_model=sentencepiece_model, seed=seed, cache=str(tmp_path))
        return first_tokens(build_datasets(cfg).train)

    again = train(1234)  # from the cache this time if `blended` ran first; identical either way
    assert torch.equal(train(1234), again)
    assert not torch.equal(train(4321), again)


def test_weight_zero_prefix_is_validated_but_not_trained(corpus, sentencepiece_model, tmp_path):
    cfg = data_config([3, corpus["bio"], 0, corpus["clin"]], tokenizer_model=sentencepiece_model,
                      cache=str(tmp_path))
    ds = build_datasets(cfg)
    assert {domain_of(ds.train[i]["tokens"]) for i in range(500)} == {"bio"}
    assert list(ds.valid_per_domain) == ["bio", "clin"]


def test_mock_data_needs_no_files():
    cfg = data_config(["unused"], seq_length=32)
    cfg.data.data_path, cfg.data.mock_data, cfg.model.vocab_size = None, True, 1000
    ds = build_datasets(cfg)
    assert len(ds.train) >= 10_000 and ds.valid_per_domain == {}
    assert ds.train[0]["tokens"].shape == (32,) and int(ds.train[0]["tokens"].max()) < 1000


def test_domain_names():
    assert domain_names(["d/bio_text_document", "d/clin_text_document", "gen"]) == ["bio", "clin", "gen"]
    assert domain_names(["/x/a/train_text_document", "/x/b/train_text_document"]) == ["a-train", "b-train"]
    assert domain_names(["bio_document", "x/bio_text_document"]) == ["bio", "x-bio"]


def test_missing_files_name_the_flag(corpus, sentencepiece_model, tmp_path):
    cfg = data_config([1, corpus["bio"], 1, str(tmp_path / "nope")], tokenizer_model=sentencepiece_model)
    with pytest.raises(ConfigError, match=r"^--data-path .*nope: .*nope\.idx does not exist") as err:
        build_datasets(cfg)
    assert "\n" not in str(err.value)

    prefix = write_corpus(str(tmp_path / "nobin"), 10, (3, 100))
    os.remove(prefix + ".bin")
    with pytest.raises(ConfigError, match=r"nobin\.bin does not exist"):
        build_datasets(data_config([prefix], tokenizer_model=sentencepiece_model))


def test_unwritable_cache_names_the_flag(corpus, sentencepiece_model, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    cfg = data_config([corpus["bio"]], tokenizer_model=sentencepiece_model, cache=str(tmp_path / "file" / "cache"))
    with pytest.raises(ConfigError, match=r"^--data-cache-path: cannot write the dataset index cache"):
        build_datasets(cfg)


def test_train_set_too_small(sentencepiece_model, tmp_path):
    prefix = write_corpus(str(tmp_path / "tiny"), 2, (3, 100), min_len=5, max_len=5)
    cfg = data_config([prefix], tokenizer_model=sentencepiece_model, split="1", seq_length=64)
    with pytest.raises(ConfigError, match=r"^--data-path .*tiny: its train split .* 12 tokens, fewer than one "
                                          r"sample of --seq-length 64 \+ 1; the train set is too small$"):
        build_datasets(cfg)
    cfg.train.train_iters = None
    with pytest.raises(ConfigError, match="--train-iters or --train-samples"):
        build_datasets(cfg)


# --- index caches across processes -------------------------------------------------------------

def _cache_worker(rank, world, prefixes, tokenizer_model, out_dir):
    results = {}
    # "one node": both ranks share a cache; "two nodes": each rank is local rank 0 with its own cache.
    for case, local_rank, cache in (("one node", rank, f"{out_dir}/shared"),
                                    ("two nodes", 0, f"{out_dir}/node{rank}")):
        os.environ["LOCAL_RANK"] = str(local_rank)
        cfg = data_config(prefixes, tokenizer_model=tokenizer_model, cache=cache)
        with mock.patch("numpy.save", side_effect=numpy.save) as save:
            ds = build_datasets(cfg)
        results[case] = dict(saves=save.call_count,
                             train=first_tokens(ds.train, 200).tolist(),
                             valid={k: first_tokens(v, 20).tolist() for k, v in ds.valid_per_domain.items()})
    return results


@pytest.mark.slow
def test_index_caches_are_built_once_per_node(corpus, sentencepiece_model, tmp_path):
    prefixes = blend_path(corpus)
    r0, r1 = spawn_gloo(_cache_worker, 2, (prefixes, sentencepiece_model, str(tmp_path)), str(tmp_path))
    for case in ("one node", "two nodes"):
        assert r0[case]["train"] == r1[case]["train"], case
        assert r0[case]["valid"] == r1[case]["valid"], case
    assert r0["one node"]["train"] == r0["two nodes"]["train"]
    assert r0["one node"]["saves"] > 0 and r1["one node"]["saves"] == 0  # local rank 1 only loads
    assert r0["two nodes"]["saves"] > 0 and r1["two nodes"]["saves"] > 0  # each node fills its own cache
    assert sorted(os.listdir(tmp_path / "node0")) == sorted(os.listdir(tmp_path / "node1"))


@pytest.mark.parametrize("num_docs", [300, 150], ids=["same count", "fewer documents"])
def test_index_cache_follows_the_idx(sentencepiece_model, tmp_path, num_docs):
    # the cache next to the data (no --data-cache-path) outlives a new preprocessing of the prefix
    prefix = write_corpus(str(tmp_path / "bio_text_document"), 300, (3, 130), seed=0)
    cfg = data_config([prefix], tokenizer_model=sentencepiece_model, train_iters=2, split="90,10,0")
    build_datasets(cfg)
    write_corpus(prefix, num_docs, (3, 130), seed=1)
    again = build_datasets(cfg)
    fresh = build_datasets(data_config([prefix], tokenizer_model=sentencepiece_model, train_iters=2,
                                       split="90,10,0", cache=str(tmp_path / "fresh")))
    for split in ("train", "valid"):
        ours, theirs = getattr(again, split), getattr(fresh, split)
        for i in range(len(theirs)):
            assert torch.equal(ours[i]["tokens"], theirs[i]["tokens"]), (split, i)
