"""Instruction and chat JSONL -> token and loss-mask indexed datasets for supervised fine-tuning.

    mellama-preprocess-sft --input 'sft/*.jsonl' --output-prefix data/med_sft \\
        --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model --seq-length 4096

Records come in two shapes: instruction records, {"instruction", "input" (optional), "output"} as in
Alpaca's and Me-LLaMA's data, which become a one-turn chat (user = instruction, plus "\\n\\n" + input
when there is one); and chat records, {"messages": [{"role", "content"}, ...]}: an optional first
system turn, then user and assistant turns alternating, the last an assistant's. --system gives a
system prompt to every record that has none.

Each conversation is rendered with LLaMA-2-chat's template by default, token for token as Meta's
reference code and transformers' `apply_chat_template` with Llama-2-chat's template do it:

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user2} [/INST] ...

(<s> and </s> are the BOS and EOS ids; user and answer texts are stripped). Only the template's
<s> and </s> are: message text is plain text, as in Meta's `chat_completion`, so a literal "<s>" or
"</s>" in a message (HTML strike-through) is encoded as its characters with a SentencePiece
tokenizer, and such a record is rejected with a Hugging Face tokenizer, whose encoding would read it
as the control token (an EOS inside an answer, trained). With --chat-template-from
DIR the Jinja template of DIR/tokenizer_config.json (`chat_template`, or DIR/chat_template.jinja) is
rendered with jinja2 in the environment transformers gives it. The rendered text becomes ids in one
of two ways: a Hugging Face tokenizer encodes the whole text with its own special-token handling, as
`apply_chat_template(tokenize=True)` does; a SentencePiece tokenizer encodes the text between the BOS
and EOS strings piece by piece, as Meta's code (and the original, legacy LLaMA-2 tokenizer) does.

Writes PREFIX_text_document.{bin,idx} (token ids) and PREFIX_loss_mask_document.{bin,idx} (uint8,
one per token: 1 where the loss is taken), one document per conversation in both,
PREFIX_chat_template.jinja (the template's Jinja source: training records it in its checkpoints and
the Hugging Face export writes it into tokenizer_config.json), and PREFIX_rejected.jsonl listing the
records skipped (file, line, reason).

Which tokens are trained. Guessing where an answer starts by tokenizing it alone goes wrong where
tokens merge across the boundary, so the answers' spans are measured on the template itself: for
each assistant turn the conversation is rendered and tokenized up to that turn (with the
generation prompt, i.e. everything before the answer) and then with the turn; the tokens between the
two are the answer's, and what closes it (LLaMA-2: the space the template puts after the answer, and
EOS). Each shorter tokenization must be a prefix of the longer, so the last one - the whole
conversation - is exactly the concatenation of the pieces; a record where it is not (a template or
tokenizer whose tokens straddle a turn boundary) is rejected rather than given a wrong mask.
System, user and template tokens get 0.

A conversation longer than --seq-length tokens is dropped (--overlong drop, the default) or cut to
its first --seq-length tokens (--overlong truncate; dropped if no trained token is left). Bad records
and failures are handled as in preprocess_data: skipped and listed, or one line and exit 1 with
--strict; too many rejects fail the run; outputs appear under their final names only on success,
under the PREFIX.lock that keeps two runs off one prefix.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np

from megatron_mellama.data.chat_template import LLAMA2_CHAT_TEMPLATE, template_path
from megatron_mellama.data.indexed_writer import IndexedWriter, OutputLocked, optimal_dtype, output_lock, temp_path
from megatron_mellama.data.jsonl_reader import MAX_LINE_BYTES, read_blocks
from megatron_mellama.data.record_encoder import RecordRejected, json_object
from megatron_mellama.data.tokenizer import TOKENIZER_TYPES, HuggingFaceTokenizer
from megatron_mellama.tools.cli import OneLineParser, UsageError, run_tool
from megatron_mellama.tools.preprocess_data import (PreprocessError, Rejects, check_common_args, one_line,
                                                     run_until_signalled)

from ..errors import MellamaError

PROG = "mellama-preprocess-sft"
DEFAULT_SEQ_LENGTH = 4096  # LLaMA-2's context
LLAMA2_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, allow_abbrev=False, description=__doc__.split("\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True,
                   help="JSONL file (.jsonl or .jsonl.gz) or a quoted glob; files in sorted order")
    g.add_argument("--max-line-bytes", type=int, default=MAX_LINE_BYTES, metavar="N",
                   help="a JSONL line longer than this is rejected unread")
    g = p.add_argument_group("chat template")
    g.add_argument("--chat-template-from", metavar="DIR",
                   help="render with the Jinja chat template of DIR/tokenizer_config.json (default: LLaMA-2-chat's)")
    g.add_argument("--system", metavar="TEXT", help="system prompt for records that have none")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", required=True,
                   help="SentencePiece .model file, or a Hugging Face tokenizer directory")
    g.add_argument("--seq-length", type=int, default=DEFAULT_SEQ_LENGTH, metavar="N",
                   help=f"longest conversation in tokens (default {DEFAULT_SEQ_LENGTH})")
    g.add_argument("--overlong", choices=("drop", "truncate"), default="drop",
                   help="a longer conversation is rejected (drop, the default) or cut to its first N tokens "
                        "(truncate; rejected when no answer token is left)")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="path prefix of the output files")
    g = p.add_argument_group("runtime")
    g.add_argument("--log-interval", type=int, default=10000, help="records between progress lines")
    g.add_argument("--strict", action="store_true", help="stop at the first unusable record (exit 1)")
    g.add_argument("--max-reject-fraction", type=float, default=0.1, metavar="F",
                   help="fail (exit 1, no output written) when more than this share of the records is "
                        "rejected, or all of them are (default 0.1)")
    return p


def parse_args(argv):
    args = build_parser().parse_args(argv)
    if args.seq_length < 1:
        raise UsageError(f"--seq-length {args.seq_length} must be at least 1")
    check_common_args(args)
    args.template, args.special_tokens, args.template_source = load_template(args.chat_template_from,
                                                                             args.tokenizer)
    return args


# ---- records -> conversations -------------------------------------------------------------------

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


# ---- templates -----------------------------------------------------------------------------------

def render_llama2_chat(messages: list[dict], add_generation_prompt: bool = False, bos_token: str = "<s>",
                       eos_token: str = "</s>", **_) -> str:
    """Llama-2-chat's template (meta-llama/Llama-2-7b-chat-hf's `chat_template`), without jinja2.

    It has no generation prompt: the text before an answer ends with ' [/INST]' either way."""
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    parts = []
    for n, message in enumerate(messages):
        content = message["content"]
        if n == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if message["role"] == "user":
            parts.append(f"{bos_token}[INST] {content.strip()} [/INST]")
        elif message["role"] == "assistant":
            parts.append(f" {content.strip()} {eos_token}")
    return "".join(parts)


class TemplateError(MellamaError):
    """`raise_exception(...)` called by a chat template."""


def _raise_template_error(message):
    raise TemplateError(message)


def load_template(directory: str | None, tokenizer):
    """(render, special-token strings, Jinja source): LLaMA-2-chat's, or the template of `directory`."""
    special = dict(LLAMA2_SPECIAL_TOKENS)
    if isinstance(tokenizer, HuggingFaceTokenizer):
        special.update(_hf_special_tokens(tokenizer))
    if directory is None:
        return render_llama2_chat, special, LLAMA2_CHAT_TEMPLATE
    source, config = _read_template_source(directory)
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[key] = value
    return _compile_jinja(source, directory), special, source


