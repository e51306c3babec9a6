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

from megatron_mellama.data.chat_template import template_path
from megatron_mellama.data.fast_tokenizer import TokenizerMismatch
from megatron_mellama.data.indexed_writer import IndexedWriter, optimal_dtype, temp_path
from megatron_mellama.data.jsonl_reader import read_blocks
from megatron_mellama.data.tokenizer import HuggingFaceTokenizer
from megatron_mellama.tools import preprocess_flags as flags
from megatron_mellama.tools import tokenizer_backend
from megatron_mellama.tools.cli import OneLineParser, UsageError, run_tool
from megatron_mellama.tools.preprocess_run import Rejects, run_until_signalled, under_output_lock
from megatron_mellama.tools.preprocess_sft_records import Reject, conversation, parse_line
from megatron_mellama.tools.preprocess_sft_template import load_template

PROG = "mellama-preprocess-sft"
DEFAULT_SEQ_LENGTH = 4096  # LLaMA-2's context


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, allow_abbrev=False, description=__doc__.split("\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input data")
    flags.add_input(g)
    flags.add_max_line_bytes(g, "a JSONL line longer than this is rejected unread")
    g = p.add_argument_group("chat template")
    g.add_argument("--chat-template-from", metavar="DIR",
                   help="render with the Jinja chat template of DIR/tokenizer_config.json (default: LLaMA-2-chat's)")
    g.add_argument("--system", metavar="TEXT", help="system prompt for records that have none")
    g = p.add_argument_group("tokenizer")
    flags.add_tokenizer(g, model_required=True)
    g.add_argument("--seq-length", type=int, default=DEFAULT_SEQ_LENGTH, metavar="N",
                   help=f"longest conversation in tokens (default {DEFAULT_SEQ_LENGTH})")
    g.add_argument("--overlong", choices=("drop", "truncate"), default="drop",
                   help="a longer conversation is rejected (drop, the default) or cut to its first N tokens "
                        "(truncate; rejected when no answer token is left)")
    g = p.add_argument_group("output data")
    flags.add_output(g)
    g = p.add_argument_group("runtime")
    flags.add_runtime(g, counted="records",
                      max_reject_fraction_help="fail (exit 1, no output written) when more than this share of the "
                                               "records is rejected, or all of them are (default 0.1)")
    return p


def parse_args(argv):
    args = build_parser().parse_args(argv)
    if args.seq_length < 1:
        raise UsageError(f"--seq-length {args.seq_length} must be at least 1")
    flags.check_common_args(args)
    args.template, args.special_tokens, args.template_source = load_template(args.chat_template_from,
                                                                             args.tokenizer)
    return args


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
    return under_output_lock(_run_locked, args)


def _output_paths(prefix: str, name: str) -> tuple[str, str]:
    return f"{prefix}_{name}_document.bin", f"{prefix}_{name}_document.idx"


def _run_locked(args) -> int:
    convert = Converter(args)
    print(args.backend_line, flush=True)
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
                except TokenizerMismatch as err:
                    raise tokenizer_backend.mismatch_error(path, line, str(err)) from None
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
    if hasattr(args.tokenizer.encoder, "take_counts"):
        print(tokenizer_backend.exactness_line(*args.tokenizer.encoder.take_counts()))
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
