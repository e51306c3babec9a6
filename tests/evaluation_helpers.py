"""What the evaluation tests share: a generated multiple-choice task and a tiny random HF LLaMA."""

import json
import random
import shutil

import torch

WORDS = ("the patient heart blood cancer dose trial risk care study doctor nurse clinical result "
         "disease therapy hospital analysis outcome evidence").split()
# long enough that, at the tests' sequence length, a few-shot item loses the start of its prompt
FEWSHOT = ("Question: which test measures blood sugar?\nAnswer: glucose\n\n"
           "Question: what does a cardiologist treat?\nAnswer: the heart\n\n")


def task_lines(n: int = 20, seed: int = 0) -> list:
    """`n` items with 4 choices: questions, a few-shot prefix on every third, a raw context on every
    seventh, choices of 1 to 4 words (so acc and acc_norm can disagree)."""
    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    lines = []
    for i in range(n):
        item = {"choices": [words(1, 4) for _ in range(4)], "answer": rng.randrange(4)}
        if i % 7 == 6:
            item["context"] = f"Abstract: {words(4, 8)}.\nQuestion: {words(3, 6)}?\nAnswer:"
        else:
            item["question"] = words(3, 8) + "?"
        if i % 3 == 0:
            item["fewshot"] = FEWSHOT
        lines.append(item)
    return lines


def write_task(path, lines) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def make_hf_llama(hf_tokenizer_dir: str, out_dir=None, seed: int = 0):
    """A random 2-layer LLaMA over the tokenizer's vocabulary; with `out_dir`, saved there with the
    tokenizer's files beside it (a complete HF folder). Weights are large enough (std 0.1) that the
    choices' log-likelihoods differ by whole nats, not by rounding."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.1,
                                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if out_dir is not None:
        model.save_pretrained(out_dir)
        shutil.copytree(hf_tokenizer_dir, out_dir, dirs_exist_ok=True)
    return model, tokenizer


def train_tiny_checkpoint(save, tokenizer_model: str) -> str:
    """Two iterations of the tiny model on mock data with `tokenizer_model` (its vocabulary; its
    sha256 recorded in the checkpoint), saved in `save`; returns `save`."""
    from megatron_mellama.pretrain import main

    argv = ["--model", "tiny", "--mock-data", "--tokenizer-model", tokenizer_model, "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2", "--eval-iters", "0",
            "--num-workers", "0", "--log-interval", "100", "--save", str(save)]
    assert main(argv) == 0
    return str(save)


def other_sentencepiece_model(root, vocab_size: int = 300) -> str:
    """A SentencePiece model other than the tests' usual one: another vocabulary, other ids."""
    import sentencepiece as spm

    rng = random.Random(7)
    corpus = root / "other_corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) + rng.choice(("", "s", "ing", "ed"))
                                         for _ in range(12)) for _ in range(300)) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "other"), model_type="bpe",
                                   vocab_size=vocab_size, byte_fallback=True, num_threads=1, minloglevel=2)
    return str(root / "other.model")
