"""preprocess_sft's records -> checked chat messages: instruction records and chat records, as the
tool's docstring describes them; a record that is neither, or breaks the turn order, is a `Reject`.
"""

from __future__ import annotations

from megatron_mellama.data.record_encoder import RecordRejected, json_object


class Reject(Exception):
    """An unusable record; the message is `kind: detail`, counted by kind in the summary."""


def parse_line(raw: bytes) -> dict:
    try:
        return json_object(raw)
    except RecordRejected as err:
        raise Reject(str(err)) from None


def conversation(record: dict, system: str | None) -> list[dict]:
    """The record as chat messages, checked; `system` is prepended when the record has no system turn."""
    if "messages" in record and "instruction" in record:
        raise Reject("ambiguous record: both 'messages' and 'instruction' (one conversation per record)")
    if "messages" in record:
        messages = _checked_messages(record["messages"])
    elif "instruction" in record:
        messages = _instruction_messages(record)
    else:
        raise Reject("missing field: neither 'messages' nor 'instruction'")
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _string_field(record: dict, key: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if key not in record:
        raise Reject(f"missing field: {key!r}")
    if not isinstance(value, str):
        raise Reject(f"wrong type: {key!r} holds {type(value).__name__}, not a string")
    return value


def _instruction_messages(record: dict) -> list[dict]:
    instruction = _string_field(record, "instruction")
    extra = _string_field(record, "input", optional=True)
    output = _string_field(record, "output")
    if not instruction.strip():
        raise Reject("empty instruction")
    if not output.strip():
        raise Reject("empty answer: 'output'")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _checked_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise Reject("wrong type: 'messages' is not a non-empty list")
    checked = []
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise Reject(f"wrong type: message {n} is not {{role: string, content: string}}")
        checked.append({"role": message["role"], "content": message["content"]})
    first_turn = 1 if checked[0]["role"] == "system" else 0
    for n, message in enumerate(checked[first_turn:], start=first_turn):
        expected = "user" if (n - first_turn) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise Reject(f"wrong roles: message {n} is {message['role']!r}, expected {expected!r}")
        if not message["content"].strip():
            raise Reject(f"empty answer: message {n}" if expected == "assistant" else f"empty turn: message {n}")
    if checked[-1]["role"] != "assistant":
        raise Reject(f"wrong roles: the last message is {checked[-1]['role']!r}, not an assistant's answer")
    return checked
