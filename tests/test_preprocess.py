"""tools/preprocess_data.py: Megatron-LM's semantics, megatron-core's bytes, bad input, atomic outputs."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from corpus_helpers import make_documents, output_bytes, read_documents, reference_files, write_jsonl
from megatron_mellama.data import indexed_writer, jsonl_reader, record_encoder
from megatron_mellama.data.indexed_writer import IndexedWriter, optimal_dtype
from megatron_mellama.data.sentence_split import SentenceSplitter, load_splitter_spec
from megatron_mellama.data.tokenizer import Llama2Tokenizer, SentencePieceTokenizer, build_tokenizer
from megatron_mellama.tools.preprocess_data import main

REPO = Path(__file__).resolve().parents[1]
DOCS = make_documents(120, seed=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    records = [{"text": t, "id": i} for i, t in enumerate(DOCS)]
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", records)


def run(tmp_path, inputs, *extra, model, tokenizer_type="Llama2Tokenizer", name="out"):
    prefix = tmp_path / name
    argv = ["--input", str(inputs), "--output-prefix", str(prefix), "--tokenizer-type", tokenizer_type,
            "--tokenizer-model", str(model), *extra]
    return main(argv), prefix


def no_temporaries(directory):
    return not [p for p in os.listdir(directory) if p.endswith(".tmp")]


def test_round_trip_equals_tokenizing_each_document(tmp_path, corpus, sentencepiece_model):
    rc, prefix = run(tmp_path, corpus, "--append-eod", model=sentencepiece_model)
    assert rc == 0
    tok = Llama2Tokenizer(sentencepiece_model)
    docs = read_documents(f"{prefix}_text_document")
    assert len(docs) == len(DOCS)
    for text, tokens in zip(DOCS, docs):
        assert tokens.dtype == np.uint16
        assert tokens.tolist() == tok.tokenize(text) + [tok.eod]  # BOS first, as Megatron's Llama2Tokenizer
    assert Path(f"{prefix}_rejected.jsonl").read_text() == ""


def test_document_bytes_equal_megatron_builder(tmp_path, corpus, sentencepiece_model):
    rc, prefix = run(tmp_path, corpus, model=sentencepiece_model)
    assert rc == 0
    tok = Llama2Tokenizer(sentencepiece_model)
    expected = reference_files(tmp_path, "ref", [[tok.tokenize(t)] for t in DOCS], np.uint16)
    assert output_bytes(f"{prefix}_text_document") == expected


@pytest.mark.slow
def test_sentence_bytes_equal_megatron_builder_with_self_trained_punkt(tmp_path, corpus, sentencepiece_model,
                                                                         capsys):
    rc, prefix = run(tmp_path, corpus, "--split-sentences", "--append-eod", model=sentencepiece_model)
    assert rc == 0
    assert "sentence splitter: Punkt trained on 120 documents" in capsys.readouterr().out
    split = SentenceSplitter(load_splitter_spec("english", False, iter(DOCS)))
    tok = Llama2Tokenizer(sentencepiece_model)
    documents = []
    for text in DOCS:
        sequences = [tok.tokenize(s) for s in split(text)]
        sequences[-1].append(tok.eod)
        documents.append(sequences)
    assert sum(map(len, documents)) > len(DOCS)  # sentences really were split
    assert output_bytes(f"{prefix}_text_sentence") == reference_files(tmp_path, "ref", documents, np.uint16)


def test_writer_equals_builder_across_chunks_empty_documents_and_int32(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed_writer, "_CHUNK", 7)
    rng = np.random.default_rng(0)
    documents = [[rng.integers(0, 70000, rng.integers(1, 9)).tolist() for _ in range(rng.integers(0, 4))]
                 for _ in range(40)]
    dtype = optimal_dtype(70000)
    writer = IndexedWriter(tmp_path / "ours.bin", tmp_path / "ours.idx", dtype)
    for sequences in documents[:20]:
        writer.add_document([t for s in sequences for t in s], [len(s) for s in sequences])
    batch = documents[20:]
    writer.add_batch(np.array([t for d in batch for s in d for t in s]), np.array([len(s) for d in batch for s in d]),
                     np.array([len(d) for d in batch]))
    writer.commit()
    assert dtype is np.int32
    assert output_bytes(tmp_path / "ours") == reference_files(tmp_path, "ref", documents, np.int32)
    assert no_temporaries(tmp_path)


def test_one_and_two_workers_write_identical_bytes(tmp_path, corpus, sentencepiece_model, monkeypatch):
    monkeypatch.setattr(jsonl_reader, "BLOCK_BYTES", 2048)  # many blocks, so ordering across workers matters
    rc1, one = run(tmp_path, corpus, "--append-eod", "--workers", "1", model=sentencepiece_model, name="one")
    rc2, two = run(tmp_path, corpus, "--append-eod", "--workers", "2", model=sentencepiece_model, name="two")
    assert rc1 == rc2 == 0
    assert output_bytes(f"{one}_text_document") == output_bytes(f"{two}_text_document")


def test_gzip_and_glob_inputs_in_sorted_order(tmp_path, sentencepiece_model):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl.gz", [{"text": t} for t in DOCS[:50]], gz=True)
    write_jsonl(data / "b.jsonl", [{"text": t} for t in DOCS[50:]])
    rc, prefix = run(tmp_path, data / "*.jsonl*", "--append-eod", model=sentencepiece_model)
    assert rc == 0
    tok = Llama2Tokenizer(sentencepiece_model)
    assert [d.tolist() for d in read_documents(f"{prefix}_text_document")] == \
        [tok.tokenize(t) + [tok.eod] for t in DOCS]


def test_several_json_keys_one_output_each(tmp_path, sentencepiece_model):
    path = write_jsonl(tmp_path / "two.jsonl", [{"text": t, "title": t[:20]} for t in DOCS[:10]])
    rc, prefix = run(tmp_path, path, "--json-keys", "text", "title", model=sentencepiece_model)
    assert rc == 0
    tok = Llama2Tokenizer(sentencepiece_model)
    assert [d.tolist() for d in read_documents(f"{prefix}_title_document")] == [tok.tokenize(t[:20]) for t in DOCS[:10]]
    assert len(read_documents(f"{prefix}_text_document")) == 10


BAD_LINES = {
    "malformed JSON": b'{"text": "unterminated',
    "missing key": json.dumps({"body": "no text here"}).encode(),
    "not a string": json.dumps({"text": ["a", "list"]}).encode(),
    "invalid UTF-8": b'{"text": "bad \xff\xfe bytes"}',
    "empty document": json.dumps({"text": " \n\t "}).encode(),
    # a JSON escape decoding to half a UTF-16 pair: json accepts it, no tokenizer can encode it
    "lone surrogate": b'{"text": "bad \\ud800 half"}',
}


@pytest.mark.parametrize("reason", list(BAD_LINES))
def test_bad_record_is_skipped_and_recorded(tmp_path, sentencepiece_model, reason, capsys):
    # 1 of 21 records: below --max-reject-fraction's default 0.1
    records = [{"text": DOCS[0]}, {"text": DOCS[1]}, BAD_LINES[reason], *({"text": t} for t in DOCS[2:20])]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    rc, prefix = run(tmp_path, path, model=sentencepiece_model)
    assert rc == 0
    tok = Llama2Tokenizer(sentencepiece_model)
    assert [d.tolist() for d in read_documents(f"{prefix}_text_document")] == [tok.tokenize(t) for t in DOCS[:20]]
    [entry] = [json.loads(line) for line in Path(f"{prefix}_rejected.jsonl").read_text().splitlines()]
    assert (entry["file"], entry["line"]) == (str(path), 3)
    assert reason.split()[-1].lower() in entry["reason"].lower()
    assert "skipped 1 unusable records" in capsys.readouterr().out


@pytest.mark.parametrize("reason", list(BAD_LINES))
def test_bad_record_stops_strict_run_naming_file_and_line(tmp_path, sentencepiece_model, reason, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": DOCS[0]}, BAD_LINES[reason], {"text": DOCS[2]}])
    rc, prefix = run(tmp_path, path, "--strict", model=sentencepiece_model)
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path}:2:" in err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def _existing_outputs(tmp_path):
    prefix = tmp_path / "out"
    old = {Path(f"{prefix}_text_document.{ext}"): f"old {ext}".encode() for ext in ("bin", "idx")}
    for path, content in old.items():
        path.write_bytes(content)
    return old


@pytest.mark.parametrize("failure", [RuntimeError("tokenizer crashed"), KeyboardInterrupt(), "SIGTERM"])
def test_failed_run_leaves_existing_outputs_untouched(tmp_path, corpus, sentencepiece_model, monkeypatch, failure):
    old = _existing_outputs(tmp_path)
    monkeypatch.setattr(jsonl_reader, "BLOCK_BYTES", 2048)
    real = record_encoder.RecordEncoder.encode_block
    calls = []

    def failing(self, block):
        calls.append(1)
        if len(calls) == 3:  # after some data has been written
            if failure == "SIGTERM":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise failure
        return real(self, block)

    monkeypatch.setattr(record_encoder.RecordEncoder, "encode_block", failing)
    if isinstance(failure, RuntimeError):
        with pytest.raises(RuntimeError):
            run(tmp_path, corpus, model=sentencepiece_model)
    else:
        rc, _ = run(tmp_path, corpus, model=sentencepiece_model)
        assert rc == (130 if isinstance(failure, KeyboardInterrupt) else 143)
    assert {p: p.read_bytes() for p in old} == old
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in old)


def test_huggingface_tokenizer(tmp_path, corpus, hf_tokenizer_dir):
    rc, prefix = run(tmp_path, corpus, "--append-eod", "--workers", "2", model=hf_tokenizer_dir,
                     tokenizer_type="HuggingFaceTokenizer")
    assert rc == 0
    tok = build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir)
    assert [d.tolist() for d in read_documents(f"{prefix}_text_document")][:20] == \
        [tok.tokenize(t) + [tok.eod] for t in DOCS[:20]]


def test_sentencepiece_tokenizer_is_megatrons(tmp_path, corpus, sentencepiece_model):
    tok = SentencePieceTokenizer(sentencepiece_model)
    base = Llama2Tokenizer(sentencepiece_model)
    # Megatron appends <CLS> <SEP> <EOD> <MASK> <PAD> (LLaMA has no pad piece); <s> and </s> exist already.
    assert tok.vocab_size == base.vocab_size + 5
    assert (tok.cls, tok.sep, tok.eod, tok.mask, tok.pad) == tuple(range(base.vocab_size, base.vocab_size + 5))
    assert (tok.bos, tok.eos) == (base.bos, base.eos)
    text = DOCS[0]
    assert tok.tokenize(text) == base.tokenize(text, bos=False)
    plain = lambda text: base.tokenize(text, bos=False)  # noqa: E731
    assert tok.tokenize("a<EOD>b</s>") == plain("a") + [tok.eod] + plain("b") + [tok.eos]
    rc, prefix = run(tmp_path, corpus, "--append-eod", model=sentencepiece_model,
                     tokenizer_type="SentencePieceTokenizer")
    assert rc == 0
    assert read_documents(f"{prefix}_text_document")[0].tolist() == tok.tokenize(text) + [tok.eod]


@pytest.mark.parametrize("change, flag", [
    ({"--input": "missing.jsonl"}, "--input"),
    ({"--tokenizer-type": "GPT2BPETokenizer"}, "--tokenizer-type"),
    ({"--tokenizer-model": "missing.model"}, "--tokenizer-model"),
    ({"--tokenizer-model": "corpus.jsonl"}, "--tokenizer-model"),
    ({"--workers": "0"}, "--workers"),
    ({"--output-prefix": "no/such/dir/out"}, "--output-prefix"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, corpus, sentencepiece_model, capsys, monkeypatch, change, flag):
    monkeypatch.chdir(corpus.parent)
    flags = {"--input": str(corpus), "--output-prefix": str(tmp_path / "out"), "--tokenizer-type": "Llama2Tokenizer",
             "--tokenizer-model": sentencepiece_model, **change}
    assert main([x for kv in flags.items() for x in kv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and err[0].startswith("mellama-preprocess-data: error:")


def test_script_runs_from_a_clone_and_help_works(tmp_path, corpus):
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--help"], cwd=tmp_path,
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "--append-eod" in out.stdout and "--split-sentences" in out.stdout
    out = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(corpus),
                          "--output-prefix", "x", "--tokenizer-type", "Llama2Tokenizer"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "--tokenizer-model" in out.stderr