def _hf_special_tokens(tokenizer) -> dict:
    hf = tokenizer._tok  # the wrapper exposes ids only; rendering needs the token strings
    return {key: getattr(hf, key) for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if isinstance(getattr(hf, key, None), str)}


def _read_template_source(directory: str) -> tuple[str, dict]:
    flag = f"--chat-template-from {directory}"
    config_path = os.path.join(directory, "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as err:
            raise UsageError(f"{flag}: {config_path} is not readable JSON ({one_line(err)})") from None
    source = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(source, list):  # named templates, as some tokenizers ship them
        source = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}.get("default")
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if source is None and os.path.isfile(jinja_path):  # where transformers >= 4.47 saves it
        with open(jinja_path, encoding="utf-8") as f:
            source = f.read()
    if not isinstance(source, str) or not source.strip():
        raise UsageError(f"{flag}: no chat_template in {config_path} (nor a chat_template.jinja)")
    return source, config


def _compile_jinja(source: str, directory: str):
    """The template in the environment transformers' `apply_chat_template` renders it in."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UsageError("--chat-template-from needs jinja2 (pip install jinja2)") from None

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    try:
        template = env.from_string(source)
    except jinja2.TemplateError as err:
        raise UsageError(f"--chat-template-from {directory}: the chat template does not compile: "
                         f"{one_line(err)}") from None

    def render(messages, add_generation_prompt=False, **special_tokens):
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                   documents=None, **special_tokens)
        except Exception as err:  # a template's own bug (a TypeError too) shows on some records, not all
            raise Reject(f"template error: {one_line(err)}") from None

    return render


# ---- text -> ids ---------------------------------------------------------------------------------

# The template is rendered with these in place of the BOS and EOS strings, so that the ids of the
# template's BOS and EOS come from where the template put them, never from a literal "<s>" or "</s>"
# inside a message (HTML strike-through, say): message text is encoded as plain text, as Meta's
# `chat_completion` encodes it. Private-use code points, which no tokenizer's text holds.
BOS_MARK, EOS_MARK = "\ue000", "\ue001"


def marked_special_tokens(special_tokens: dict) -> dict:
    """The special-token strings to render with: the marks for BOS and EOS, the rest as they are."""
    return dict(special_tokens, bos_token=BOS_MARK, eos_token=EOS_MARK)


def text_encoder(tokenizer, special_tokens: dict):
    """A function from text rendered with `marked_special_tokens` to ids, no BOS added.

    SentencePiece: the marks become the BOS and EOS ids, the text between them is encoded as plain
    text, piece by piece, as Meta's code does. Hugging Face: the marks become the tokenizer's own
    BOS and EOS strings and the whole text is encoded with its special-token handling, as
    `apply_chat_template(tokenize=True)` does (encoding the pieces apart would change the spaces
    after each special token); `special_text_in` keeps special-token strings out of the messages."""
    if isinstance(tokenizer, HuggingFaceTokenizer):
        hf = tokenizer._tok  # the wrapper's tokenize adds BOS; a rendered chat carries its own
        strings = {BOS_MARK: special_tokens["bos_token"], EOS_MARK: special_tokens["eos_token"]}
        return lambda text: list(hf(re.sub(f"{BOS_MARK}|{EOS_MARK}", lambda m: strings[m.group()], text),
                                    add_special_tokens=False)["input_ids"])
    ids_of = {BOS_MARK: tokenizer.bos, EOS_MARK: tokenizer.eos}

    def encode(text: str) -> list[int]:
        ids = []
        for n, part in enumerate(re.split(f"({BOS_MARK}|{EOS_MARK})", text)):  # odd positions: the marks
            if n % 2:
                ids.append(ids_of[part])
            elif part:
                ids.extend(tokenizer.tokenize_plain(part))
        return ids

    return encode


def special_texts(tokenizer) -> tuple:
    """The strings that must not appear in a message: the marks, and those a Hugging Face tokenizer
    reads as special tokens inside text (SentencePiece reads text as text)."""
    if not isinstance(tokenizer, HuggingFaceTokenizer):
        return BOS_MARK, EOS_MARK
    hf = tokenizer._tok
    added = [t.content for t in getattr(hf, "added_tokens_decoder", {}).values() if getattr(t, "special", False)]
    return tuple(sorted({*hf.all_special_tokens, *added, BOS_MARK, EOS_MARK}, key=len, reverse=True))


def special_text_in(messages: list[dict], specials: tuple) -> None:
    """Reject a conversation whose text holds a special-token string, which the Hugging Face
    tokenizer would encode as the control token (an EOS inside an answer, trained)."""
    for n, message in enumerate(messages):
        found = next((t for t in specials if t and t in message["content"]), None)
        if found is not None:
            raise Reject(f"special-token text: message {n} holds {found!r}, which would be encoded as a "
                         "control token (with --tokenizer-type HuggingFaceTokenizer; Llama2Tokenizer reads "
                         "'<s>' and '</s>' as text)")


def encode_conversation(messages: list[dict], render, encode, special_tokens: dict) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a checked conversation; see the module docstring for the method."""
    ids: list[int] = []
    mask: list[int] = []
    for n, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        marked = marked_special_tokens(special_tokens)
        before = encode(render(messages[:n], add_generation_prompt=True, **marked))
        after = encode(render(messages[:n + 1], add_generation_prompt=False, **marked))
        if before[:len(ids)] != ids or after[:len(before)] != before:
            raise Reject(f"template boundaries: the tokens up to message {n} are not a prefix of the "
                         "tokens with it")
        if len(after) == len(before):
            raise Reject(f"empty answer: message {n} renders to no token")
        mask += [0] * (len(before) - len(ids)) + [1] * (len(after) - len(before))
        ids = after
    return ids, mask


