"""merge_datasets and inspect_dataset, checked against megatron-core's own builder and reader."""

import json
import os
import subprocess
import sys
import warnings
from collections import Counter

import numpy as np
import pytest

from megatron_mellama.tools import inspect_dataset, merge_datasets

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron-core warns about missing Transformer Engine on import
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_dataset(prefix, documents, dtype=np.int32):
    """Each document is a list of sequences (token lists), as preprocess_data writes them."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for sequences in documents:
        builder.add_document(np.array([t for s in sequences for t in s]), [len(s) for s in sequences])
    builder.finalize(f"{prefix}.idx")
    return prefix


def random_documents(seed, n, vocab=500):
    rng = np.random.default_rng(seed)
    # Mostly one sequence per document, some split into sentences; lengths spread over several buckets.
    return [[rng.integers(0, vocab, rng.integers(1, 300)).tolist() for _ in range(rng.choice([1, 1, 2, 3]))]
            for _ in range(n)]


def read_documents(prefix):
    ds = IndexedDataset(prefix)
    docs = ds.document_indices
    return [[ds[i].tolist() for i in range(docs[d], docs[d + 1])] for d in range(len(docs) - 1)]


def megatron_merge(prefixes, out):
    builder = IndexedDatasetBuilder(f"{out}.bin", dtype=IndexedDataset(prefixes[0]).index.dtype)
    for p in prefixes:
        builder.add_index(p)
    builder.finalize(f"{out}.idx")
    return out


def same_bytes(a, b):
    return all(open(a + ext, "rb").read() == open(b + ext, "rb").read() for ext in (".bin", ".idx"))


@pytest.fixture
def shards(tmp_path):
    """Three prefixes in one folder, created out of sorted order; returns (folder, {name: documents})."""
    folder = tmp_path / "shards"
    folder.mkdir()
    docs = {name: random_documents(seed, n) for seed, (name, n) in enumerate([("c", 5), ("a", 7), ("b", 4)])}
    for name, d in docs.items():
        write_dataset(str(folder / name), d)
    (folder / "README.txt").write_text("not a dataset")  # other files in the folder are ignored
    return folder, docs


def run(tool, argv, capsys):
    rc = tool.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------- merge


@pytest.mark.slow
def test_merge_folder_is_megatrons_merge_in_sorted_order(shards, tmp_path, capsys):
    folder, docs = shards
    out = str(tmp_path / "merged")
    rc, stdout, err = run(merge_datasets, ["--input", folder, "--output-prefix", out], capsys)
    assert rc == 0, err
    ref = megatron_merge([str(folder / n) for n in "abc"], str(tmp_path / "ref"))
    assert same_bytes(out, ref)
    assert read_documents(out) == docs["a"] + docs["b"] + docs["c"]
    assert [line.split()[0] for line in stdout.splitlines()[:3]] == ["[1/3]", "[2/3]", "[3/3]"]
    assert sorted(os.listdir(tmp_path)) == ["merged.bin", "merged.idx", "ref.bin", "ref.idx", "shards"]


@pytest.mark.slow
def test_merge_prefix_list_keeps_given_order(shards, tmp_path, capsys):
    folder, docs = shards
    prefixes = [str(folder / n) for n in "cab"]
    out = str(tmp_path / "merged")
    rc, _, err = run(merge_datasets, ["--prefixes", *prefixes, "--output-prefix", out], capsys)
    assert rc == 0, err
    assert same_bytes(out, megatron_merge(prefixes, str(tmp_path / "ref")))
    assert read_documents(out) == docs["c"] + docs["a"] + docs["b"]


def test_merge_refuses_mixed_dtypes(shards, tmp_path, capsys):
    folder, _ = shards
    small = write_dataset(str(tmp_path / "small"), random_documents(9, 3), dtype=np.uint16)
    out = tmp_path / "merged"
    rc, _, err = run(merge_datasets, ["--prefixes", folder / "a", small, "--output-prefix", out], capsys)
    assert rc == 2 and len(err.splitlines()) == 1
    assert small in err and "uint16" in err and "int32" in err
    assert not list(tmp_path.glob("merged*"))


@pytest.mark.parametrize("remove", [".idx", ".bin"])
def test_merge_refuses_half_a_dataset(shards, tmp_path, capsys, remove):
    folder, _ = shards
    os.remove(folder / f"b{remove}")
    rc, _, err = run(merge_datasets, ["--input", folder, "--output-prefix", tmp_path / "m"], capsys)
    assert rc == 2 and str(folder / "b") in err and f"no b{remove}" in err
    rc, _, err = run(merge_datasets, ["--prefixes", folder / "a", folder / "b", "--output-prefix",
                                      tmp_path / "m"], capsys)
    assert rc == 2 and f"{folder / 'b'}{remove} is missing" in err
    assert not list(tmp_path.glob("m.*"))


def test_failed_merge_leaves_existing_output_untouched(shards, tmp_path, capsys, monkeypatch):
    folder, _ = shards
    out = write_dataset(str(tmp_path / "merged"), random_documents(5, 2))
    before = {ext: open(out + ext, "rb").read() for ext in (".bin", ".idx")}
    real_add_index, calls = IndexedDatasetBuilder.add_index, []

    def add_index_then_fail(self, prefix):
        calls.append(prefix)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_add_index(self, prefix)

    monkeypatch.setattr(IndexedDatasetBuilder, "add_index", add_index_then_fail)
    rc, _, err = run(merge_datasets, ["--input", folder, "--output-prefix", out], capsys)
    assert rc == 2 and "No space left" in err and len(calls) == 2
    assert {ext: open(out + ext, "rb").read() for ext in (".bin", ".idx")} == before
    assert sorted(os.listdir(tmp_path)) == ["merged.bin", "merged.idx", "shards"]  # no temporaries left


def test_merge_input_errors(shards, tmp_path, capsys):
    folder, _ = shards
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad"
    bad.with_suffix(".idx").write_bytes(b"hello, not an index" * 3)
    bad.with_suffix(".bin").write_bytes(b"")
    cases = [
        (["--input", tmp_path / "nope", "--output-prefix", tmp_path / "m"], "is not a directory"),
        (["--input", tmp_path / "empty", "--output-prefix", tmp_path / "m"], "no .bin/.idx pairs"),
        (["--prefixes", folder / "a", bad, "--output-prefix", tmp_path / "m"], "not a Megatron .idx file"),
        (["--prefixes", folder / "a", "--output-prefix", tmp_path / "no" / "m"], "does not exist"),
        (["--prefixes", folder / "a", folder / "b", "--output-prefix", folder / "b"], "is also an input"),
        (["--input", folder, "--prefixes", folder / "a", "--output-prefix", tmp_path / "m"], "not allowed with"),
        (["--input", folder], "--output-prefix"),
    ]
    for argv, message in cases:
        rc, _, err = run(merge_datasets, argv, capsys)
        assert rc == 2 and message in err and len(err.splitlines()) == 1, (argv, err)
    assert not list(tmp_path.glob("m.*"))


# ---------------------------------------------------------------- inspect


def test_inspect_counts_match_megatron_reader(shards, capsys, monkeypatch):
    folder, _ = shards
    monkeypatch.setattr(inspect_dataset, "CHUNK", 7)  # force many chunks through the streaming code
    prefix = str(folder / "a")
    rc, out, err = run(inspect_dataset, [prefix, "--json", "--top-k", 5], capsys)
    assert rc == 0, err
    s = json.loads(out)
    ds = IndexedDataset(prefix)
    lengths = ds.sequence_lengths
    assert s["sequences"] == len(ds) and s["documents"] == len(ds.document_indices) - 1
    assert s["tokens"] == int(lengths.sum()) and s["dtype"] == np.dtype(ds.index.dtype).name
    assert (s["min_sequence_length"], s["max_sequence_length"]) == (lengths.min(), lengths.max())
    assert s["mean_sequence_length"] == pytest.approx(lengths.mean())
    assert (s["bin_bytes"], s["idx_bytes"]) == (os.path.getsize(prefix + ".bin"), os.path.getsize(prefix + ".idx"))
    hist = s["length_histogram"]
    assert sum(b["count"] for b in hist) == len(ds)
    assert [b["count"] for b in hist] == [int(((lengths >= b["min"]) & (lengths <= b["max"])).sum()) for b in hist]
    counts = Counter(np.concatenate([ds[i] for i in range(len(ds))]).tolist())
    assert [c for _, c in s["top_tokens"]] == sorted(counts.values(), reverse=True)[:5]
    assert all(counts[t] == c for t, c in s["top_tokens"])


def test_inspect_document_spans_its_sequences(shards, capsys):
    folder, docs = shards
    for n, sequences in enumerate(docs["a"]):
        rc, out, _ = run(inspect_dataset, [folder / "a", "--document", n, "--json"], capsys)
        assert rc == 0 and json.loads(out)["tokens"] == [t for s in sequences for t in s]


def test_inspect_text_report(shards, capsys):
    folder, _ = shards
    rc, out, _ = run(inspect_dataset, [folder / "b"], capsys)
    s = inspect_dataset.summarise(inspect_dataset.read_index(str(folder / "b")))
    assert rc == 0 and "sequence length histogram" in out and "most frequent tokens" in out
    assert f"{s['documents']:,} documents, {s['sequences']:,} sequences, {s['tokens']:,} tokens" in out


@pytest.fixture
def text_dataset(sentencepiece_model, tmp_path):
    from megatron_mellama.data.tokenizer import build_tokenizer

    tok = build_tokenizer("Llama2Tokenizer", sentencepiece_model)
    texts = ["The patient was treated in hospital.", "Blood test results after 2024 review!",
             "Cancer risk (clinical) study of heart disease."]
    prefix = write_dataset(str(tmp_path / "text"), [[tok.tokenize(t)] for t in texts], dtype=np.uint16)
    return prefix, texts, ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", sentencepiece_model]


def test_inspect_document_decodes_to_original_text(text_dataset, capsys):
    prefix, texts, tok_flags = text_dataset
    ds = IndexedDataset(prefix)  # kept alive: its items are views of its mmap
    for n, text in enumerate(texts):
        rc, out, err = run(inspect_dataset, [prefix, "--document", n, "--json", *tok_flags], capsys)
        assert rc == 0, err
        doc = json.loads(out)
        assert doc["text"] == text and doc["tokens"] == ds[n].tolist()
    rc, out, _ = run(inspect_dataset, [prefix, "--document", 1, *tok_flags], capsys)
    assert rc == 0 and texts[1] in out
    rc, out, _ = run(inspect_dataset, [prefix, *tok_flags], capsys)  # top tokens shown decoded
    assert rc == 0 and "'.'" in out


def test_inspect_errors(text_dataset, tmp_path, capsys):
    prefix, _, tok_flags = text_dataset
    (tmp_path / "junk.idx").write_bytes(b"\x00" * 64)
    (tmp_path / "junk.bin").write_bytes(b"")
    (tmp_path / "half.bin").write_bytes(b"")
    cases = [
        ([prefix, "--document", 3], "--document 3 is out of range (valid: 0..2)"),
        ([prefix, "--document", -1], "valid: 0..2"),
        ([tmp_path / "junk"], "not a Megatron .idx file"),
        ([tmp_path / "missing"], f"{tmp_path / 'missing'}.idx is missing"),
        ([tmp_path / "half"], f"half.bin exists but {tmp_path / 'half'}.idx is missing"),
        ([prefix, "--tokenizer-type", "Llama2Tokenizer"], "--tokenizer-model"),
        ([prefix, "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", tmp_path / "x.model"], "x.model"),
        ([prefix, "--document", "two"], "--document"),
    ]
    for argv, message in cases:
        rc, _, err = run(inspect_dataset, argv, capsys)
        assert rc == 2 and message in err and len(err.splitlines()) == 1, (argv, err)


def test_inspect_detects_truncated_bin(shards, capsys):
    folder, _ = shards
    prefix = str(folder / "a")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".bin") - 4)
    rc, _, err = run(inspect_dataset, [prefix], capsys)
    assert rc == 2 and "truncated" in err


# ---------------------------------------------------------------- both


@pytest.mark.slow
@pytest.mark.parametrize("name", ["merge_datasets", "inspect_dataset"])
def test_help_from_a_clone(name, tmp_path):
    # Run from elsewhere, as a clone's user would, with the package not importable from the cwd.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", f"{name}.py"), "--help"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage:" in proc.stdout
    assert getattr(merge_datasets if name == "merge_datasets" else inspect_dataset, "main")(["--help"]) == 0
