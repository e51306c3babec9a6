"""tools/preprocess_data.py's SentencePiece and gigatoken backends against Megatron-LM's own tools.

    python benchmarks/preprocess.py --megatron-lm DIR      # 50 MB corpus, 1 and 2 workers, memory run
    python benchmarks/preprocess.py                        # the same without Megatron-LM's tools
    python benchmarks/preprocess.py --train-tokenizer      # an 8,000-piece model trained on the corpus

On one corpus (make_corpus: English-like, a literal "<s>" or "</s>" in 1% of the documents) and for
each worker count, runs end to end as subprocesses (start-up included), sampling the resident memory
of each and its children every 50 ms:
  (1) this tool, --tokenizer-backend sentencepiece
  (2) this tool, --tokenizer-backend gigatoken (the default --tokenizer-check-fraction 0.01)
  (3) this tool, gigatoken with --tokenizer-check-fraction 0: (2 - 3) / 2 is the check's share
  (4) Megatron-LM's tools/preprocess_data.py, --tokenizer-type Llama2Tokenizer, same flags
  (5) Megatron-LM's tools/preprocess_data_fast.py (gigatoken through megatron.core.tokenizers); it
      cannot take a SentencePiece model (see benchmarks/megatron_preprocess.py), so it runs with
      --tokenizer-type HuggingFaceTokenizer --use-gigatoken over a tokenizer.json built from the same
      model, its thread pool held to the worker count (RAYON_NUM_THREADS)
and prints wall time and peak RSS with ratios against (4) and (1). The ids: (1), (2) and (3) must be
byte-identical (asserted); (4) and (5) are compared with (1) document by document (this tool writes
BOS first in each document, Megatron-LM's tools do not: that BOS is set aside). Then the memory run:
gigatoken at 1 worker on --memory-mb of never-repeating words (make_distinct_words_corpus), with the
RSS at 25/50/75/100% of the run. The tokenizer is LLaMA-2's (tests/data/llama2_tokenizer).
Megatron-LM comes from --megatron-lm (a checkout) or is extracted from --megatron-git (a git directory).
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
sys.path.insert(0, str(REPO / "benchmarks"))

from megatron_mellama.data.tokenizer import Llama2Tokenizer  # noqa: E402
from preprocess_corpus import make_corpus, make_distinct_words_corpus, train_tokenizer  # noqa: E402

LLAMA2_MODEL = REPO / "tests" / "data" / "llama2_tokenizer" / "tokenizer.model"
LIMIT_SAMPLE_BYTES = 50_000_000  # the limit is a rate; measuring it on more text changes nothing


def _tree_rss(root: int, pss: bool = False) -> tuple[int, int, int]:
    """(sum, max) resident bytes over `root` and its descendants, from /proc, and with `pss` their summed
    proportional set size (a page shared by n processes counted 1/n in each: forked workers share
    their parent's pages, which the RSS sum counts once per process)."""
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
    total = largest = proportional = 0
    todo = [root]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
            if pss:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        proportional += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
        total += rss
        largest = max(largest, rss)
    return total, largest, proportional


def run_measured(cmd: list[str], bin_path: Path, env: dict | None = None, timeline: bool = False) -> dict:
    """Runs `cmd` to the end: wall time (start-up included) and the peak RSS (and PSS) of it and its
    children, sampled every 50 ms; with `timeline`, every sample as (seconds, summed RSS)."""
    peak = {"sum": 0, "max": 0, "pss": 0}
    samples = []
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=None if env is None else {**os.environ, **env})

    def sample():
        while proc.poll() is None:
            total, largest, pss = _tree_rss(proc.pid, pss=True)
            peak["sum"], peak["max"] = max(peak["sum"], total), max(peak["max"], largest)
            peak["pss"] = max(peak["pss"], pss)
            if timeline and total:
                samples.append((time.perf_counter() - start, total))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}): {err.strip()[-2000:]}")
    tokens = bin_path.stat().st_size // 2
    return {"seconds": seconds, "tokens": tokens, "rss_sum": peak["sum"], "rss_max": peak["max"],
            "pss": peak["pss"], "samples": samples, "stdout": out, "stderr": err}


