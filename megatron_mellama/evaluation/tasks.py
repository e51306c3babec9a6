"""Multiple-choice task files: the format and its loader.

A task is a JSONL file (UTF-8), one item per line (blank lines are skipped), every line an object with:

- `question` (string): the prompt is lm-evaluation-harness's usual `"Question: {question}\\nAnswer:"`;
  or `context` (string): the prompt, used exactly as written. Exactly one of the two.
- `choices` (list of at least 2 non-empty strings): each is scored as the continuation
  `" " + choice` of the prompt (lm-eval's target delimiter, a space).
- `answer` (integer): the 0-based index of the right choice.
- `fewshot` (string, optional): a fixed prefix put before this item's prompt as written (end it
  with the separator you want, e.g. "\\n\\n"). The rule is per item only: there is no header line,
  so every line stands alone and `--limit N` takes the first N lines as they are.

One line each for the formats Me-LLaMA measured (MMLU: 4 choices; MedQA: 4 or 5; MedMCQA: 4;
PubMedQA: yes/no/maybe over an abstract):

    {"question": "Which organ secretes insulin?", "choices": ["Liver", "Pancreas", "Kidney", "Spleen"], "answer": 1}
    {"question": "A 45-year-old man ... Which is the next step?", "choices": ["A", "B", "C", "D", "E"], "answer": 4}
    {"question": "Drug of choice for absence seizures?", "choices": ["Ethosuximide", "Phenytoin", "Carbamazepine", "Gabapentin"], "answer": 0, "fewshot": "Question: ...\\nAnswer: ...\\n\\n"}
    {"context": "Abstract: ...\\nQuestion: Does X reduce Y?\\nAnswer:", "choices": ["yes", "no", "maybe"], "answer": 0}

Every problem is a `TaskError` whose message is one line, `FILE:LINE: what was expected`, found
before anything is returned: training calls `load_tasks` before it starts, so a bad file costs no
GPU time.
"""

from __future__ import annotations

import dataclasses
import json
import os

from ..errors import MellamaError

QUESTION_TEMPLATE = "Question: {question}\nAnswer:"
# lm-eval's default `target_delimiter`: what separates the prompt from a choice
TARGET_DELIMITER = " "


class TaskError(MellamaError, ValueError):
    """A task spec or file that cannot be used; the message is one line naming the spec or FILE:LINE."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One question: the prompt text and its choices as written in the file (without the delimiter)."""

    prompt: str
    choices: tuple[str, ...]
    answer: int
    line: int = 0  # its line in the task file, for messages

    @property
    def continuations(self) -> list[str]:
        return [TARGET_DELIMITER + c for c in self.choices]


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    path: str
    items: tuple[Item, ...]


def parse_task_specs(specs: list[str]) -> dict[str, str]:
    """`["mmlu=data/mmlu.jsonl", ...]` -> {"mmlu": "data/mmlu.jsonl", ...}, in the order given."""
    tasks: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise TaskError(f"task {spec!r}: expected NAME=PATH, e.g. mmlu=data/mmlu.jsonl")
        if name in tasks:
            raise TaskError(f"task {name!r} given twice ({tasks[name]} and {path})")
        if not os.path.isfile(path):
            what = "is a directory" if os.path.isdir(path) else "no such file"
            raise TaskError(f"task {name!r}: {path}: {what} (expected a JSONL task file)")
        tasks[name] = path
    return tasks


def load_tasks(specs: dict[str, str]) -> list[Task]:
    """Read and check every task file of `parse_task_specs`'s result; raises on the first bad line."""
    return [load_task(name, path) for name, path in specs.items()]


def load_task(name: str, path: str) -> Task:
    items = []
    try:
        # utf-8-sig: a byte-order mark some editors write is not part of the first item
        with open(path, encoding="utf-8-sig") as fh:
            for number, line in enumerate(fh, start=1):
                if line.strip():
                    items.append(parse_item(line, path, number))
    except UnicodeDecodeError as exc:
        raise TaskError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise TaskError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not items:
        raise TaskError(f"{path}: empty task file (expected one JSON item per line)")
    return Task(name=name, path=path, items=tuple(items))


def parse_item(line: str, path: str, number: int) -> Item:
    """Line `number` of the task file `path` -> Item; every error message starts with `PATH:NUMBER:`."""
    where = f"{path}:{number}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TaskError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise TaskError(f"{where}: expected a JSON object, got {_json_type(obj)}")
    unknown = sorted(set(obj) - {"question", "context", "choices", "answer", "fewshot"})
    if unknown:
        raise TaskError(f"{where}: unknown field {unknown[0]!r} (expected question or context, choices, answer, "
                        "and optionally fewshot)")
    if ("question" in obj) == ("context" in obj):
        raise TaskError(f"{where}: expected exactly one of \"question\" and \"context\"")
    key = "question" if "question" in obj else "context"
    text = obj[key]
    if not isinstance(text, str) or not text.strip():
        raise TaskError(f"{where}: \"{key}\" must be a non-empty string, got {_json_type(text)}")
    choices = obj.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
        got = "nothing" if choices is None else _json_type(choices)
        raise TaskError(f"{where}: \"choices\" must be a list of at least 2 strings, got {got}")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            raise TaskError(f"{where}: choice {i} must be a non-empty string, got {_json_type(choice)}")
    answer = obj.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int):
        got = "nothing" if answer is None else _json_type(answer)
        raise TaskError(f"{where}: \"answer\" must be an integer choice index, got {got}")
    if not 0 <= answer < len(choices):
        raise TaskError(f"{where}: \"answer\" {answer} is out of range for {len(choices)} choices "
                        f"(0-based, 0..{len(choices) - 1})")
    fewshot = obj.get("fewshot", "")
    if not isinstance(fewshot, str):
        raise TaskError(f"{where}: \"fewshot\" must be a string, got {_json_type(fewshot)}")
    prompt = QUESTION_TEMPLATE.format(question=text) if key == "question" else text
    return Item(prompt=fewshot + prompt, choices=tuple(choices), answer=answer, line=number)


def _json_type(value) -> str:
    if isinstance(value, str):
        return "an empty string" if not value.strip() else "a string"
    names = {bool: "a boolean", int: "an integer", float: "a number", list: "a list", dict: "an object",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)
