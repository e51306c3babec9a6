import os

import pytest
import sentencepiece as spm

from megatron_mellama.data.tokenizer import (TOKENIZER_TYPES, HuggingFaceTokenizer, Llama2Tokenizer, Tokenizer,
                                             TokenizerError, build_tokenizer)

TEXTS = [
    "The patient was treated with a large dose.",
    "clinical  trial\nresults (2019): 42 patients",
    "Médecin: le cœur du patient — 心臓病 🙂",
    "tabs\tand trailing space ",
    "x",
    "",
]


@pytest.fixture(scope="module")
def sp(sentencepiece_model):
    return spm.SentencePieceProcessor(model_file=sentencepiece_model)


@pytest.fixture(scope="module")
def llama(sentencepiece_model):
    return Llama2Tokenizer(sentencepiece_model)


@pytest.fixture(scope="module")
def hf(hf_tokenizer_dir):
    return HuggingFaceTokenizer(hf_tokenizer_dir)


def test_llama2_special_ids_and_vocab(llama, sp):
    assert isinstance(llama, Tokenizer) and llama.name == "Llama2Tokenizer"
    assert (llama.bos, llama.eos, llama.eod, llama.pad) == (1, 2, 2, -1)
    assert llama.vocab_size == sp.vocab_size() == 400


@pytest.mark.parametrize("text", TEXTS)
def test_llama2_bos_first_and_round_trip(llama, sp, text):
    ids = llama.tokenize(text)
    assert ids[0] == llama.bos and ids[1:] == sp.encode(text)
    assert llama.bos not in ids[1:] and llama.eos not in ids
    assert llama.detokenize(ids[1:]) == text
    assert all(0 <= i < llama.vocab_size for i in ids)


def test_llama2_non_ascii_uses_byte_fallback(llama, sp):
    ids = llama.tokenize("心臓病 🙂")[1:]
    assert any(sp.is_byte(i) for i in ids) and sp.unk_id() not in ids


def test_llama2_bos_eos_flags(llama, sp):
    body = sp.encode("the heart")
    assert llama.tokenize("the heart", bos=False) == body
    assert llama.tokenize("the heart", bos=False, eos=True) == body + [2]
    assert llama.tokenize("the heart", eos=True) == [1] + body + [2]


def test_llama2_detokenize_accepts_non_list_ids(llama):
    import torch
    ids = llama.tokenize("the heart")[1:]
    assert llama.detokenize(torch.tensor(ids)) == llama.detokenize(tuple(ids)) == "the heart"


def test_llama2_rejects_non_str(llama):
    with pytest.raises(TypeError):
        llama.tokenize(b"bytes")


def test_hf_matches_llama2(hf, llama):
    assert isinstance(hf, Tokenizer) and hf.name == "HuggingFaceTokenizer"
    assert hf.vocab_size == llama.vocab_size
    assert (hf.bos, hf.eos, hf.eod, hf.pad) == (llama.bos, llama.eos, llama.eod, -1)
    for text in TEXTS:
        assert hf.tokenize(text) == llama.tokenize(text), text
        assert hf.detokenize(hf.tokenize(text)[1:]) == text


def test_build_tokenizer_dispatch(sentencepiece_model, hf_tokenizer_dir):
    assert set(TOKENIZER_TYPES) == {"Llama2Tokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer"}
    assert type(build_tokenizer("Llama2Tokenizer", sentencepiece_model)) is Llama2Tokenizer
    assert type(build_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir)) is HuggingFaceTokenizer


def _one_line_error(call, *needles):
    with pytest.raises(TokenizerError) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg and info.value.__cause__ is None
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_error_missing_model_file(tmp_path):
    path = str(tmp_path / "nope.model")
    msg = _one_line_error(lambda: build_tokenizer("Llama2Tokenizer", path), repr(path), "does not exist")
    assert "SentencePiece" in msg


def test_error_not_a_sentencepiece_model(tmp_path):
    path = tmp_path / "bogus.model"
    path.write_text("this is not a protobuf\n")
    _one_line_error(lambda: Llama2Tokenizer(str(path)), repr(str(path)), "SentencePiece")


def test_error_directory_given_as_model(tmp_path):
    _one_line_error(lambda: Llama2Tokenizer(str(tmp_path)), repr(str(tmp_path)), "not a file")


def test_error_hf_empty_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(lambda: build_tokenizer("HuggingFaceTokenizer", str(empty)), repr(str(empty)), "empty")


def test_error_hf_directory_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    _one_line_error(lambda: HuggingFaceTokenizer(str(tmp_path)), repr(str(tmp_path)), "Hugging Face tokenizer")


def test_error_hf_missing_directory_never_reaches_hub(tmp_path, monkeypatch):
    # A hub-style id must not be looked up: it is just a path that does not exist.
    monkeypatch.chdir(tmp_path)
    _one_line_error(lambda: HuggingFaceTokenizer("meta-llama/Llama-2-7b-hf"), "'meta-llama/Llama-2-7b-hf'",
                    "does not exist")


def test_error_hf_given_a_file(sentencepiece_model):
    _one_line_error(lambda: HuggingFaceTokenizer(sentencepiece_model), repr(sentencepiece_model),
                    "not a directory")


def test_error_unknown_type(sentencepiece_model):
    msg = _one_line_error(lambda: build_tokenizer("GPT2BPETokenizer", sentencepiece_model), "'GPT2BPETokenizer'")
    assert all(t in msg for t in TOKENIZER_TYPES)


@pytest.mark.slow
def test_module_imports_without_transformers():
    import subprocess
    import sys
    code = ("import sys; import megatron_mellama.data.tokenizer; "
            "assert 'transformers' not in sys.modules, 'transformers imported eagerly'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
