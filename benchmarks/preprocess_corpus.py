"""The generated corpora of benchmarks/preprocess.py, and a tokenizer trained on one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def _word_pool(rng, n=6000) -> list[str]:
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0,
                     1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1])
    freq /= freq.sum()
    words = {"".join(rng.choice(letters, size=rng.integers(2, 11), p=freq)) for _ in range(n)}
    return sorted(words) + "the of and to in is was for with on by as at from that this".split()


def _sentences(rng, n=60000) -> list[str]:
    words = _word_pool(rng)
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    out = []
    for _ in range(n):
        picked = [words[i] for i in rng.choice(len(words), size=rng.integers(5, 25), p=zipf)]
        if rng.random() < 0.3:
            picked.insert(int(rng.integers(len(picked))), str(rng.integers(1, 2025)))
        out.append(" ".join(picked).capitalize() + str(rng.choice([".", ".", ".", "?", "!"])))
    return out


SPECIAL_TEXT_EVERY = 100  # one document in this many carries a literal "<s>" or "</s>"


def make_corpus(path: Path, size_mb: int, seed: int = 0) -> None:
    """English-like JSONL: documents of 2-40 sentences drawn from a Zipf-distributed vocabulary.

    Every SPECIAL_TEXT_EVERY-th document (the 50th, 150th, ...) has the text "<s>" or "</s>" (in turn)
    between two of its sentences: SentencePiece encodes it as the characters it is, a tokenizer that
    reads special tokens from text (Megatron-LM's preprocess_data_fast.py) as BOS/EOS."""
    rng = np.random.default_rng(seed)
    sentences = _sentences(rng)
    target = size_mb * 1_000_000
    written = docs = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            lines = []
            for n in rng.integers(2, 40, size=100):
                picks = rng.integers(0, len(sentences), size=n)
                parts = [sentences[i] for i in picks]
                if docs % SPECIAL_TEXT_EVERY == SPECIAL_TEXT_EVERY // 2:
                    parts.insert(len(parts) // 2, "</s>" if docs // SPECIAL_TEXT_EVERY % 2 else "<s>")
                docs += 1
                text = " ".join(parts)
                lines.append(json.dumps({"text": text, "meta": {"source": "bench"}}) + "\n")
            chunk = "".join(lines)
            f.write(chunk)
            written += len(chunk)


def make_distinct_words_corpus(path: Path, size_mb: int, seed: int = 0) -> None:
    """JSONL whose words never repeat: 7 lowercase letters each, the base-26 digits of an affine
    bijection of a counter (so distinct, and random-looking), 50-2000 words a document. 50 MB is
    about 6 million distinct words: a per-word cache grows with every one of them."""
    rng = np.random.default_rng(seed)
    space = 26 ** 7
    mult, shift = 2_654_435_761, int(rng.integers(space))  # a prime below 26**7: coprime to it, a bijection
    target = size_mb * 1_000_000
    written = counter = 0
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            n = 200_000
            ids = (np.arange(counter, counter + n, dtype=np.int64) * mult + shift) % space
            counter += n
            digits = np.empty((n, 8), dtype=np.uint8)
            for k in range(7):
                digits[:, k] = letters[ids % 26]
                ids //= 26
            digits[:, 7] = ord(" ")
            words = digits.tobytes().decode("ascii")
            lines, pos = [], 0
            while pos < n:
                take = int(rng.integers(50, 2000))
                lines.append(json.dumps({"text": words[pos * 8:(pos + take) * 8 - 1]}) + "\n")
                pos += take
            chunk = "".join(lines)
            f.write(chunk)
            written += len(chunk)


def train_tokenizer(corpus: Path, out_dir: Path, vocab_size: int) -> str:
    import sentencepiece as spm

    sample = out_dir / "sp_sample.txt"
    with open(corpus, encoding="utf-8") as src, open(sample, "w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            if i >= 3000:
                break
            # one sentence per line: SentencePiece skips lines over 4192 bytes
            dst.write(json.loads(line)["text"].replace(". ", ".\n") + "\n")
    prefix = out_dir / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(sample), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        input_sentence_size=200000, shuffle_input_sentence=True, num_threads=os.cpu_count(), minloglevel=2)
    return f"{prefix}.model"
