"""The LLaMA2 SentencePiece tokenizer and a Hugging Face tokenizer behind one interface.

Semantics follow Megatron-LM's `_Llama2Tokenizer` and `_HuggingFaceTokenizer`, so token files written
here match the ones Megatron's `preprocess_data.py` writes for the same tokenizer.
"""

import os
from abc import ABC, abstractmethod

import numpy as np

from ..errors import MellamaError

TOKENIZER_TYPES = ("Llama2Tokenizer", "HuggingFaceTokenizer", "SentencePieceTokenizer")


class TokenizerError(MellamaError, ValueError):
    """A tokenizer that cannot be built; the message is one line naming the path or type."""


class Tokenizer(ABC):
    name: str
    encoder = None  # what turns plain text into ids; SentencePiece tokenizers can swap in a faster one

    def use_encoder(self, encoder) -> None:
        """Encode plain text with `encoder` (`encode` -> list, `encode_array` -> array), which must give
        SentencePiece's ids: `fast_tokenizer` checks the one it offers."""
        self.encoder = encoder

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def tokenize(self, text: str) -> list[int]: ...

    @abstractmethod
    def detokenize(self, ids) -> str: ...

    def tokenize_array(self, text: str) -> np.ndarray:
        """`tokenize` as an integer array (the preprocessing tools' form)."""
        return np.asarray(self.tokenize(text), dtype=np.int64)

    @abstractmethod
    def tokenize_plain(self, text: str) -> list[int]:
        """`text` as plain text: no special token added, none parsed from special-token strings
        in it ("<s>" is three ordinary characters), as Meta's chat code encodes message text."""

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