# ---- the run -------------------------------------------------------------------------------------

@dataclass
class Totals:
    read: int = 0
    written: int = 0
    truncated: int = 0
    tokens: int = 0
    trained: int = 0
    bytes: int = 0


class Converter:
    """Turns one line into (ids, mask) under the run's template, tokenizer and length policy."""

    def __init__(self, args):
        self.system, self.render, self.special = args.system, args.template, args.special_tokens
        self.encode = text_encoder(args.tokenizer, args.special_tokens)
        self.specials = special_texts(args.tokenizer)
        self.seq_length, self.truncate = args.seq_length, args.overlong == "truncate"

    def __call__(self, raw: bytes) -> tuple[list[int], list[int], bool]:
        messages = conversation(parse_line(raw), self.system)
        special_text_in(messages, self.specials)
        try:
            ids, mask = encode_conversation(messages, self.render, self.encode, self.special)
        except UnicodeEncodeError:  # a JSON escape produced a lone surrogate
            raise Reject("invalid Unicode: lone surrogate") from None
        if len(ids) <= self.seq_length:
            return ids, mask, False
        if not self.truncate:
            raise Reject(f"longer than --seq-length {self.seq_length}: {len(ids)} tokens")
        ids, mask = ids[:self.seq_length], mask[:self.seq_length]
        if not any(mask):
            raise Reject(f"no answer within --seq-length {self.seq_length}: {len(messages)} messages")
        return ids, mask, True


