"""Turns a block of JSONL lines into token arrays ready to write, as Megatron-LM's `Encoder.encode` does.

Per record and key: split into sentences (or not), `tokenizer.tokenize` each, drop empty sentences,
append EOD to the last sequence with `append_eod`. A record that cannot be used (bad UTF-8, bad JSON,
missing, non-string or empty text) is left out of every output and reported with its line number, as
is a line the reader dropped for exceeding --max-line-bytes (`Block.rejects`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np

from .fast_tokenizer import TokenizerMismatch
from .jsonl_reader import Block, json_strings


@dataclass
class KeyOutput:
    tokens: np.ndarray
    sequence_lengths: np.ndarray  # int32, one per sequence
    document_sequence_counts: np.ndarray  # int32, one per document


@dataclass
class BlockResult:
    file_index: int
    outputs: dict[str, KeyOutput]
    rejects: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)
    documents: int = 0
    bytes: int = 0
    tokens: int = 0
    mismatch: tuple[int, str] | None = None  # (line number, difference) found by the sampled exactness check
    encoded: int = 0  # texts the fast tokenizer encoded, how many were re-encoded to check, in how long
    checked: int = 0
    check_seconds: float = 0.0


class RecordRejected(Exception):
    """A JSONL record that cannot be used; the message says why."""


try:  # the fast extra: parses bytes at several times json's speed; json stays the reference
    from orjson import JSONDecodeError as _OrjsonError, loads as _orjson_loads
except ImportError:
    _orjson_loads = None

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_object(raw: bytes) -> dict:
    """One JSONL line as a JSON object, or RecordRejected naming what is wrong with it.

    orjson's result is taken where it parses the line (it refuses NaN, lone surrogates, integers past
    64 bits); anything it refuses goes through json, so what is accepted and every reason are json's.
    A lone surrogate (from a JSON escape) anywhere in the record rejects it: no tokenizer can encode it.
    """
    if _orjson_loads is not None:
        try:
            record = _orjson_loads(raw)
        except _OrjsonError:
            pass
        else:
            if isinstance(record, dict):
                return record
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordRejected(f"invalid UTF-8 at byte {err.start}") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise RecordRejected(f"malformed JSON: {err.msg} at column {err.colno}") from None
    except RecursionError:
        raise RecordRejected("malformed JSON: nested too deeply") from None
    if not isinstance(record, dict):
        raise RecordRejected(f"not a JSON object but {type(record).__name__}")
    if _SURROGATE_ESCAPE.search(raw) and any(_SURROGATE.search(text) for text in json_strings(record)):
        raise RecordRejected("text is not valid Unicode (lone surrogate)")
    return record


class RecordEncoder:
    def __init__(self, tokenizer, json_keys, append_eod: bool, split, dtype):
        self.tokenize = tokenizer.tokenize_array
        self.encoder = tokenizer.encoder  # counts its sampled exactness checks when it is a CheckedEncoder
        self.eod = np.array([tokenizer.eod], dtype=np.int64)
        self.keys = list(json_keys)
        self.append_eod = append_eod
        self.split = split
        self.dtype = dtype

    def _texts(self, raw: bytes) -> list[str]:
        record = json_object(raw)
        texts = []
        for key in self.keys:
            if key not in record:
                raise RecordRejected(f"missing key {key!r}")
            text = record[key]
            if not isinstance(text, str):
                raise RecordRejected(f"key {key!r} holds {type(text).__name__}, not a string")
            if not text.strip():
                raise RecordRejected(f"empty document under key {key!r}")
            texts.append(text)
        return texts

    def _encode_text(self, text: str) -> tuple[list[np.ndarray], list[int]]:
        # Arrays, never lists of ints: turning a fast tokenizer's ids into Python ints costs more
        # than encoding them.
        chunks: list[np.ndarray] = []
        lengths: list[int] = []
        for sentence in self.split(text):
            sentence_ids = self.tokenize(sentence)
            if len(sentence_ids):
                chunks.append(sentence_ids)
                lengths.append(len(sentence_ids))
        if chunks and self.append_eod:
            chunks.append(self.eod)
            lengths[-1] += 1
        return chunks, lengths

    def encode_block(self, block: Block) -> BlockResult:
        per_key = [([], [], []) for _ in self.keys]  # token arrays, sequence lengths, sequences per document
        result = BlockResult(block.file_index, {}, rejects=list(block.rejects), bytes=len(block.data))
        for offset, raw in enumerate(block.data.split(b"\n")):
            if not raw.strip():  # blank lines (a trailing newline, CRLF leftovers) are not records
                continue
            try:
                encoded = [self._encode_text(text) for text in self._texts(raw)]
            except RecordRejected as reason:
                result.rejects.append((block.first_line + offset, str(reason)))
                continue
            except TokenizerMismatch as err:  # the run fails on it, naming this line
                result.mismatch = (block.first_line + offset, str(err))
                break
            for (tokens, lengths, counts), (chunks, sentence_lengths) in zip(per_key, encoded):
                tokens.extend(chunks)
                lengths.extend(sentence_lengths)
                counts.append(len(sentence_lengths))
                result.tokens += sum(sentence_lengths)
            result.documents += 1
        for key, (tokens, lengths, counts) in zip(self.keys, per_key):
            flat = np.concatenate(tokens).astype(self.dtype, copy=False) if tokens else np.zeros(0, self.dtype)
            result.outputs[key] = KeyOutput(flat, np.array(lengths, dtype=np.int32), np.array(counts, dtype=np.int32))
        if hasattr(self.encoder, "take_counts"):
            result.encoded, result.checked, result.check_seconds = self.encoder.take_counts()
        return result
