"""gigatoken's encoder for a SentencePiece BPE model: SentencePiece's ids, several times faster, checked.

gigatoken (`pip install -e ".[fast]"`, pinned: its converter sits in a private module) rebuilds the
model as a tokenizer.json. Two changes make its ids SentencePiece's own:
- the control pieces (`<s>`, `</s>`) leave its added tokens: SentencePiece never reads them from text,
  gigatoken would (Megatron-LM's `preprocess_data_fast.py` turns a literal "<s>" in a document into BOS);
- its word cache, which in 0.10.0 grows with every distinct word, is dropped (the tokenizer rebuilt)
  whenever the process has grown by CACHE_LIMIT_BYTES since the first build.

Nothing is assumed: `start_check` compares the ids of `hostile_strings()` and of the input's first million
characters of text with SentencePiece's before any work, and `CheckedEncoder` re-encodes a random share of the texts
with SentencePiece during the run; a difference raises TokenizerMismatch.
"""

from __future__ import annotations

import json
import os
import random
import time
import unicodedata

import numpy as np

from ..errors import MellamaError

GIGATOKEN_VERSION = "0.10.0"
CACHE_LIMIT_BYTES = 128 << 20
RSS_CHECK_CHARS = 1 << 20  # the process size is read once per this much text (about 10 us), not per document
START_CHECK_CHARS = 1_000_000  # of the input's text, from its start
CHECK_FRACTION = 0.01


class TokenizerMismatch(MellamaError):
    """The fast encoder's ids differ from SentencePiece's; the message shows where."""


def unsupported_reason(model_proto: bytes) -> str | None:
    """Why gigatoken would not reproduce this model's encoding, or None. LLaMA-2's settings (BPE,
    byte fallback, identity normalization, extra whitespace kept) are the ones checked exactly."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.ParseFromString(model_proto)
    t, n = model.trainer_spec, model.normalizer_spec
    if t.model_type != pb.TrainerSpec.BPE:
        return f"model type {pb.TrainerSpec.ModelType.Name(t.model_type)}, not BPE"
    if not t.byte_fallback:
        return "no byte fallback"
    if n.precompiled_charsmap or n.name not in ("identity", ""):
        return f"normalizer {n.name or 'custom'!r} (gigatoken reproduces 'identity', LLaMA-2's, exactly)"
    if n.remove_extra_whitespaces:
        return "remove_extra_whitespaces is on (gigatoken strips leading tabs, newlines and ideographic spaces too)"
    if not n.escape_whitespaces or t.treat_whitespace_as_suffix:
        return "whitespace handling other than LLaMA-2's"
    if any(p.type == pb.ModelProto.SentencePiece.USER_DEFINED for p in model.pieces):
        return "user-defined pieces"
    return None


def gigatoken_json(model_proto: bytes) -> str:
    """The tokenizer.json gigatoken builds from the model, without its control pieces as added tokens."""
    from gigatoken._load.sentencepiece import sentencepiece_to_tokenizer_json

    spec = json.loads(sentencepiece_to_tokenizer_json(model_proto))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["special"]]
    return json.dumps(spec, ensure_ascii=False)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0  # no /proc: the limit below is then counted in text instead


def _return_free_memory() -> None:
    """glibc keeps a freed cache's pages (its heap is fragmented by the arrays allocated among the
    cache's words); malloc_trim hands them back, so the size after a rebuild is the size before the cache."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline below moves up instead
        pass


class GigatokenEncoder:
    name = "gigatoken"

    def __init__(self, spec_json: str, cache_limit_bytes: int = CACHE_LIMIT_BYTES):
        self.spec_json, self.cache_limit = spec_json, cache_limit_bytes
        self.rebuilds = 0
        self._build()

    def _build(self) -> None:
        import gigatoken

        self._backend = None  # the old cache goes before the new tokenizer is built
        if self.rebuilds:
            _return_free_memory()
        self._backend = gigatoken.Tokenizer.from_json(self.spec_json)
        self._chars = 0
        rss = _rss_bytes()
        # The limit counts from the size after the first build; only when a rebuild cannot bring the
        # process back near it (memory the allocator keeps) does the baseline move up, so a rebuild
        # is never followed by another at once.
        if self.rebuilds == 0 or rss > self._base_rss + self.cache_limit // 2:
            self._base_rss = rss

    def encode_array(self, text: str) -> np.ndarray:
        ids = self._backend.encode(text)
        self._chars += len(text)
        if self._chars >= RSS_CHECK_CHARS:
            self._bound_cache()
        return ids

    def _bound_cache(self) -> None:
        rss = _rss_bytes()
        grown = rss - self._base_rss if rss else self._chars * 8  # about 8 bytes of cache per new char
        if grown > self.cache_limit:
            self.rebuilds += 1
            self._build()
        elif rss:
            self._chars = 0

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()


