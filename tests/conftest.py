"""Shared fixtures. Nothing here touches a network: tokenizers are trained on generated text."""

import os
import random

# Triton kernels run on the CPU through Triton's interpreter; it is read when a kernel is defined,
# so it must be set before anything imports them (spawned ranks inherit it)
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # each xdist worker computes on one core: two workers with a thread per core each would leave
    # OpenMP's threads spinning for cores the other worker holds (the tests' models are tiny)
    torch.set_num_threads(1)
    # and so do the processes its tests start (ranks, tools, dry runs), unless a test sets its own
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Under xdist (--dist loadfile) the files that take minutes start first, so that no worker ends the
# run alone on one of them; xdist itself would order the files by their number of tests, which puts
# the quickstart examples (6 tests, minutes) last. A serial run keeps the alphabetical order.
LONGEST_FIRST = ("test_pretrain_example.py", "test_memory_model.py", "test_kernels.py", "test_context_parallel.py",
                 "test_megatron_import.py", "test_megatron_export.py", "test_checkpoint_safety.py", "test_plan_layout.py", "test_benchmarks.py", "test_training_run.py",
                 "test_engine.py", "test_rope_scaling.py", "test_engine_device.py", "test_gpu_check.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's, read by its scheduler
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


_WORDS = ("the a of and to in is was with for on by patient patients clinical doctor nurse hospital "
          "disease treatment therapy dose trial study result results method model data language large "
          "small medical record report blood heart cancer risk care health test tests year years "
          "after before during analysis outcome outcomes review evidence significant").split()


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 16))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(1, 2024)))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), f"({rng.choice(_WORDS)})")
        lines.append(" ".join(words).capitalize() + rng.choice(".!?;"))
    return lines


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory) -> str:
    """A small SentencePiece BPE model trained with LLaMA2's settings; returns the .model path."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("spm")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(_sentences(400)) + "\n", encoding="utf-8")
    prefix = root / "tokenizer"
    # LLaMA2's trainer spec: BPE, unk/bos/eos = 0/1/2, no pad, byte fallback, digits split,
    # identity normalization and whitespace kept as written.
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), model_type="bpe", vocab_size=400,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, num_threads=1, minloglevel=2)
    return f"{prefix}.model"


@pytest.fixture(scope="session")
def hf_tokenizer_dir(sentencepiece_model, tmp_path_factory) -> str:
    """A Hugging Face LLaMA tokenizer directory built from `sentencepiece_model`; returns its path.

    transformers 5 converts a tokenizer.model only through protobuf, which is not a dependency, so
    the vocabulary and BPE merges are read from the SentencePiece processor instead.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    sp = spm.SentencePieceProcessor(model_file=sentencepiece_model)
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    mergeable = {sp.id_to_piece(i) for i in range(sp.vocab_size())
                 if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    # A SentencePiece BPE piece's id is its merge rank, so each split of a piece into two known
    # pieces is a merge ranked by the piece it makes.
    merges = sorted(((p[:k], p[k:]) for p in mergeable for k in range(1, len(p))
                     if p[:k] in mergeable and p[k:] in mergeable),
                    key=lambda m: (vocab[m[0] + m[1]], vocab[m[0]], vocab[m[1]]))
    tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    out = tmp_path_factory.mktemp("hf_tokenizer")
    tok.save_pretrained(str(out))
    return str(out)
