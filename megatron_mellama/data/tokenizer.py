"""The LLaMA2 SentencePiece tokenizer and a Hugging Face tokenizer behind one interface.

Semantics follow Megatron-LM's `_Llama2Tokenizer` and `_HuggingFaceTokenizer`, so token files written
here match the ones Megatron's `preprocess_data.py` writes for the same tokenizer.
"""

import os
from abc import ABC, abstractmethod

TOKENIZER_TYPES = ("Llama2Tokenizer", "HuggingFaceTokenizer")


class TokenizerError(ValueError):
    """A tokenizer that cannot be built; the message is one line naming the path or type."""


class Tokenizer(ABC):
    name: str

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def tokenize(self, text: str) -> list[int]: ...

    @abstractmethod
    def detokenize(self, ids) -> str: ...

    @property
    @abstractmethod
    def bos(self) -> int: ...

    @property
    @abstractmethod
    def eos(self) -> int: ...

    @property
    def eod(self) -> int:
        # Megatron separates documents with EOS for both tokenizer types.
        return self.eos

    @property
    @abstractmethod
    def pad(self) -> int: ...


def _int_or_missing(token_id) -> int:
    return -1 if token_id is None else int(token_id)


class Llama2Tokenizer(Tokenizer):
    name = "Llama2Tokenizer"

    def __init__(self, model_path: str):
        import sentencepiece

        model_path = os.fspath(model_path)
        expected = "expected a SentencePiece .model file"
        if not os.path.exists(model_path):
            raise TokenizerError(f"tokenizer model {model_path!r} does not exist ({expected})")
        if not os.path.isfile(model_path):
            raise TokenizerError(f"tokenizer model {model_path!r} is not a file ({expected})")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except Exception:
            # sentencepiece reports a C++ source location, not the cause; the path is what the user needs.
            raise TokenizerError(f"tokenizer model {model_path!r} could not be read as a SentencePiece model "
                                 f"({expected})") from None
        self._vocab_size = self._sp.vocab_size()

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def tokenize(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        # BOS first by default: Megatron's choice for text completion (not chat).
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects a str, got {type(text).__name__}")
        ids = self._sp.encode(text)
        if bos:
            ids = [self.bos] + ids
        if eos:
            ids = ids + [self.eos]
        return ids

    def detokenize(self, ids) -> str:
        return self._sp.decode_ids([int(i) for i in ids])

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def eos(self) -> int:
        return self._sp.eos_id()

    @property
    def pad(self) -> int:
        return self._sp.pad_id()


class HuggingFaceTokenizer(Tokenizer):
    name = "HuggingFaceTokenizer"

    def __init__(self, path: str):
        path = os.fspath(path)
        expected = "expected a local directory holding a Hugging Face tokenizer"
        # Checked before transformers sees it: anything else would be taken for a hub repo id.
        if not os.path.isdir(path):
            what = "is not a directory" if os.path.exists(path) else "does not exist"
            raise TokenizerError(f"tokenizer path {path!r} {what} ({expected})")
        if not os.listdir(path):
            raise TokenizerError(f"tokenizer directory {path!r} is empty ({expected})")
        import transformers

        try:
            self._tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as err:
            reason = " ".join(str(err).split())[:300] or type(err).__name__
            raise TokenizerError(f"no usable Hugging Face tokenizer in {path!r} ({expected}): {reason}") from None

    @property
    def vocab_size(self) -> int:
        # len() counts added tokens, which `tokenizer.vocab_size` leaves out.
        return len(self._tok)

    def tokenize(self, text: str) -> list[int]:
        return list(self._tok(text)["input_ids"])

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    @property
    def bos(self) -> int:
        return _int_or_missing(self._tok.bos_token_id)

    @property
    def eos(self) -> int:
        return _int_or_missing(self._tok.eos_token_id)

    @property
    def pad(self) -> int:
        return _int_or_missing(self._tok.pad_token_id)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str) -> Tokenizer:
    if tokenizer_type == "Llama2Tokenizer":
        return Llama2Tokenizer(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    raise TokenizerError(f"unknown tokenizer type {tokenizer_type!r} (expected one of {', '.join(TOKENIZER_TYPES)})")
