"""The quickstart's small pieces: a three-domain corpus, a multiple-choice task drawn from its general
domain, a SentencePiece tokenizer, a tiny Hugging Face LLaMA2 to start from, and a generation with
the exported model.

    python examples/quickstart/helpers.py corpus OUT_DIR
    python examples/quickstart/helpers.py general-task OUT_DIR
    python examples/quickstart/helpers.py tokenizer OUT_DIR
    python examples/quickstart/helpers.py hf-model OUT_DIR
    python examples/quickstart/helpers.py generate HF_DIR PROMPT
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

VOCAB_SIZE = 1000
# The tiny model: GQA (4 query heads, 2 key/value heads) so the quickstart exercises it.
MODEL = dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=344, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)

DOMAINS = {
    "bio": dict(docs=1500, subjects=["the protein", "the gene", "the receptor", "the enzyme", "the antibody",
                                     "the mutation", "the pathway", "the cell line"],
                verbs=["regulates", "inhibits", "binds", "activates", "modulates", "expresses", "degrades"],
                objects=["tumor growth", "insulin signalling", "the immune response", "apoptosis",
                         "mitochondrial function", "the inflammatory cascade", "DNA repair"],
                tails=["in mice", "in vitro", "in human cohorts", "after treatment", "under hypoxia"]),
    "clin": dict(docs=300, subjects=["the patient", "the resident", "the nurse", "the family", "the attending"],
                 verbs=["reports", "denies", "presents with", "was treated for", "was discharged with"],
                 objects=["chest pain", "shortness of breath", "fever", "hypertension", "a urinary infection",
                          "diabetes", "a headache"],
                 tails=["since yesterday", "for three days", "on admission", "at follow-up", "overnight"]),
    "gen": dict(docs=600, subjects=["the city", "the river", "the committee", "the old library", "the museum",
                                    "the team", "the market"],
                verbs=["opened", "celebrated", "built", "welcomed", "announced", "closed", "restored"],
                objects=["a new bridge", "the summer festival", "a public garden", "the annual report",
                         "a concert", "the harbour"],
                tails=["last spring", "in the morning", "after the storm", "this week", "years ago"]),
}


def _document(rng: random.Random, d: dict) -> str:
    sentences = []
    for _ in range(rng.randint(4, 9)):
        s = " ".join(rng.choice(d[k]) for k in ("subjects", "verbs", "objects", "tails")) + "."
        sentences.append(s[0].upper() + s[1:])
    return " ".join(sentences)


def corpus(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with open(out / "all.txt", "w") as every:
        for name, d in DOMAINS.items():
            with open(out / f"{name}.jsonl", "w") as fh:
                for _ in range(d["docs"]):
                    text = _document(rng, d)
                    fh.write(json.dumps({"text": text}) + "\n")
                    every.write(text + "\n")
    counts = ", ".join(f"{name} {d['docs']} documents" for name, d in DOMAINS.items())
    print(f"corpus: {counts} in {out}")


def general_task(out: Path, items: int = 40) -> None:
    """A "general knowledge" task in the format of `--eval-tasks`: which object completes a general-domain
    sentence (subject and verb given), against three objects of the biomedical and clinical domains.
    A model that learnt the general domain's sentences picks it; chance is 25%."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    gen = DOMAINS["gen"]
    elsewhere = DOMAINS["bio"]["objects"] + DOMAINS["clin"]["objects"]
    with open(out / "general_task.jsonl", "w") as fh:
        for _ in range(items):
            context = f"{rng.choice(gen['subjects'])} {rng.choice(gen['verbs'])}"
            choices = rng.sample(elsewhere, 3)
            answer = rng.randrange(4)
            choices.insert(answer, rng.choice(gen["objects"]))
            fh.write(json.dumps({"context": context[0].upper() + context[1:], "choices": choices,
                                 "answer": answer}) + "\n")
    print(f"general task: {items} four-choice items in {out / 'general_task.jsonl'}")


def tokenizer(out: Path) -> None:
    import sentencepiece

    # LLaMA2's settings: BPE, byte fallback, digits split, unk/bos/eos = 0/1/2, no pad, and text kept as
    # it is (no NFKC, whitespace and newlines kept), which is what a Hugging Face export of the model
    # assumes: transformers' LlamaTokenizer does not apply SentencePiece's normaliser
    sentencepiece.SentencePieceTrainer.train(
        input=str(out / "all.txt"), model_prefix=str(out / "tokenizer"), vocab_size=VOCAB_SIZE, model_type="bpe",
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        minloglevel=2)
    print(f"tokenizer: {out / 'tokenizer.model'} ({VOCAB_SIZE} pieces)")


def hf_model(out: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB_SIZE, tie_word_embeddings=False, **MODEL)
    transformers.LlamaForCausalLM(config).save_pretrained(out / "hf_start")
    print(f"starting checkpoint: a random tiny LLaMA2 in Hugging Face format at {out / 'hf_start'}")


def generate(hf_dir: Path, prompt: str) -> None:
    import sentencepiece
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    ids = torch.tensor([[sp.bos_id()] + sp.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=sp.eos_id())
    print(f"generation by the exported model (transformers), greedy:\n  {prompt!r} -> "
          f"{sp.decode(out[0, ids.shape[1]:].tolist())!r}")


if __name__ == "__main__":
    command, target = sys.argv[1], Path(sys.argv[2])
    if command == "generate":
        generate(target, sys.argv[3])
    else:
        {"corpus": corpus, "general-task": general_task, "tokenizer": tokenizer, "hf-model": hf_model}[command](target)
