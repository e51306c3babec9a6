"""Rebuilds `tokenizer.model` (LLaMA-2's SentencePiece tokenizer) from llama.cpp's vocabulary file.

    python tests/data/llama2_tokenizer/build_tokenizer_model.py ggml-vocab-llama-spm.gguf

No model hub is reachable where the tests run, but llama-cpp-python's source distribution carries
llama.cpp's `models/ggml-vocab-llama-spm.gguf`: LLaMA's 32,000 pieces with their scores and types.
This script reads that GGUF file (its header and key-value section only; it has no tensors) and
writes a SentencePiece model with LLaMA-2's trainer and normalizer settings (BPE, byte fallback,
identity normalization, a dummy prefix, extra whitespace kept). See PROVENANCE.md for the source
file's checksum and the check the result passes.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys

GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str) -> dict:
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"GGUF":
        raise SystemExit(f"{path}: not a GGUF file (magic {data[:4]!r})")
    version, _tensors, kv_count = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise SystemExit(f"{path}: GGUF version {version}; expected 2 or later")
    pos = 24

    def value(kind):
        nonlocal pos
        if kind in GGUF_SCALARS:
            fmt = GGUF_SCALARS[kind]
            (v,) = struct.unpack_from(fmt, data, pos)
            pos += struct.calcsize(fmt)
            return v
        if kind == GGUF_STRING:
            (n,) = struct.unpack_from("<Q", data, pos)
            pos += 8 + n
            return data[pos - n:pos].decode("utf-8")
        if kind == GGUF_ARRAY:
            item_kind, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            return [value(item_kind) for _ in range(n)]
        raise SystemExit(f"{path}: unknown GGUF value type {kind} at byte {pos}")

    meta = {}
    for _ in range(kv_count):
        key = value(GGUF_STRING)
        (kind,) = struct.unpack_from("<I", data, pos)
        pos += 4
        meta[key] = value(kind)
    return meta


def build_model(meta: dict) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as pb

    if meta.get("tokenizer.ggml.model") != "llama":
        raise SystemExit(f"tokenizer.ggml.model is {meta.get('tokenizer.ggml.model')!r}, expected 'llama'")
    pieces, scores, types = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    model = pb.ModelProto()
    for piece, score, kind in zip(pieces, scores, types):
        # GGUF's token types are SentencePiece's piece types, numbered alike (1 normal ... 6 byte).
        model.pieces.add(piece=piece, score=score, type=kind)
    t = model.trainer_spec  # LLaMA-2's published tokenizer.model settings
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = len(pieces)
    t.byte_fallback = True
    t.split_digits = True
    t.max_sentencepiece_length = 16
    t.character_coverage = 0.99995
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = (meta["tokenizer.ggml.unknown_token_id"],
                                              meta["tokenizer.ggml.bos_token_id"],
                                              meta["tokenizer.ggml.eos_token_id"], -1)
    t.unk_surface = " \u2047 "
    n = model.normalizer_spec
    n.name = "identity"
    n.precompiled_charsmap = b""
    n.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    return model.SerializeToString()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf", help="llama.cpp's models/ggml-vocab-llama-spm.gguf")
    ap.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer.model"))
    args = ap.parse_args()
    blob = build_model(read_gguf_metadata(args.gguf))
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=blob)
    got = sp.encode("Hello world")
    if got != [15043, 3186]:
        raise SystemExit(f"'Hello world' encodes as {got}, not LLaMA-2's [15043, 3186]; nothing written")
    tmp = args.output + ".tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, args.output)
    print(f"wrote {args.output} ({len(blob)} bytes, {sp.vocab_size()} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