def _lines(args):
    """(input path, line number, raw line or None, reader's reject reason or None) for every line."""
    for block in read_blocks(args.inputs, max_line_bytes=args.max_line_bytes):
        path = args.inputs[block.file_index]
        for line, reason in block.rejects:
            yield path, line, None, reason
        for offset, raw in enumerate(block.data.split(b"\n")):
            if raw.strip():  # blank lines (a trailing newline, CRLF leftovers) are not records
                yield path, block.first_line + offset, raw, None


def run(args) -> int:
    try:
        with output_lock(args.output_prefix):
            return _run_locked(args)
    except OutputLocked as err:
        raise PreprocessError(f"--output-prefix {args.output_prefix}: {err}") from None


def _output_paths(prefix: str, name: str) -> tuple[str, str]:
    return f"{prefix}_{name}_document.bin", f"{prefix}_{name}_document.idx"


def _run_locked(args) -> int:
    convert = Converter(args)
    totals, rejects = Totals(), Rejects()
    rejected_path = f"{args.output_prefix}_rejected.jsonl"
    start = time.time()
    text = mask = rejected = rejected_tmp = template_tmp = None
    committed = False
    try:  # from the first temporary file on: any failure removes them all
        text = IndexedWriter(*_output_paths(args.output_prefix, "text"), optimal_dtype(args.tokenizer.vocab_size))
        mask = IndexedWriter(*_output_paths(args.output_prefix, "loss_mask"), np.uint8)
        rejected_tmp = temp_path(os.path.dirname(os.path.abspath(rejected_path)), os.path.basename(rejected_path),
                                 ".tmp")
        rejected = open(rejected_tmp, "w", encoding="utf-8")
        final_template = template_path(args.output_prefix)
        template_tmp = temp_path(os.path.dirname(os.path.abspath(final_template)), os.path.basename(final_template),
                                 ".tmp")
        with open(template_tmp, "w", encoding="utf-8") as f:
            f.write(args.template_source)
        for path, line, raw, reason in _lines(args):
            totals.read += 1
            totals.bytes += len(raw) + 1 if raw is not None else 0
            if raw is not None:
                try:
                    ids, loss_mask, truncated = convert(raw)
                except Reject as err:
                    reason = str(err)
            if reason is not None:
                if args.strict:
                    print(f"{PROG}: error: {path}:{line}: {reason} (--strict: no output written)", file=sys.stderr)
                    return 1
                rejected.write(json.dumps({"file": path, "line": line, "reason": reason}) + "\n")
                rejects.add(path, line, reason)
            else:
                text.add_document(ids, [len(ids)])
                mask.add_document(loss_mask, [len(loss_mask)])
                totals.written += 1
                totals.truncated += truncated
                totals.tokens += len(ids)
                totals.trained += sum(loss_mask)
            if totals.read % args.log_interval == 0:
                print(f"processed {totals.read} records ({totals.bytes / 1e6:.1f} MB, "
                      f"{totals.read / max(time.time() - start, 1e-9):.0f} records/s)", file=sys.stderr, flush=True)
        rejects.check(args, totals.written)
        rejected.close()
        for writer in (text, mask):
            writer.finalize()
        for writer in (text, mask):
            writer.commit()
        os.replace(template_tmp, final_template)
        os.replace(rejected_tmp, rejected_path)
        committed = True
    finally:
        if not committed:
            _remove_temporaries(rejected, (rejected_tmp, template_tmp), (text, mask))
    print(summary(args, totals, rejects))
    return 0


def _remove_temporaries(rejected, temporaries, writers) -> None:
    if rejected is not None:
        with contextlib.suppress(OSError):
            rejected.close()
    for writer in writers:
        if writer is not None:
            writer.abort()
    for path in temporaries:
        if path is not None:
            with contextlib.suppress(OSError):
                os.remove(path)


def summary(args, totals: Totals, rejects) -> str:
    by_reason = ", ".join(f"{kind} x {n}" for kind, n in rejects.kinds.most_common())
    trained = totals.trained / totals.tokens if totals.tokens else 0.0
    return (f"done: {totals.read} records read, {totals.written} written ({totals.truncated} truncated), "
            f"{rejects.count} rejected{f' ({by_reason})' if by_reason else ''}; {totals.tokens} tokens, "
            f"{totals.trained} trained ({trained:.1%}) -> {args.output_prefix}_{{text,loss_mask}}_document.{{bin,idx}}"
            + (f"; rejected records listed in {args.output_prefix}_rejected.jsonl" if rejects.count else ""))


def main(argv=None) -> int:
    return run_tool(PROG, lambda: parse_args(argv), lambda args: run_until_signalled(PROG, run, args))


if __name__ == "__main__":
    sys.exit(main())