def difference(text: str, expected, got) -> str | None:
    """None when `got` (an array) holds SentencePiece's `expected` ids, else where and how they differ."""
    if len(expected) == len(got) and np.array_equal(got, expected):
        return None
    expected, got = list(expected), [int(i) for i in got]
    at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    excerpt = text if len(text) <= 60 else text[:60] + "..."
    return (f"gigatoken's ids differ from SentencePiece's at token {at} of {len(expected)} for the text "
            f"{excerpt!r} (SentencePiece {expected[max(at - 2, 0):at + 3]}, gigatoken {got[max(at - 2, 0):at + 3]})")


class CheckedEncoder:
    """The fast encoder, with `fraction` of its calls re-encoded by SentencePiece and compared."""

    def __init__(self, fast, sp, fraction: float = CHECK_FRACTION, seed: int | None = None):
        self.fast, self.reference, self.fraction = fast, sp.encode, fraction
        self.name = fast.name
        self._random = random.Random(seed).random
        self.checked = self.calls = 0
        self.seconds = 0.0  # spent re-encoding: the check's cost, reported by the run

    def encode_array(self, text: str) -> np.ndarray:
        ids = self.fast.encode_array(text)
        self.calls += 1
        if self.fraction and self._random() < self.fraction:
            self.checked += 1
            start = time.perf_counter()
            expected = self.reference(text)
            self.seconds += time.perf_counter() - start
            found = difference(text, expected, ids)
            if found:
                raise TokenizerMismatch(found)
        return ids

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def take_counts(self) -> tuple[int, int, float]:
        """(calls, checked, seconds spent checking) since the last take."""
        counts = self.calls, self.checked, self.seconds
        self.calls = self.checked = 0
        self.seconds = 0.0
        return counts


def hostile_strings() -> list[str]:
    """Text where a fast re-implementation of SentencePiece most likely goes wrong; fixed, so a
    refusal is reproducible."""
    specials = ["<s>", "</s>", "<unk>", "<pad>", "<s></s>", "a<s>b", " </s> ", "<0x0A>", "<0xFF>", "▁", "▁▁x",
                "\u2047", "<CLS>", "<EOD>", "<|endoftext|>", "[INST]", "<<SYS>>"]
    controls = [f"x{chr(c)}y" for c in [*range(32), 127, *range(0x80, 0xA0)]] + ["\x00", "a\x00", "\x00\x00b"]
    spaces = ["", " ", "  ", "   x", "x   ", " x ", "\t", "\tx\t", "\n", "\n\n", "x\n", "\r\n", "a\r\nb", "\u00a0",
              "a\u00a0b", "\u3000x", "\u2028", "\u200b", "a\u200db", "\ufeffx", "x\u200e"]
    scripts = ["Hello world", "Äpfel Ölkäfer straße", "naïve café résumé", "e\u0301e\u0300", "\u1e9b\u0323",
               "ﬁ ﬂ ①②③ ＡＢＣ １２３", "Ⅻ ㎏ ㍻", "中文的句子，还有标点。", "日本語のテキストです", "한국어 문장",
               "Русский текст", "Ελληνικά", "עברית טקסט", "العربية نص", "हिन्दी पाठ", "ไทย ภาษา",
               "🦙🦙 emoji 👩‍👩‍👧 🇫🇷 ✔️", "\U0001f600\U0001f600\U0001f600", "\ue000\uf8ff", "\U000f0000",
               "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ǅ ǈ ǋ", "İstanbul ı", "x" * 5000, "ab" * 2500, " " * 300, "\n" * 300, "1234567890" * 50,
               "3.14159 -2e10 0x1F 1,000,000", "http://example.com/a?b=c&d=e#f", "def f(x):\n    return x**2\n",
               "{\"json\": [1, 2, 3]}", "<html><body>a &amp; b</body></html>", "a" + "\u0301" * 40,
               "word" + "\u200b" * 10 + "word"]
    rng = random.Random(0)
    pools = [(0x20, 0x7e), (0xa0, 0x24f), (0x370, 0x3ff), (0x400, 0x4ff), (0x590, 0x6ff), (0x900, 0x97f),
             (0x3040, 0x30ff), (0x4e00, 0x9fff), (0xac00, 0xd7a3), (0x1f300, 0x1faff), (0x0, 0x1f), (0x2000, 0x206f)]
    drawn = []
    for _ in range(400):
        chars = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(pools)
            c = chr(rng.randint(lo, hi))
            chars.append(" " if unicodedata.category(c) == "Cs" else c)
        drawn.append("".join(chars))
    return specials + controls + spaces + scripts + drawn


def start_check(fast, sp, texts) -> str | None:
    """The first difference between `fast` and SentencePiece on `hostile_strings()` and `texts`, or None."""
    for text in [*hostile_strings(), *texts]:
        found = difference(text, sp.encode(text), fast.encode_array(text))
        if found:
            return found
    return None
