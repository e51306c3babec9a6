"""The multiple-choice task format: every documented shape loads, every bad line fails with
`FILE:LINE: ...`, and task specs (`name=PATH`) are checked."""

import json
import re

import pytest

from megatron_mellama.evaluation.tasks import TaskError, load_task, load_tasks, parse_task_specs

MMLU = {"question": "Which organ secretes insulin?", "choices": ["Liver", "Pancreas", "Kidney", "Spleen"], "answer": 1}
MEDQA = {"question": "A 45-year-old man has chest pain. Next step?",
         "choices": ["ECG", "CT", "MRI", "Troponin", "Discharge"], "answer": 0}
MEDMCQA = {"question": "Drug of choice for absence seizures?", "fewshot": "Question: 2+2?\nAnswer: 4\n\n",
           "choices": ["Ethosuximide", "Phenytoin", "Carbamazepine", "Gabapentin"], "answer": 0}
PUBMEDQA = {"context": "Abstract: aspirin lowered risk.\nQuestion: Does aspirin lower risk?\nAnswer:",
            "choices": ["yes", "no", "maybe"], "answer": 0}


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_every_documented_format_loads(tmp_path):
    path = write(tmp_path / "mixed.jsonl", [MMLU, MEDQA, "", MEDMCQA, PUBMEDQA])
    (task,) = load_tasks(parse_task_specs([f"mixed={path}"]))
    assert task.name == "mixed" and len(task.items) == 4  # the blank line is skipped
    mmlu, medqa, medmcqa, pubmedqa = task.items
    assert mmlu.prompt == "Question: Which organ secretes insulin?\nAnswer:"
    assert mmlu.continuations == [" Liver", " Pancreas", " Kidney", " Spleen"] and mmlu.answer == 1
    assert len(medqa.choices) == 5
    assert medmcqa.prompt == "Question: 2+2?\nAnswer: 4\n\nQuestion: Drug of choice for absence seizures?\nAnswer:"
    assert pubmedqa.prompt == PUBMEDQA["context"] and pubmedqa.choices == ("yes", "no", "maybe")
    assert [item.line for item in task.items] == [1, 2, 4, 5]


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got a list"),
    ({"choices": ["a", "b"], "answer": 0}, 'exactly one of "question" and "context"'),
    ({"question": "q", "context": "c", "choices": ["a", "b"], "answer": 0}, 'exactly one of "question" and "context"'),
    ({"question": "  ", "choices": ["a", "b"], "answer": 0}, '"question" must be a non-empty string'),
    ({"question": 3, "choices": ["a", "b"], "answer": 0}, '"question" must be a non-empty string, got an integer'),
    ({"question": "q", "answer": 0}, '"choices" must be a list of at least 2 strings, got nothing'),
    ({"question": "q", "choices": ["a"], "answer": 0}, '"choices" must be a list of at least 2 strings'),
    ({"question": "q", "choices": "ab", "answer": 0}, '"choices" must be a list of at least 2 strings, got a string'),
    ({"question": "q", "choices": ["a", ""], "answer": 0}, "choice 1 must be a non-empty string"),
    ({"question": "q", "choices": ["a", 7], "answer": 0}, "choice 1 must be a non-empty string, got an integer"),
    ({"question": "q", "choices": ["a", "b"]}, '"answer" must be an integer choice index, got nothing'),
    ({"question": "q", "choices": ["a", "b"], "answer": "A"}, '"answer" must be an integer choice index, got a string'),
    ({"question": "q", "choices": ["a", "b"], "answer": True}, '"answer" must be an integer'),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, '"answer" 2 is out of range for 2 choices'),
    ({"question": "q", "choices": ["a", "b"], "answer": -1}, '"answer" -1 is out of range'),
    ({"question": "q", "choices": ["a", "b"], "answer": 0, "fewshot": 1}, '"fewshot" must be a string'),
    ({"question": "q", "choices": ["a", "b"], "answer": 0, "label": 1}, "unknown field 'label'"),
]


@pytest.mark.parametrize("bad,expected", BAD_LINES, ids=[e for _, e in BAD_LINES])
def test_bad_line_names_file_and_line(tmp_path, bad, expected):
    path = write(tmp_path / "t.jsonl", [MMLU, "", bad, MMLU])
    with pytest.raises(TaskError) as err:
        load_task("t", path)
    message = str(err.value)
    assert message.startswith(f"{path}:3: ") and expected in message
    assert "\n" not in message


def test_empty_file_is_an_error(tmp_path):
    path = write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(TaskError, match="empty task file"):
        load_task("empty", path)


def test_file_that_is_not_text_is_an_error(tmp_path):
    path = tmp_path / "binary.jsonl"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TaskError, match="not UTF-8 text"):
        load_task("binary", str(path))


def test_load_tasks_checks_every_file_before_returning(tmp_path):
    good = write(tmp_path / "good.jsonl", [MMLU])
    bad = write(tmp_path / "bad.jsonl", [MMLU, MMLU, {"question": "q", "choices": ["a", "b"], "answer": 5}])
    with pytest.raises(TaskError, match="^" + re.escape(f"{bad}:3: ")):
        load_tasks(parse_task_specs([f"good={good}", f"bad={bad}"]))


def test_task_specs(tmp_path):
    a, b = write(tmp_path / "a.jsonl", [MMLU]), write(tmp_path / "b.jsonl", [MMLU])
    assert parse_task_specs([f"mmlu={a}", f"medqa={b}"]) == {"mmlu": a, "medqa": b}
    with pytest.raises(TaskError, match="expected NAME=PATH"):
        parse_task_specs([a])
    with pytest.raises(TaskError, match="expected NAME=PATH"):
        parse_task_specs([f"={a}"])
    with pytest.raises(TaskError, match="'mmlu' given twice"):
        parse_task_specs([f"mmlu={a}", f"mmlu={b}"])
    with pytest.raises(TaskError, match="no such file"):
        parse_task_specs([f"mmlu={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(TaskError, match="is a directory"):
        parse_task_specs([f"mmlu={tmp_path}"])


@pytest.mark.parametrize("kind", ["Llama2Tokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer"])
def test_special_token_text_in_items_is_plain_text(kind, sentencepiece_model, hf_tokenizer_dir):
    import sentencepiece

    from megatron_mellama.evaluation.requests import encode_requests, tokenizer_encoder
    from megatron_mellama.evaluation.tasks import Item

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
    encode = tokenizer_encoder(kind, hf_tokenizer_dir if kind == "HuggingFaceTokenizer" else sentencepiece_model)
    prompt = "Is <s>aspirin</s> the dose? Answer:"
    (request,) = encode_requests([Item(prompt=prompt, choices=("yes </s>",), answer=0)], encode)
    assert request.context == [sp.bos_id()] + sp.encode(prompt)
    assert request.context + request.continuation == [sp.bos_id()] + sp.encode(prompt + " yes </s>")
    assert sp.eos_id() not in request.context + request.continuation