def tool_cmd(corpus: Path, model: str, workers: int, out_prefix: Path, backend: str | None = None,
             check_fraction: float | None = None) -> list[str]:
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(corpus), "--output-prefix",
           str(out_prefix), "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", model,
           "--workers", str(workers), "--append-eod", "--log-interval", str(10**12)]
    if backend is not None:
        cmd += ["--tokenizer-backend", backend]
    if check_fraction is not None:
        cmd += ["--tokenizer-check-fraction", str(check_fraction)]
    return cmd


def run_tool(corpus: Path, model: str, workers: int, out_prefix: Path, **flags) -> dict:
    return run_measured(tool_cmd(corpus, model, workers, out_prefix, **flags), Path(f"{out_prefix}_text_document.bin"))


def read_documents(prefix: Path) -> list[np.ndarray]:
    """The token arrays of an indexed dataset, one per sequence, read with megatron-core's reader."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [np.array(dataset[i]) for i in range(len(dataset))]  # copies: the views die with the dataset's mmap


def differing_documents(ours: Path, theirs: Path, bos: int) -> tuple[int, list[int], bool]:
    """(documents compared, those whose tokens differ, whether a leading BOS was set aside).
    This tool writes BOS first in every document; Megatron-LM's tools write none: when every one of
    ours starts with BOS and theirs do not, the comparison is of ours without it."""
    a, b = read_documents(ours), read_documents(theirs)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} documents against {len(b)}")
    strip = all(len(x) and x[0] == bos for x in a) and not all(len(y) and y[0] == bos for y in b)
    differ = [i for i, (x, y) in enumerate(zip(a, b))
              if not np.array_equal(x[1:] if strip else x, y.astype(x.dtype))]
    return len(a), differ, strip


def special_text_documents(corpus: Path) -> list[int]:
    """The documents whose text has a literal "<s>" or "</s>"."""
    with open(corpus, encoding="utf-8") as f:
        return [i for i, line in enumerate(f) if "<s>" in (text := json.loads(line)["text"]) or "</s>" in text]


def same_files(*paths: Path) -> bool:
    first = paths[0].read_bytes()
    return all(p.read_bytes() == first for p in paths[1:])


def remove_outputs(prefix: Path) -> None:
    for path in prefix.parent.glob(prefix.name + "_*"):
        path.unlink()


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


RUNS = {
    1: "this tool, --tokenizer-backend sentencepiece",
    2: "this tool, --tokenizer-backend gigatoken (check fraction 0.01)",
    3: "this tool, gigatoken, --tokenizer-check-fraction 0",
    4: "Megatron-LM tools/preprocess_data.py (Llama2Tokenizer)",
    5: "Megatron-LM tools/preprocess_data_fast.py (gigatoken)",
}
MEGATRON_LAUNCHER = REPO / "benchmarks" / "megatron_preprocess.py"


def megatron_checkout(args, workdir: Path) -> tuple[Path | None, str]:
    """(checkout, how it was found), or (None, why not)."""
    if args.megatron_lm:
        return Path(args.megatron_lm).resolve(), f"--megatron-lm {args.megatron_lm}"
    target = workdir / "megatron-lm"
    if (target / "tools" / "preprocess_data.py").exists():
        return target, f"{target} (extracted before)"
    if not args.megatron_git:
        return None, "neither --megatron-lm nor --megatron-git given"
    mirror = Path(args.megatron_git)
    if not mirror.exists():
        return None, f"--megatron-git {mirror} does not exist"
    target.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(["git", "-C", str(mirror), "archive", "HEAD"], stdout=subprocess.PIPE)
    subprocess.run(["tar", "x", "-C", str(target)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        return None, f"git archive of {mirror} failed"
    head = subprocess.run(["git", "-C", str(mirror), "log", "-1", "--format=%h %cs"], capture_output=True,
                          text=True).stdout.strip()
    return target, f"{mirror} at {head}, extracted to {target}"


def megatron_cmd(checkout: Path, tool: str, *argv: str) -> list[str]:
    return [sys.executable, str(MEGATRON_LAUNCHER), "run", str(checkout), tool, *argv]


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[50])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokenizer-model", default=str(LLAMA2_MODEL),
                    help="SentencePiece model (default: LLaMA-2's, tests/data/llama2_tokenizer/tokenizer.model)")
    ap.add_argument("--train-tokenizer", action="store_true",
                    help="train a LLaMA-style BPE model of --vocab-size pieces on the corpus instead")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--workdir", help="where corpora and outputs go (default: a temporary directory)")
    ap.add_argument("--megatron-lm", metavar="DIR", help="a Megatron-LM checkout for runs (4) and (5)")
    ap.add_argument("--megatron-git", metavar="DIR",
                    help="or a Megatron-LM git directory (a bare clone or mirror): its HEAD is extracted into the "
                         "work directory; with neither, runs (4) and (5) are skipped")
    ap.add_argument("--no-megatron", action="store_true", help="skip runs (4) and (5)")
    ap.add_argument("--limit", action="store_true",
                    help="also the tokenizer alone on texts in memory (SentencePiece), before and after run (1)")
    ap.add_argument("--memory-mb", type=int, default=50,
                    help="size of the --distinct-words corpus of the memory run (0: no memory run)")
    ap.add_argument("--distinct-words", action="store_true",
                    help="only the memory run, on the distinct-words corpus (no runs 1-5)")
    args = ap.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_preprocess_"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs; work directory {workdir}", flush=True)
    model = args.tokenizer_model
    skip = "--no-megatron" if args.no_megatron else "--distinct-words" if args.distinct_words else None
    checkout, how = (None, skip) if skip else megatron_checkout(args, workdir)
    print(f"Megatron-LM: {how}" if checkout else f"runs (4) and (5) skipped: {how}", flush=True)
    sizes = [] if args.distinct_words else args.sizes_mb
    failures = []
    for size in sizes:
        corpus = workdir / f"corpus_{size}mb.jsonl"
        if not corpus.exists():
            t = time.perf_counter()
            make_corpus(corpus, size)
            print(f"generated {corpus.name} ({corpus.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s")
        if args.train_tokenizer and model == str(LLAMA2_MODEL):
            t = time.perf_counter()
            model = train_tokenizer(corpus, workdir, args.vocab_size)
            print(f"trained a LLaMA-style BPE SentencePiece model, vocab {args.vocab_size}, "
                  f"in {time.perf_counter() - t:.0f} s")
        import sentencepiece as spm

        bos = spm.SentencePieceProcessor(model_file=model).bos_id()
        mb = corpus.stat().st_size / 1e6
        hf_dir, fast_note = None, ""
        if checkout:
            # (5) with the tokenizer type of (4) first, to show why it cannot run that way
            out = workdir / "fast_llama2"
            try:
                run_measured(megatron_cmd(checkout, "tools/preprocess_data_fast.py", "--input", str(corpus),
                                          "--output-prefix", str(out), "--tokenizer-type", "Llama2Tokenizer",
                                          "--tokenizer-model", model, "--append-eod", "--use-gigatoken"),
                             Path(f"{out}_text_document.bin"))
                fast_note = "preprocess_data_fast.py ran with --tokenizer-type Llama2Tokenizer"
            except (RuntimeError, OSError) as e:
                last = [line for line in str(e).splitlines() if line.strip()][-1]
                fast_note = (f"preprocess_data_fast.py --tokenizer-type Llama2Tokenizer --use-gigatoken fails: {last}; "
                             "run (5) is --tokenizer-type HuggingFaceTokenizer --use-gigatoken over a tokenizer.json "
                             "built from the same model (benchmarks/megatron_preprocess.py hf-tokenizer)")
            remove_outputs(out)
            print(fast_note, flush=True)
            hf_dir = workdir / "hf_tokenizer"
            made = subprocess.run([sys.executable, str(MEGATRON_LAUNCHER), "hf-tokenizer", model, str(hf_dir)],
                                  capture_output=True, text=True)
            if made.returncode != 0:
                failures.append(f"(5): no HuggingFace tokenizer from {model}: {made.stderr.strip()[-500:]}")
                hf_dir = None
        table, notes_all, special = [], [], None
        for workers in args.workers:
            results, notes = {}, []
            prefix = {k: workdir / f"out{k}_{size}_{workers}" for k in RUNS}
            commands = {1: (tool_cmd(corpus, model, workers, prefix[1], backend="sentencepiece"), None),
                        2: (tool_cmd(corpus, model, workers, prefix[2], backend="gigatoken"), None),
                        3: (tool_cmd(corpus, model, workers, prefix[3], backend="gigatoken", check_fraction=0), None)}
            if checkout:
                commands[4] = (megatron_cmd(checkout, "tools/preprocess_data.py", "--input", str(corpus),
                                            "--output-prefix", str(prefix[4]), "--tokenizer-type", "Llama2Tokenizer",
                                            "--tokenizer-model", model, "--workers", str(workers), "--append-eod",
                                            "--log-interval", str(10**12)), None)
                if hf_dir:
                    # no --workers: gigatoken's rayon pool, held to `workers` threads
                    commands[5] = (megatron_cmd(checkout, "tools/preprocess_data_fast.py", "--input", str(corpus),
                                                "--output-prefix", str(prefix[5]), "--tokenizer-type",
                                                "HuggingFaceTokenizer", "--tokenizer-model", str(hf_dir),
                                                "--append-eod", "--use-gigatoken"),
                                   {"RAYON_NUM_THREADS": str(workers)})
            limit = tokenizer_limit(corpus, model, workers) if args.limit else None
            for k, (cmd, env) in commands.items():
                try:
                    results[k] = run_measured(cmd, Path(f"{prefix[k]}_text_document.bin"), env=env)
                except RuntimeError as e:
                    failures.append(f"{workers} worker(s), ({k}) {RUNS[k]}: {e}")
                print(f"  {workers} worker(s), ({k}) {RUNS[k]}: "
                      + (f"{results[k]['seconds']:.1f} s, peak RSS {_mib(results[k]['rss_sum'])} MiB"
                         if k in results else "FAILED"), flush=True)
            if args.limit:
                limit = max(limit, tokenizer_limit(corpus, model, workers), key=lambda r: r["tokens_per_s"])
            # the ids
            if 1 in results and 2 in results:
                for ext in ("bin", "idx"):
                    a, b = Path(f"{prefix[1]}_text_document.{ext}"), Path(f"{prefix[2]}_text_document.{ext}")
                    assert same_files(a, b), f"(1) and (2) differ: {a} {b}"
                if 3 in results:
                    for ext in ("bin", "idx"):
                        assert same_files(*(Path(f"{prefix[k]}_text_document.{ext}") for k in (1, 3))), "(1), (3)"
                notes.append("(1) vs (2) and (3): .bin and .idx byte-identical")
            for k in (4, 5):
                if 1 in results and k in results:
                    docs, differ, stripped = differing_documents(Path(f"{prefix[1]}_text_document"),
                                                                 Path(f"{prefix[k]}_text_document"), bos)
                    if special is None:
                        special = special_text_documents(corpus)
                    if not differ:
                        which = f"the {len(special)} with a literal <s> or </s> too"
                    elif differ == special:
                        which = f"exactly the {len(special)} with a literal <s> or </s>"
                    else:
                        which = f"{len(set(differ) & set(special))} of the {len(special)} with a literal <s> or </s>"
                    notes.append(f"({k}) vs (1): {len(differ)} of {docs} documents differ ({which})"
                                 + ("; this tool's leading BOS set aside: Megatron-LM's tool writes none"
                                    if stripped else ""))
            if 2 in results and 3 in results:
                share = (results[2]["seconds"] - results[3]["seconds"]) / results[2]["seconds"]
                notes.append(f"the SentencePiece check's share of (2)'s time: (2 - 3) / 2 = {share:.1%}")
                said = [line for line in results[2]["stdout"].splitlines() + results[2]["stderr"].splitlines()
                        if line.startswith("exactness:")]
                if said:
                    notes.append(f"(2) {said[-1]}")
                    seconds = float(said[-1].split(" in ")[1].split(" s of worker time")[0])
                    notes.append(f"the check measured inside (2): {seconds:.2f} s of SentencePiece re-encoding, "
                                 f"{seconds / (workers * results[2]['seconds']):.1%} of {workers} worker(s) x "
                                 "(2)'s wall time")
            if limit:
                notes.append(f"SentencePiece alone on texts in memory, {workers} process(es): "
                             f"{limit['tokens_per_s'] / 1e6:.3f}M tokens/s ({limit['mb_per_s']:.2f} MB/s)")
            for k in RUNS:
                if k in results:
                    r = results[k]

                    def ratio(base, key):
                        return f"{r[key] / results[base][key]:.2f}x" if base in results else "-"

                    table.append(f"| {size} MB | {workers} | ({k}) {RUNS[k]} | {r['seconds']:.1f} | "
                                 f"{mb / r['seconds']:.2f} | {r['tokens'] / 1e6:.1f}M | {_mib(r['rss_sum'])} | "
                                 f"{_mib(r['rss_max'])} | {_mib(r['pss'])} | {ratio(4, 'seconds')} | "
                                 f"{ratio(1, 'seconds')} | {ratio(4, 'rss_sum')} | {ratio(1, 'rss_sum')} |")
            notes_all.extend(f"{workers} worker(s): {note}" for note in notes)
            for k in RUNS:
                remove_outputs(prefix[k])
        print()
        print("| corpus | workers | run | wall s | MB/s | tokens | peak RSS MiB, all processes "
              "| largest process MiB | peak PSS MiB, all processes | time vs (4) | time vs (1) | RSS vs (4) "
              "| RSS vs (1) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(table))
        print()
        print("\n".join(f"- {note}" for note in notes_all))
        if fast_note:
            print(f"\n(5): {fast_note}")
        print(flush=True)

    if args.memory_mb:
        corpus = workdir / f"distinct_words_{args.memory_mb}mb.jsonl"
        if not corpus.exists():
            t = time.perf_counter()
            make_distinct_words_corpus(corpus, args.memory_mb)
            print(f"generated {corpus.name} ({corpus.stat().st_size / 1e6:.0f} MB of never-repeating words) "
                  f"in {time.perf_counter() - t:.0f} s")
        prefix = workdir / "out_distinct"
        r = run_measured(tool_cmd(corpus, model, 1, prefix, backend="gigatoken"), Path(f"{prefix}_text_document.bin"),
                         timeline=True)
        at, quarters = [], []
        for q in (0.25, 0.5, 0.75, 1.0):
            before = [rss for t, rss in r["samples"] if t <= q * r["seconds"]]
            within = [rss for t, rss in r["samples"] if q - 0.25 < t / r["seconds"] <= q]
            at.append(f"{q:.0%} {_mib(before[-1]) if before else '-'}")
            quarters.append(_mib(max(within)) if within else "-")
        print(f"memory run, --distinct-words {corpus.stat().st_size / 1e6:.0f} MB, gigatoken, 1 worker: "
              f"{r['seconds']:.1f} s, {r['tokens'] / 1e6:.1f}M tokens; peak RSS {_mib(r['rss_sum'])} MiB; "
              f"RSS at {', '.join(at)} MiB of the run; the largest in each quarter {', '.join(quarters)} MiB "
              f"({len(r['samples'])} samples, 50 ms apart)", flush=True)
        remove_outputs(prefix)
    for line in failures:
        print(f"FAILED {line}")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
