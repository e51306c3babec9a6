"""Small .bin/.idx corpora for tests, written by megatron-core's own IndexedDatasetBuilder.

Each domain draws its tokens from its own id range, so the domain of any sample can be read off its
tokens. Every document ends with EOD, as `preprocess_data.py --append-eod` writes them.
"""

import warnings

import numpy

from megatron_mellama.config import Config

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron.core's import-time TE/apex and deprecation warnings
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

EOD = 2  # the test SentencePiece model's </s>, as in LLaMA2
# Within the 400-token test vocabulary, clear of unk/bos/eos (0, 1, 2).
DOMAIN_RANGES = {"bio": (3, 130), "clin": (130, 260), "gen": (260, 400)}


def write_corpus(prefix: str, num_docs: int, token_range: tuple, *, min_len: int = 20, max_len: int = 60,
                 seed: int = 0) -> str:
    """Write `num_docs` random documents with tokens in [lo, hi) to prefix.bin/.idx; returns prefix."""
    rng = numpy.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    for _ in range(num_docs):
        doc = rng.integers(*token_range, size=int(rng.integers(min_len, max_len + 1)))
        builder.add_document(numpy.append(doc, EOD).astype(numpy.uint16), [len(doc) + 1])
    builder.finalize(prefix + ".idx")
    return prefix


def write_domains(root, num_docs: int = 200, **kwargs) -> dict:
    """One corpus per domain of DOMAIN_RANGES under `root`; returns {domain: prefix}."""
    return {name: write_corpus(f"{root}/{name}_text_document", num_docs, rng, seed=i, **kwargs)
            for i, (name, rng) in enumerate(DOMAIN_RANGES.items())}


def domain_of(tokens) -> str:
    """The one domain whose range holds every non-EOD token; fails on a mixed or empty sample."""
    ids = numpy.asarray(tokens)
    ids = ids[ids != EOD]
    found = {name for name, (lo, hi) in DOMAIN_RANGES.items() if ((ids >= lo) & (ids < hi)).any()}
    assert len(found) == 1, f"sample mixes domains {sorted(found)}"
    return found.pop()


def data_config(data_path, *, tokenizer_model=None, seq_length=16, global_batch_size=100, micro_batch_size=5,
                train_iters=100, eval_interval=50, eval_iters=2, split="949,50,1", seed=1234, cache=None) -> Config:
    """A Config holding only what the data pipeline reads (no model validation needed)."""
    cfg = Config()
    cfg.data.data_path = [str(t) for t in data_path]
    cfg.data.split, cfg.data.seq_length, cfg.data.data_cache_path = split, seq_length, cache
    cfg.data.tokenizer_model = tokenizer_model
    cfg.train.global_batch_size, cfg.train.micro_batch_size = global_batch_size, micro_batch_size
    cfg.train.train_iters, cfg.train.eval_interval, cfg.train.eval_iters = train_iters, eval_interval, eval_iters
    cfg.train.seed = seed
    return cfg
