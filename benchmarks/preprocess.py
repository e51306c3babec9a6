"""Throughput and memory of tools/preprocess_data.py against the tokenizer alone.

    python benchmarks/preprocess.py                     # 50 MB corpus, 1 and 2 workers
    python benchmarks/preprocess.py --sizes-mb 50 500   # also 500 MB: memory must stay flat

For each size and worker count, runs the tool end to end as a subprocess (start-up included) and
samples the resident memory of it and its workers. The comparison is the limit: the same
tokenizer's `tokenize` over the same texts already in memory, on the same number of processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_mellama.data.tokenizer import Llama2Tokenizer  # noqa: E402

LIMIT_SAMPLE_BYTES = 50_000_000  # the limit is a rate; measuring it on more text changes nothing


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


def make_corpus(path: Path, size_mb: int, seed: int = 0) -> None:
    """English-like JSONL: documents of 2-40 sentences drawn from a Zipf-distributed vocabulary."""
    rng = np.random.default_rng(seed)
    sentences = _sentences(rng)
    target = size_mb * 1_000_000
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            lines = []
            for n in rng.integers(2, 40, size=100):
                picks = rng.integers(0, len(sentences), size=n)
                text = " ".join(sentences[i] for i in picks)
                lines.append(json.dumps({"text": text, "meta": {"source": "bench"}}) + "\n")
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


def _tree_rss(root: int) -> tuple[int, int]:
    """(sum, max) resident bytes over `root` and its descendants, from /proc."""
    children = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(pid))
    total = largest = 0
    todo = [root]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except OSError:
            continue
        total += rss
        largest = max(largest, rss)
    return total, largest


def run_tool(corpus: Path, model: str, workers: int, out_prefix: Path) -> dict:
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(corpus), "--output-prefix",
           str(out_prefix), "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", model,
           "--workers", str(workers), "--append-eod", "--log-interval", str(10**12)]
    peak = {"sum": 0, "max": 0}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sample():
        while proc.poll() is None:
            total, largest = _tree_rss(proc.pid)
            peak["sum"], peak["max"] = max(peak["sum"], total), max(peak["max"], largest)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"preprocess_data failed ({proc.returncode}): {err.strip()[-2000:]}")
    idx = Path(f"{out_prefix}_text_document.bin")
    tokens = idx.stat().st_size // 2
    return {"seconds": seconds, "tokens": tokens, "rss_sum": peak["sum"], "rss_max": peak["max"]}


def _limit_worker(corpus, model, first, stop, barrier, results) -> None:
    texts = []
    with open(corpus, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= stop:
                break
            if i >= first:
                texts.append(json.loads(line)["text"])
    tok = Llama2Tokenizer(model)
    barrier.wait()  # every process has its texts in memory before any clock starts
    start = time.perf_counter()
    tokens = sum(len(tok.tokenize(text)) + 1 for text in texts)  # + EOD, as the tool writes
    results.put((tokens, start, time.perf_counter()))


def tokenizer_limit(corpus: Path, model: str, workers: int) -> dict:
    """tokens/s of `tokenize` alone on texts already in memory, one process per shard."""
    lines, size = 0, 0
    with open(corpus, "rb") as f:
        for line in f:
            lines += 1
            size += len(line)
            if size >= LIMIT_SAMPLE_BYTES:
                break
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    cuts = np.linspace(0, lines, workers + 1).astype(int)
    procs = [ctx.Process(target=_limit_worker, args=(str(corpus), model, int(a), int(b), barrier, results))
             for a, b in zip(cuts[:-1], cuts[1:])]
    for p in procs:
        p.start()
    got = [results.get() for _ in procs]
    for p in procs:
        p.join()
    seconds = max(end for _, _, end in got) - min(start for _, start, _ in got)
    tokens = sum(t for t, _, _ in got)
    return {"tokens_per_s": tokens / seconds, "mb_per_s": size / 1e6 / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[50])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--tokenizer-model", help="an existing SentencePiece model instead of training one")
    ap.add_argument("--workdir", help="where corpora and outputs go (default: a temporary directory)")
    args = ap.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_preprocess_"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs; work directory {workdir}")
    model = args.tokenizer_model
    for size in args.sizes_mb:
        corpus = workdir / f"corpus_{size}mb.jsonl"
        if not corpus.exists():
            t = time.perf_counter()
            make_corpus(corpus, size)
            print(f"generated {corpus.name} ({corpus.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s")
        if model is None:
            t = time.perf_counter()
            model = train_tokenizer(corpus, workdir, args.vocab_size)
            print(f"trained a LLaMA-style BPE SentencePiece model, vocab {args.vocab_size}, "
                  f"in {time.perf_counter() - t:.0f} s")
        mb = corpus.stat().st_size / 1e6
        for workers in args.workers:
            # The limit is measured before and after the run and the faster taken: a shared or
            # virtual machine's speed drifts, and the drift must not flatter the ratio.
            before = tokenizer_limit(corpus, model, workers)
            res = run_tool(corpus, model, workers, workdir / f"out_{size}_{workers}")
            limit = max(before, tokenizer_limit(corpus, model, workers), key=lambda r: r["tokens_per_s"])
            tps = res["tokens"] / res["seconds"]
            print(f"{size} MB, {workers} worker(s): preprocess_data {mb / res['seconds']:.2f} MB/s, "
                  f"{tps / 1e6:.3f}M tokens/s ({res['tokens'] / 1e6:.1f}M tokens in {res['seconds']:.1f} s, start-up "
                  f"included); peak RSS {res['rss_sum'] / 2**20:.0f} MiB summed over processes "
                  f"(largest one {res['rss_max'] / 2**20:.0f} MiB) | limit, tokenizer alone on {workers} process(es): "
                  f"{limit['tokens_per_s'] / 1e6:.3f}M tokens/s ({limit['mb_per_s']:.2f} MB/s) | "
                  f"ratio {tps / limit['tokens_per_s']:.2f}", flush=True)
            for name in ("text_document.bin", "text_document.idx", "rejected.jsonl"):
                os.remove(workdir / f"out_{size}_{workers}_{name}")


if __name__ == "__main__":
    main()
