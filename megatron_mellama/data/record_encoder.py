"""Turns a block of JSONL lines into token arrays ready to write, as Megatron-LM's `Encoder.encode` does.

Per record and key: split into sentences (or not), `tokenizer.tokenize` each, drop empty sentences,
append EOD to the last sequence with `append_eod`. A record that cannot be used (bad UTF-8, bad JSON,
missing, non-string or empty text) is left out of every output and reported with its line number, as
is a line the reader dropped for exceeding --max-line-bytes (`Block.rejects`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from .jsonl_reader import Block


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


class RecordRejected(Exception):
    """A JSONL record that cannot be used; the message says why."""


def json_object(raw: bytes) -> dict:
    """One JSONL line as a JSON object, or RecordRejected naming what is wrong with it."""
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
    return record


class RecordEncoder:
    def __init__(self, tokenizer, json_keys, append_eod: bool, split, dtype):
        self.tokenize = tokenizer.tokenize
        self.eod = tokenizer.eod
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

    def _encode_text(self, text: str) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        lengths: list[int] = []
        for sentence in self.split(text):
            sentence_ids = self.tokenize(sentence)
            if sentence_ids:
                ids.extend(sentence_ids)
                lengths.append(len(sentence_ids))
        if ids and self.append_eod:
            ids.append(self.eod)
            lengths[-1] += 1
        return ids, lengths

    def encode_block(self, block: Block) -> BlockResult:
        per_key = [([], [], []) for _ in self.keys]  # tokens, sequence lengths, sequences per document
        result = BlockResult(block.file_index, {}, rejects=list(block.rejects), bytes=len(block.data))
        for offset, raw in enumerate(block.data.split(b"\n")):
            if not raw.strip():  # blank lines (a trailing newline, CRLF leftovers) are not records
                continue
            try:
                encoded = [self._encode_text(text) for text in self._texts(raw)]
            except RecordRejected as reason:
                result.rejects.append((block.first_line + offset, str(reason)))
                continue
            except UnicodeEncodeError:  # a JSON escape produced a lone surrogate
                result.rejects.append((block.first_line + offset, "text is not valid Unicode (lone surrogate)"))
                continue
            for (tokens, lengths, counts), (ids, sentence_lengths) in zip(per_key, encoded):
                tokens.extend(ids)
                lengths.extend(sentence_lengths)
                counts.append(len(sentence_lengths))
                result.tokens += len(ids)
            result.documents += 1
        for key, (tokens, lengths, counts) in zip(self.keys, per_key):
            result.outputs[key] = KeyOutput(np.array(tokens, dtype=self.dtype), np.array(lengths, dtype=np.int32),
                                            np.array(counts, dtype=np.int32))
        return result
