"""--tokenizer-backend gigatoken: SentencePiece's ids and bytes, checked before and during a run.

The reference is LLaMA-2's own vocabulary (tests/data/llama2_tokenizer, see its PROVENANCE.md).
"""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from corpus_helpers import make_documents, output_bytes, read_documents, write_jsonl
from megatron_mellama.data import fast_tokenizer, record_encoder
from megatron_mellama.data.fast_tokenizer import (CheckedEncoder, GigatokenEncoder, TokenizerMismatch,
                                                  gigatoken_json, hostile_strings, start_check, unsupported_reason)
from megatron_mellama.data.tokenizer import Llama2Tokenizer
from megatron_mellama.tools import preprocess_data, preprocess_sft, tokenizer_backend

gigatoken = pytest.importorskip("gigatoken", reason='the fast extra: pip install -e ".[fast]"')

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "llama2_tokenizer"
LLAMA2 = DATA / "tokenizer.model"


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(LLAMA2))


@pytest.fixture(scope="module")
def fast():
    return GigatokenEncoder(gigatoken_json(LLAMA2.read_bytes()))


def llama_cpp_cases():
    texts = (DATA / "ggml-vocab-llama-spm.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (DATA / "ggml-vocab-llama-spm.gguf.out").read_text(encoding="utf-8").split("\n")
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts, ids)]


def test_rebuilt_vocabulary_is_llama2s(sp, fast):
    assert sp.vocab_size() == 32000 and sp.encode("Hello world") == [15043, 3186]
    cases = llama_cpp_cases()
    assert len(cases) == 47
    for text, expected in cases:
        assert sp.encode(text) == expected, text
        assert fast.encode(text) == expected, text


def test_control_pieces_are_text_as_in_sentencepiece(sp, fast):
    # gigatoken's own conversion reads "<s>" as BOS (Megatron-LM's preprocess_data_fast.py does);
    # SentencePiece, and so this backend, never do
    stock = gigatoken.Tokenizer.from_sentencepiece(str(LLAMA2))
    text = "strike <s>this</s> out"
    assert 1 in stock.encode(text).tolist() and 2 in stock.encode(text).tolist()
    assert fast.encode(text) == sp.encode(text)
    assert 1 not in fast.encode(text) and 2 not in fast.encode(text)


def test_hostile_strings_and_documents_encode_exactly(sp, fast):
    strings = hostile_strings()
    assert len(strings) > 500
    assert start_check(fast, sp, make_documents(200, seed=3)) is None
    for text in strings:
        assert fast.encode(text) == sp.encode(text), repr(text)


def test_a_difference_is_found_and_shown():
    class Wrong:
        name = "gigatoken"

        def __init__(self, real, bad):
            self.real, self.bad = real, bad

        def encode_array(self, text):
            ids = self.real.encode_array(text)
            return ids + 1 if self.bad in text else ids

    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2))
    real = GigatokenEncoder(gigatoken_json(LLAMA2.read_bytes()))
    found = start_check(Wrong(real, "needle"), sp, ["fine text", "a needle here"])
    assert found and "'a needle here'" in found and "at token 0" in found
    checked = CheckedEncoder(Wrong(real, "needle"), sp, fraction=1.0)
    assert checked.encode("fine") == sp.encode("fine")
    with pytest.raises(TokenizerMismatch, match="needle"):
        checked.encode_array("the needle")
    assert checked.take_counts()[:2] == (2, 2)
    unchecked = CheckedEncoder(Wrong(real, "needle"), sp, fraction=0.0)
    unchecked.encode_array("the needle")
    assert unchecked.take_counts() == (1, 0, 0.0)


def test_sampled_share_is_about_the_fraction(sp, fast):
    checked = CheckedEncoder(fast, sp, fraction=0.01, seed=0)
    for text in make_documents(3000, seed=4):
        checked.encode_array(text)
    calls, n, seconds = checked.take_counts()
    assert calls == 3000 and 15 <= n <= 50 and seconds > 0


