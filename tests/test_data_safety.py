"""Issue 14: data that would train wrongly or crash mid-run fails before step 1 with one line, and
preprocessing never replaces good outputs with bad ones (reject threshold, lock, full disk, long lines)."""

import os

import numpy
import pytest
from indexed_corpus import data_config, write_corpus

from megatron_mellama.config import ConfigError
from megatron_mellama.data import prefix_checks
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
    monkeypatch.setattr(prefix_checks, "FULL_SCAN_BYTES", 1024)
    monkeypatch.setattr(prefix_checks, "WINDOW_BYTES", 64)
    lo, hi, complete = prefix_checks.max_token_id(wide)
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


import errno  # noqa: E402
import gzip  # noqa: E402

from megatron_mellama.data import indexed_writer  # noqa: E402


def _existing_outputs(tmp_path):
    old = {tmp_path / f"out_text_document.{ext}": f"old {ext}".encode() for ext in ("bin", "idx")}
    old[tmp_path / "out_rejected.jsonl"] = b""
    for path, content in old.items():
        path.write_bytes(content)
    return old


def _untouched(tmp_path, old, *inputs):
    assert {p: p.read_bytes() for p in old} == old
    assert sorted(os.listdir(tmp_path)) == sorted([p.name for p in old] + [Path(i).name for i in inputs])


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mellama-preprocess-data: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def test_gzip_without_gz_suffix_fails_and_keeps_outputs(tmp_path, sentencepiece_model, capsys):
    old = _existing_outputs(tmp_path)
    data = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in DOCS)
    path = tmp_path / "in.jsonl"
    path.write_bytes(gzip.compress(data))
    rc, _ = _preprocess(tmp_path, path, model=sentencepiece_model)
    assert rc == 1
    err = _one_error_line(capsys)
    assert "records rejected (all)" in err
    assert f"{path} starts with gzip's magic bytes 1f 8b: name it .gz" in err
    _untouched(tmp_path, old, path)


def test_too_many_rejects_fail_and_keep_outputs(tmp_path, sentencepiece_model, capsys):
    old = _existing_outputs(tmp_path)
    records = [{"text": t} for t in DOCS[:7]] + [b'{"text": "unterminated'] * 2 + [{"body": "x"}]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    rc, _ = _preprocess(tmp_path, path, model=sentencepiece_model)
    assert rc == 1
    err = _one_error_line(capsys)
    assert "3 of 10 records rejected (30.0%, more than --max-reject-fraction 0.1)" in err
    assert "malformed JSON x 2, missing key 'text' x 1" in err and f"first: {path}:8: malformed JSON" in err
    _untouched(tmp_path, old, path)
    rc, prefix = _preprocess(tmp_path, path, "--max-reject-fraction", "0.5", model=sentencepiece_model)
    assert rc == 0 and len(read_documents(f"{prefix}_text_document")) == 7
    assert len(Path(f"{prefix}_rejected.jsonl").read_text().splitlines()) == 3


def test_all_rejected_fails_even_at_fraction_1(tmp_path, sentencepiece_model, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [{"body": "x"}] * 3)
    rc, _ = _preprocess(tmp_path, path, "--max-reject-fraction", "1", model=sentencepiece_model)
    assert rc == 1
    assert "3 of 3 records rejected (all): reasons: missing key 'text' x 3" in _one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_max_reject_fraction_is_checked(tmp_path, sentencepiece_model, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in DOCS])
    rc, _ = _preprocess(tmp_path, path, "--max-reject-fraction", "1.5", model=sentencepiece_model)
    assert rc == 2 and "--max-reject-fraction 1.5" in _one_error_line(capsys)


def test_a_second_run_on_a_locked_prefix_fails_at_once(tmp_path, sentencepiece_model, capsys):
    old = _existing_outputs(tmp_path)
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in DOCS])
    with indexed_writer.output_lock(str(tmp_path / "out")) as lock:
        rc, _ = _preprocess(tmp_path, path, model=sentencepiece_model)
        assert rc == 1
        err = _one_error_line(capsys)
        assert f"--output-prefix {tmp_path / 'out'}: {lock} is locked: process {os.getpid()} is writing" in err
        _untouched(tmp_path, old, path, lock)
    assert not os.path.exists(lock)  # released and removed
    rc, prefix = _preprocess(tmp_path, path, model=sentencepiece_model)
    assert rc == 0 and len(read_documents(f"{prefix}_text_document")) == len(DOCS)
    assert not os.path.exists(lock)


