"""Issue 14: data that would train wrongly or crash mid-run fails before step 1 with one line, and
preprocessing never replaces good outputs with bad ones (reject threshold, lock, full disk, long lines)."""

import os

import pytest
from indexed_corpus import data_config, write_corpus

from megatron_mellama.config import ConfigError
from megatron_mellama.data import datasets
from megatron_mellama.data.datasets import build_datasets


def _fails_with_one_line(cfg, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        build_datasets(cfg)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.fixture
def good(tmp_path):
    return write_corpus(str(tmp_path / "bio_text_document"), 50, (3, 130))


def test_short_bin_fails_before_training(good, sentencepiece_model):
    size = os.path.getsize(good + ".bin")
    with open(good + ".bin", "r+b") as f:
        f.truncate(size - 6)
    msg = _fails_with_one_line(data_config([good], tokenizer_model=sentencepiece_model, split="1"),
                               r"^--data-path .*bio_text_document: .*bio_text_document\.bin is truncated")
    assert f"{size - 6} bytes" in msg and f"needs {size}" in msg


def test_long_bin_fails_before_training(good, sentencepiece_model):
    size = os.path.getsize(good + ".bin")
    with open(good + ".bin", "ab") as f:
        f.write(b"\x05\x00" * 3)
    msg = _fails_with_one_line(data_config([good], tokenizer_model=sentencepiece_model, split="1"),
                               r"^--data-path .*bio_text_document: .*\.bin holds")
    assert f"holds {size + 6} bytes" in msg and "longer than its index describes" in msg


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_bad_idx_is_one_line(good, sentencepiece_model, damage):
    data = open(good + ".idx", "rb").read()
    new = {"truncated": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[damage]
    open(good + ".idx", "wb").write(new)
    _fails_with_one_line(data_config([good], tokenizer_model=sentencepiece_model, split="1"),
                         r"^--data-path .*bio_text_document: .*bio_text_document\.idx")


def test_idx_pointers_that_disagree_with_lengths(good, sentencepiece_model):
    data = bytearray(open(good + ".idx", "rb").read())
    n_seq = int.from_bytes(data[18:26], "little")
    last_pointer = 34 + 4 * n_seq + 8 * (n_seq - 1)
    data[last_pointer:last_pointer + 8] = (10**6).to_bytes(8, "little")
    open(good + ".idx", "wb").write(bytes(data))
    _fails_with_one_line(data_config([good], tokenizer_model=sentencepiece_model, split="1"), r"^--data-path .*bio_text_document")


def test_token_ids_beyond_the_vocabulary(tmp_path, good, sentencepiece_model):
    wide = write_corpus(str(tmp_path / "wide_text_document"), 50, (3, 500), seed=1)
    cfg = data_config([1, good, 1, wide], tokenizer_model=sentencepiece_model, split="1")
    cfg.model.vocab_size = 400
    msg = _fails_with_one_line(cfg, r"^--data-path .*wide_text_document: token id \d+ in .*wide_text_document\.bin "
                                    r"is outside the model's vocabulary of 400")
    assert int(msg.split("token id ")[1].split()[0]) == 499
    cfg.model.vocab_size = 500
    build_datasets(cfg)  # every id fits
    cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by = 450, 128  # padded to 512
    build_datasets(cfg)


def test_token_ids_default_to_the_tokenizers_vocabulary(tmp_path, sentencepiece_model):
    wide = write_corpus(str(tmp_path / "wide_text_document"), 50, (3, 600))
    cfg = data_config([wide], tokenizer_model=sentencepiece_model, split="1")  # --vocab-size unset: the tokenizer's 400
    _fails_with_one_line(cfg, r"outside the model's vocabulary of 400 ")


def test_large_bin_is_sampled(tmp_path, sentencepiece_model, monkeypatch):
    wide = write_corpus(str(tmp_path / "wide_text_document"), 400, (3, 500))
    monkeypatch.setattr(datasets, "FULL_SCAN_BYTES", 1024)
    monkeypatch.setattr(datasets, "WINDOW_BYTES", 64)
    lo, hi, complete = datasets.max_token_id(wide)
    assert not complete and 400 <= hi < 500 and lo >= 2
    cfg = data_config([wide], tokenizer_model=sentencepiece_model, split="1")
    cfg.model.vocab_size = 400
    _fails_with_one_line(cfg, r"in a sample of its tokens\) is outside the model's vocabulary of 400")


@pytest.mark.parametrize("damage", ["short bin", "ids beyond vocabulary"])
def test_pretrain_refuses_in_one_line(tmp_path, sentencepiece_model, capsys, damage):
    from megatron_mellama.pretrain import main

    prefix = write_corpus(str(tmp_path / "bio_text_document"), 200, (3, 300 if damage == "short bin" else 390))
    if damage == "short bin":
        with open(prefix + ".bin", "r+b") as f:
            f.truncate(os.path.getsize(prefix + ".bin") - 2)
    run = ["--model", "tiny", "--vocab-size", "256", "--seq-length", "32", "--micro-batch-size", "2",
           "--global-batch-size", "4", "--train-iters", "1", "--eval-iters", "0", "--num-workers", "0",
           "--tokenizer-model", sentencepiece_model, "--data-path", prefix, "--split", "1"]
    assert main(run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and prefix in err[0], err
    assert ("truncated" if damage == "short bin" else "vocabulary of 256") in err[0]


# --- preprocessing --------------------------------------------------------------------------------

import json  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

from corpus_helpers import make_documents, read_documents, write_jsonl  # noqa: E402

from megatron_mellama.data import jsonl_reader  # noqa: E402
from megatron_mellama.data.tokenizer import Llama2Tokenizer  # noqa: E402
from megatron_mellama.tools.preprocess_data import main as preprocess  # noqa: E402

DOCS = make_documents(40, seed=3)


def _preprocess(tmp_path, inputs, *extra, model, name="out"):
    prefix = tmp_path / name
    argv = ["--input", str(inputs), "--output-prefix", str(prefix), "--tokenizer-type", "Llama2Tokenizer",
            "--tokenizer-model", str(model), *extra]
    return preprocess(argv), prefix


def test_reader_memory_is_bounded_by_the_line_limit(tmp_path):
    path = tmp_path / "long.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "short"}\n{"text": "')
        for _ in range(40):
            f.write(b"x" * (1 << 20))
        f.write(b'"}\n{"text": "after"}\n')
    tracemalloc.start()
    try:
        blocks = list(jsonl_reader.read_blocks([str(path)], max_line_bytes=4 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak  # the 40 MiB line is never held whole
    data = b"".join(b.data for b in blocks)
    assert data == b'{"text": "short"}\n{"text": "after"}\n'
    [(line, reason)] = [r for b in blocks for r in b.rejects]
    assert line == 2 and "--max-line-bytes 4194304" in reason


def test_over_long_line_is_rejected_and_listed(tmp_path, sentencepiece_model):
    long_text = "word " * 5000  # 25 kB
    records = [{"text": t} for t in DOCS[:10]] + [{"text": long_text}] + [{"text": t} for t in DOCS[10:]]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    rc, prefix = _preprocess(tmp_path, path, "--max-line-bytes", "10000", model=sentencepiece_model)
    assert rc == 0
    tok = Llama2Tokenizer(sentencepiece_model)
    assert [d.tolist() for d in read_documents(f"{prefix}_text_document")] == [tok.tokenize(t) for t in DOCS]
    [entry] = [json.loads(x) for x in Path(f"{prefix}_rejected.jsonl").read_text().splitlines()]
    assert entry["line"] == 11 and "longer than --max-line-bytes 10000" in entry["reason"]
    # the default limit lets it through
    rc, prefix = _preprocess(tmp_path, path, model=sentencepiece_model, name="default")
    assert rc == 0 and len(read_documents(f"{prefix}_text_document")) == len(DOCS) + 1