CACHE_SCRIPT = """
import json, sys
import numpy as np, sentencepiece as spm
from megatron_mellama.data import fast_tokenizer as ft
ft.RSS_CHECK_CHARS = 100_000
model = sys.argv[1]
sp = spm.SentencePieceProcessor(model_file=model)
fast = ft.GigatokenEncoder(ft.gigatoken_json(open(model, "rb").read()), cache_limit_bytes=16 << 20)
sp.encode("warm up"), fast.encode("warm up")
base = ft._rss_bytes()
rng = np.random.default_rng(0)
grown = equal = 0
for i in range(4000):  # 1.2 million nine-letter words, next to none seen twice
    words = rng.integers(97, 123, size=(300, 10), dtype=np.uint8)
    words[:, 9] = 32
    text = words.tobytes().decode()
    ids = fast.encode(text)
    equal += i % 100 != 0 or ids == sp.encode(text)
    grown = max(grown, ft._rss_bytes() - base)
print(json.dumps({"rebuilds": fast.rebuilds, "grown": grown, "equal": equal}))
"""


def test_word_cache_is_dropped_when_the_process_grows():
    # a fresh process: one that has freed memory before lets the cache grow into it unseen
    out = subprocess.run([sys.executable, "-c", CACHE_SCRIPT, str(LLAMA2)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["equal"] == 4000
    assert result["rebuilds"] >= 3
    # unbounded the process grows by 126 MiB here; bounded by 44 MiB (the 16 MiB limit, the stride
    # between reads of its size, and what the allocator keeps)
    assert result["grown"] < 64 << 20, result


def test_unsupported_models_are_named():
    from sentencepiece import sentencepiece_model_pb2 as pb

    assert unsupported_reason(LLAMA2.read_bytes()) is None

    def changed(edit):
        model = pb.ModelProto()
        model.ParseFromString(LLAMA2.read_bytes())
        edit(model)
        return unsupported_reason(model.SerializeToString())

    assert "remove_extra_whitespaces" in changed(lambda m: setattr(m.normalizer_spec, "remove_extra_whitespaces", True))
    assert "nmt_nfkc" in changed(lambda m: (setattr(m.normalizer_spec, "name", "nmt_nfkc"),
                                            setattr(m.normalizer_spec, "precompiled_charsmap", b"x")))
    assert "UNIGRAM" in changed(lambda m: setattr(m.trainer_spec, "model_type", pb.TrainerSpec.UNIGRAM))
    assert "byte fallback" in changed(lambda m: setattr(m.trainer_spec, "byte_fallback", False))


# ---- the tools -----------------------------------------------------------------------------------

def hostile_corpus(path, n=300):
    docs = make_documents(n, seed=5)
    strings = [s for s in hostile_strings() if s.strip()]
    records = [{"text": doc + " " + strings[i % len(strings)] + " <s>literal</s> tail", "meta": i}
               for i, doc in enumerate(docs)]
    records[7] = {"text": "x" * 6000 + " \U0001f999 \u4e2d\u6587 \x00 \r\n end"}
    return write_jsonl(path, records)


def run_data(tmp_path, corpus, backend, *extra, name=None, model=LLAMA2):
    prefix = tmp_path / (name or backend)
    argv = ["--input", str(corpus), "--output-prefix", str(prefix), "--tokenizer-type", "Llama2Tokenizer",
            "--tokenizer-model", str(model), "--append-eod", "--tokenizer-backend", backend, *extra]
    return preprocess_data.main(argv), prefix


@pytest.mark.parametrize("workers", ["1", "2"])
def test_preprocess_bytes_equal_sentencepiece_path(tmp_path, capsys, workers):
    corpus = hostile_corpus(tmp_path / "in.jsonl")
    rc, reference = run_data(tmp_path, corpus, "sentencepiece", "--workers", workers)
    assert rc == 0
    rc, fast = run_data(tmp_path, corpus, "gigatoken", "--workers", workers, "--tokenizer-check-fraction", "0.5")
    assert rc == 0
    out = capsys.readouterr().out
    assert "tokenizer backend: gigatoken 0.10.0" in out
    checked, encoded = (int(x) for x in out.split("exactness: ")[1].split(" texts")[0].split(" of "))
    assert "s of worker time; all equal" in out
    assert encoded == 300 and 100 < checked < 200
    assert output_bytes(f"{fast}_text_document") == output_bytes(f"{reference}_text_document")
    tok = Llama2Tokenizer(LLAMA2)
    docs = [json.loads(line)["text"] for line in Path(corpus).read_bytes().split(b"\n")[:5]]
    assert [d.tolist() for d in read_documents(f"{fast}_text_document")][:5] == \
        [tok.tokenize(t) + [tok.eod] for t in docs[:5]]


def test_auto_takes_gigatoken_only_when_it_can(tmp_path, capsys, monkeypatch, sentencepiece_model):
    corpus = hostile_corpus(tmp_path / "in.jsonl", n=20)
    assert run_data(tmp_path, corpus, "auto", name="a")[0] == 0
    assert "tokenizer backend: gigatoken" in capsys.readouterr().out

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert run_data(tmp_path, corpus, "auto", name="b")[0] == 0
    assert 'tokenizer backend: sentencepiece (gigatoken is not installed (pip install -e ".[fast]"))' \
        in capsys.readouterr().out
    assert output_bytes(tmp_path / "a_text_document") == output_bytes(tmp_path / "b_text_document")
    assert run_data(tmp_path, corpus, "gigatoken", name="c")[0] == 2
    err = capsys.readouterr().err
    assert "--tokenizer-backend gigatoken: gigatoken is not installed" in err and len(err.strip().splitlines()) == 1


def test_huggingface_tokenizer_keeps_its_own(tmp_path, capsys, hf_tokenizer_dir):
    corpus = hostile_corpus(tmp_path / "in.jsonl", n=10)
    argv = ["--input", str(corpus), "--output-prefix", str(tmp_path / "hf"), "--tokenizer-type",
            "HuggingFaceTokenizer", "--tokenizer-model", hf_tokenizer_dir]
    assert preprocess_data.main(argv) == 0
    assert "tokenizer backend: Hugging Face (--tokenizer-type HuggingFaceTokenizer)" in capsys.readouterr().out
    assert preprocess_data.main([*argv, "--tokenizer-backend", "gigatoken"]) == 2
    assert "--tokenizer-backend gigatoken: --tokenizer-type HuggingFaceTokenizer" in capsys.readouterr().err


def test_unsupported_normalizer_falls_back_or_refuses(tmp_path, capsys):
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.ParseFromString(LLAMA2.read_bytes())
    model.normalizer_spec.remove_extra_whitespaces = True
    other = tmp_path / "other.model"
    other.write_bytes(model.SerializeToString())
    corpus = hostile_corpus(tmp_path / "in.jsonl", n=10)
    assert run_data(tmp_path, corpus, "auto", model=other)[0] == 0
    assert "tokenizer backend: sentencepiece (gigatoken does not reproduce this model's encoding exactly: " \
           "remove_extra_whitespaces" in capsys.readouterr().out
    assert run_data(tmp_path, corpus, "gigatoken", model=other)[0] == 2


def _poisoned(monkeypatch, word):
    real = GigatokenEncoder.encode_array

    def encode_array(self, text):
        ids = real(self, text)
        return np.concatenate([ids, [29871]]) if word in text else ids

    monkeypatch.setattr(GigatokenEncoder, "encode_array", encode_array)


def test_difference_in_first_mb_refuses_the_fast_path(tmp_path, capsys, monkeypatch):
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in make_documents(20)] + [{"text": "zebra"}])
    _poisoned(monkeypatch, "zebra")
    assert run_data(tmp_path, corpus, "auto")[0] == 0
    assert "tokenizer backend: sentencepiece (checked before the run, gigatoken's ids differ from " \
           "SentencePiece's at token 3 of 3 for the text 'zebra'" in capsys.readouterr().out  # ▁z eb ra
    assert run_data(tmp_path, corpus, "gigatoken", name="explicit")[0] == 2
    assert not list(tmp_path.glob("explicit*"))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_difference_during_the_run_fails_before_commit(tmp_path, capsys, monkeypatch, workers):
    records = [{"text": t} for t in make_documents(60)]
    records[41] = {"text": "a zebra crossing"}
    corpus = write_jsonl(tmp_path / "in.jsonl", records)
    old = {tmp_path / f"gigatoken_text_document.{ext}": f"old {ext}".encode() for ext in ("bin", "idx")}
    for path, content in old.items():
        path.write_bytes(content)
    monkeypatch.setattr(tokenizer_backend, "START_CHECK_CHARS", 100)  # the start sees the first line only
    _poisoned(monkeypatch, "zebra")
    rc, _ = run_data(tmp_path, corpus, "gigatoken", "--workers", workers, "--tokenizer-check-fraction", "1")
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    n = len(Llama2Tokenizer(LLAMA2).tokenize_plain("a zebra crossing"))
    assert f"{corpus}:42: gigatoken's ids differ from SentencePiece's at token {n} of {n} for the text " \
           "'a zebra crossing'" in err
    assert "no output written" in err
    assert {p: p.read_bytes() for p in old} == old
    assert sorted(os.listdir(tmp_path)) == sorted(["in.jsonl", *(p.name for p in old)])