def test_lock_is_exclusive_across_processes(tmp_path):
    import subprocess
    import sys

    prefix = str(tmp_path / "p")
    code = ("import sys, time; from megatron_mellama.data.indexed_writer import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('held', flush=True); sys.stdin.readline()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, prefix], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(indexed_writer.OutputLocked, match=rf"process {holder.pid} is writing"):
            with indexed_writer.output_lock(prefix):
                pass
    finally:
        holder.communicate("\n", timeout=60)
    with indexed_writer.output_lock(prefix):
        pass


class _FullDisk:
    """A file whose writes fail with ENOSPC once `budget` bytes are written, and whose close fails too."""

    def __init__(self, f, budget):
        self.f, self.budget, self.full = f, budget, False

    def write(self, data):
        n = len(memoryview(data).cast("B")) if not isinstance(data, str) else len(data)
        if n > self.budget[0]:
            self.full = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget[0] -= n
        return self.f.write(data)

    def close(self):
        self.f.close()
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.mark.parametrize("budget", [0, 300, 3000])
def test_full_disk_removes_temporaries_and_is_one_line(tmp_path, sentencepiece_model, monkeypatch, capsys, budget):
    old = _existing_outputs(tmp_path)
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in DOCS])
    monkeypatch.setattr(jsonl_reader, "BLOCK_BYTES", 512)
    left = [budget]
    monkeypatch.setattr(indexed_writer, "open", lambda *a, **k: _FullDisk(open(*a, **k), left), raising=False)
    rc, _ = _preprocess(tmp_path, path, model=sentencepiece_model)
    assert rc == 1
    assert "No space left on device; no output written, temporary files removed" in _one_error_line(capsys)
    _untouched(tmp_path, old, path)


def test_failure_creating_temporaries_leaves_none(tmp_path, sentencepiece_model, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in DOCS])
    real, calls = indexed_writer.temp_path, []

    def failing(*args):
        calls.append(args)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / ".x.tmp"))
        return real(*args)

    monkeypatch.setattr(indexed_writer, "temp_path", failing)
    rc, _ = _preprocess(tmp_path, path, model=sentencepiece_model)
    assert rc == 1 and "No space left on device" in _one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_preprocess_writes_the_token_id_sidecar_that_training_trusts(tmp_path, sentencepiece_model):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in DOCS * 5])
    rc, prefix = _preprocess(tmp_path, path, "--append-eod", model=sentencepiece_model)
    assert rc == 0
    dataset = f"{prefix}_text_document"
    stats = json.loads(Path(f"{dataset}.tokens.json").read_text())
    tokens = numpy.concatenate(read_documents(dataset))
    assert (stats["min_token_id"], stats["max_token_id"]) == (int(tokens.min()), int(tokens.max()))
    assert stats["bin_bytes"] == os.path.getsize(f"{dataset}.bin")
    assert prefix_checks.max_token_id(dataset) == (int(tokens.min()), int(tokens.max()), True)
    # trusted while the sizes match (nothing else is read): a sidecar claiming a large id is believed
    Path(f"{dataset}.tokens.json").write_text(json.dumps({**stats, "max_token_id": 10**6}))
    cfg = data_config([dataset], tokenizer_model=sentencepiece_model, split="1", seq_length=8)
    cfg.train.global_batch_size, cfg.train.train_iters = 4, 2
    _fails_with_one_line(cfg, r"token id 1000000 in .*_text_document\.bin is outside")
    # ...and ignored once the .bin changed: the tokens themselves are checked
    with open(f"{dataset}.bin", "ab"):
        pass
    Path(f"{dataset}.tokens.json").write_text(json.dumps({**stats, "max_token_id": 10**6, "bin_bytes": 1}))
    assert prefix_checks.max_token_id(dataset) == (int(tokens.min()), int(tokens.max()), True)
    build_datasets(cfg)


@pytest.mark.parametrize("damage", ["not gzip", "truncated gzip"])
@pytest.mark.parametrize("split", [False, True])
def test_bad_gz_input_is_one_line_naming_it(tmp_path, sentencepiece_model, capsys, damage, split):
    data = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in DOCS * 50)
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(data if damage == "not gzip" else gzip.compress(data)[:3000])
    rc, _ = _preprocess(tmp_path, path, *(["--split-sentences"] if split else []), model=sentencepiece_model)
    assert rc == 1
    err = _one_error_line(capsys)
    assert f"--input {path} is {'not a gzip file' if damage == 'not gzip' else 'a truncated or corrupt gzip'}" in err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl.gz"]
