"""The chat example's task: questions about made-up patient records, each with one right answer that
follows from the record in the prompt (which department treats its diagnosis, what its medication is
for) by rules the model learns from the training conversations.

    python examples/quickstart/chat_task.py data OUT_DIR          # train.jsonl, test.jsonl
    python examples/quickstart/chat_task.py accuracy HF_DIR TEST_JSONL [--label before]

`accuracy` prompts an exported model the way a user of transformers would (`apply_chat_template`
with the template in the folder's tokenizer_config.json, then greedy `generate`) and counts the
answers that equal the right one exactly. The held-out records never appear in training.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

# diagnoses in the quickstart corpus's own words, so its tokenizer spells them short
DEPARTMENT = {"chest pain": "cardiology", "hypertension": "cardiology", "shortness of breath": "pulmonology",
              "fever": "infectious diseases", "a urinary infection": "urology", "diabetes": "endocrinology",
              "a headache": "neurology"}
TREATS = {"insulin": "diabetes", "aspirin": "pain", "heparin": "clots", "morphine": "pain",
          "penicillin": "infection", "metformin": "diabetes", "labetalol": "hypertension"}
QUESTIONS = {"Which department treats the patient?": lambda r: DEPARTMENT[r["diagnosis"]],
             "What is the medication for?": lambda r: TREATS[r["medication"]]}
NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Greta", "Hugo", "Ida", "Jonas", "Karl", "Lena",
         "Mia", "Noah", "Olga", "Paul"]
INSTRUCTION = "Answer from the record."
TRAIN_RECORDS, TEST_RECORDS = 3000, 100


def _record(rng: random.Random) -> dict:
    return dict(name=rng.choice(NAMES), age=str(rng.randint(21, 89)), diagnosis=rng.choice(list(DEPARTMENT)),
                medication=rng.choice(list(TREATS)))


def _question(record: dict, question: str) -> dict:
    """A held-out question: one turn, the record and the question, as a user would ask it."""
    text = (f"Record: patient {record['name']}, age {record['age']}, diagnosis {record['diagnosis']}, "
            f"medication {record['medication']}.\n{question}")
    return dict(instruction=INSTRUCTION, input=text, output=QUESTIONS[question](record))


def _conversation(record: dict, questions: list) -> dict:
    """A training conversation: the held-out questions' first turn, then the other question about the
    same record (more answers to learn from per token read)."""
    first = _question(record, questions[0])
    messages = [{"role": "user", "content": f"{first['instruction']}\n\n{first['input']}"},
                {"role": "assistant", "content": first["output"]}]
    for question in questions[1:]:
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": QUESTIONS[question](record)}]
    return dict(messages=messages)


def data(out: Path) -> None:
    """Training conversations and held-out questions; no held-out record appears in training."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    seen, test = set(), []
    while len(test) < TEST_RECORDS:
        record = _record(rng)
        key = tuple(record.values())
        if key not in seen:
            seen.add(key)
            test.append(_question(record, rng.choice(list(QUESTIONS))))
    train = []
    while len(train) < TRAIN_RECORDS:
        record = _record(rng)
        if tuple(record.values()) not in seen:
            train.append(_conversation(record, rng.sample(list(QUESTIONS), len(QUESTIONS))))
    for name, items in (("train", train), ("test", test)):
        with open(out / f"{name}.jsonl", "w") as fh:
            fh.writelines(json.dumps(item) + "\n" for item in items)
    print(f"task: {len(train)} training conversations and {len(test)} held-out questions about patient "
          f"records in {out}")


def accuracy(hf_dir: Path, test_file: Path, label: str) -> float:
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    items = [json.loads(line) for line in open(test_file)]
    # one batch, padded on the left as decoder-only generation needs
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"{item['instruction']}\n\n{item['input']}"}],
                                             add_generation_prompt=True, tokenize=False) for item in items]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    right = sum(answer.strip() == item["output"] for answer, item in zip(answers, items))
    shown = [f"  {item['input'].splitlines()[-1]} -> {answer.strip()!r} (right: {item['output']!r})"
             for answer, item in zip(answers[:3], items)]
    score = right / len(items)
    print(f"chat accuracy {label}: {right}/{len(items)} = {score:.1%} (greedy generation of {hf_dir} in transformers)")
    print("\n".join(shown))
    return score


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="write train.jsonl and test.jsonl")
    d.add_argument("out", type=Path)
    a = sub.add_parser("accuracy", help="exact-match accuracy of an exported model on held-out questions")
    a.add_argument("hf_dir", type=Path)
    a.add_argument("test_file", type=Path)
    a.add_argument("--label", default="")
    args = p.parse_args(argv)
    if args.command == "data":
        data(args.out)
    else:
        accuracy(args.hf_dir, args.test_file, args.label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