def test_orjson_and_json_read_the_same_records(tmp_path, monkeypatch):
    lines = [json.dumps({"text": t}).encode() for t in make_documents(30, seed=6)]
    lines += [b'{"text": "dup", "text": "last wins"}', b'{"text": "nan ok", "x": NaN}', b'{"text": "big", "n": '
              + b"9" * 30 + b"}", b'{"text": "half \\udc00 pair"}', b'{"text": "pair \\ud83e\\udd99 llama"}',
              b'{"text": "ok", "meta": "\\ud800"}', b'\xef\xbb\xbf{"text": "bom"}', b'{"text": "a\\u0000b"}',
              b'{"text": 1e400}', b"[1, 2]", b'{"text": "tab\there"}']
    corpus = write_jsonl(tmp_path / "in.jsonl", lines)
    runs = []
    for name, loads in (("orjson", record_encoder._orjson_loads), ("json", None)):
        monkeypatch.setattr(record_encoder, "_orjson_loads", loads)
        rc, prefix = run_data(tmp_path, corpus, "sentencepiece", "--max-reject-fraction", "1", name=name)
        assert rc == 0
        runs.append((output_bytes(f"{prefix}_text_document"), Path(f"{prefix}_rejected.jsonl").read_text()))
    assert record_encoder._orjson_loads is None or runs[0][0] == runs[1][0]
    assert [json.loads(r)["reason"] for r in runs[0][1].splitlines()] == \
        [json.loads(r)["reason"] for r in runs[1][1].splitlines()]
    reasons = [json.loads(r)["reason"] for r in runs[1][1].splitlines()]
    assert sum("lone surrogate" in r for r in reasons) == 2


def test_preprocess_sft_bytes_equal_sentencepiece_path(tmp_path, capsys):
    records = [{"messages": [{"role": "user", "content": f"Question {i}: what is <s>{t[:40]}</s>?"},
                             {"role": "assistant", "content": t}]} for i, t in enumerate(make_documents(40, seed=7))]
    records.append({"instruction": "Say \U0001f999 and \u4e2d\u6587", "output": "  spaced\tout \r\n"})
    corpus = write_jsonl(tmp_path / "chat.jsonl", records)
    outputs = []
    for backend in ("sentencepiece", "gigatoken"):
        prefix = tmp_path / backend
        rc = preprocess_sft.main(["--input", str(corpus), "--output-prefix", str(prefix), "--tokenizer-type",
                                  "Llama2Tokenizer", "--tokenizer-model", str(LLAMA2), "--seq-length", "512",
                                  "--tokenizer-backend", backend, "--tokenizer-check-fraction", "1"])
        assert rc == 0
        outputs.append([output_bytes(f"{prefix}_{name}_document") for name in ("text", "loss_mask")])
    out = capsys.readouterr().out
    assert "tokenizer backend: gigatoken" in out and "exactness: " in out and "s; all equal" in out
    assert outputs[0] == outputs[1]