class SentencePieceEncoder:
    """SentencePiece's own encode: the reference every other encoder is held to."""

    name = "sentencepiece"

    def __init__(self, sp):
        self.encode = sp.encode

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)


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
        self.model_path = model_path
        self._bos_array = np.array([self._sp.bos_id()], dtype=np.int64)
        self.use_encoder(SentencePieceEncoder(self._sp))

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def tokenize(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        # BOS first by default: Megatron's choice for text completion (not chat).
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects a str, got {type(text).__name__}")
        ids = self.encoder.encode(text)
        if bos:
            ids = [self.bos] + ids
        if eos:
            ids = ids + [self.eos]
        return ids

    def tokenize_array(self, text: str) -> np.ndarray:
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects a str, got {type(text).__name__}")
        return np.concatenate((self._bos_array, self.encoder.encode_array(text)))

    def detokenize(self, ids) -> str:
        return self._sp.decode_ids([int(i) for i in ids])

    def tokenize_plain(self, text: str) -> list[int]:
        return self.encoder.encode(text)  # SentencePiece never reads control symbols from the text

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

    def tokenize_plain(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    @property
    def bos(self) -> int:
        return _int_or_missing(self._tok.bos_token_id)

    @property
    def eos(self) -> int:
        return _int_or_missing(self._tok.eos_token_id)

    @property
    def pad(self) -> int:
        return _int_or_missing(self._tok.pad_token_id)


class SentencePieceTokenizer(Tokenizer):
    """Megatron-LM's `_SentencePieceTokenizer`: the model's vocabulary plus Megatron's special tokens.

    <CLS> <SEP> <EOD> <MASK> (and <PAD>/<BOS>/<EOS> when the model has no such piece) get ids after the
    model's vocabulary, in Megatron's order, so ids match files Megatron wrote with this tokenizer type.
    Special-token text inside a document maps to its id; no BOS is added.
    """

    name = "SentencePieceTokenizer"

    def __init__(self, model_path: str, vocab_extra_ids: int = 0):
        # Reuses Llama2Tokenizer's checks so a bad path fails with the same one-line message.
        self._sp = Llama2Tokenizer(model_path)._sp
        self.model_path = os.fspath(model_path)
        self.use_encoder(SentencePieceEncoder(self._sp))
        self._vocab = {self._sp.id_to_piece(i): i for i in range(self._sp.vocab_size())}
        self._inv_vocab = {i: t for t, i in self._vocab.items()}
        self._special_tokens = {}
        for token in ("<CLS>", "<SEP>", "<EOD>", "<MASK>"):
            self._add_special_token(token)
        self._cls_id, self._sep_id, self._eod_id, self._mask_id = (
            self._vocab[t] for t in ("<CLS>", "<SEP>", "<EOD>", "<MASK>"))
        self._pad_id = self._add_special_token(self._piece_or(self._sp.pad_id(), "<PAD>"))
        self._bos_id = self._add_special_token(self._piece_or(self._sp.bos_id(), "<BOS>"))
        self._eos_id = self._add_special_token(self._piece_or(self._sp.eos_id(), "<EOS>"))
        for i in range(vocab_extra_ids):
            self._add_special_token(f"<extra_id_{i}>")
        self._inv_special_tokens = {i: t for t, i in self._special_tokens.items()}

    def _piece_or(self, piece_id: int, fallback: str) -> str:
        try:
            return self._sp.id_to_piece(piece_id)
        except IndexError:  # the model has no such token (id -1)
            return fallback

    def _add_special_token(self, token: str) -> int:
        if token not in self._vocab:
            next_id = len(self._vocab)
            self._vocab[token] = next_id
            self._inv_vocab[next_id] = token
        self._special_tokens[token] = self._vocab[token]
        return self._vocab[token]

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def tokenize(self, text: str) -> list[int]:
        ids = []
        for part in self._parts(text):
            if isinstance(part, str):
                ids.extend(self.encoder.encode(part))
            else:
                ids.append(part)
        return ids

    def tokenize_array(self, text: str) -> np.ndarray:
        parts = [self.encoder.encode_array(p) if isinstance(p, str) else np.array([p], dtype=np.int64)
                 for p in self._parts(text)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _parts(self, text: str) -> list:
        """`text` cut at Megatron's special-token strings: the texts between them, and their ids."""
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects a str, got {type(text).__name__}")
        parts, start = [], 0
        while True:
            # The earliest special token wins; ties go to the first added, as in Megatron.
            best, best_at = None, -1
            for token in self._special_tokens:
                at = text.find(token, start)
                if at >= 0 and (best is None or at < best_at):
                    best, best_at = token, at
            if best is None:
                break
            parts += [text[start:best_at], self._special_tokens[best]]
            start = best_at + len(best)
        parts.append(text[start:] if start else text)
        return parts

    def tokenize_plain(self, text: str) -> list[int]:
        return self.encoder.encode(text)  # Megatron's special tokens (<EOD>, <s>, ...) stay text here

    def detokenize(self, ids) -> str:
        ids = [int(i) for i in ids]
        text, last = "", 0
        for i, token_id in enumerate(ids):
            if token_id in self._inv_special_tokens:
                text += self._sp.decode_ids(ids[last:i]) + " " + self._inv_special_tokens[token_id]
                last = i + 1
        return text + self._sp.decode_ids(ids[last:])

    @property
    def bos(self) -> int:
        return self._bos_id

    @property
    def eos(self) -> int:
        return self._eos_id

    @property
    def eod(self) -> int:
        return self._eod_id

    @property
    def pad(self) -> int:
        return self._pad_id

    @property
    def cls(self) -> int:
        return self._cls_id

    @property
    def sep(self) -> int:
        return self._sep_id

    @property
    def mask(self) -> int:
        return self._mask_id


def build_tokenizer(tokenizer_type: str, tokenizer_model: str) -> Tokenizer:
    if tokenizer_type == "Llama2Tokenizer":
        return Llama2Tokenizer(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    raise TokenizerError(f"unknown tokenizer type {tokenizer_type!r} (expected one of {', '.join(TOKENIZER_TYPES)})")
