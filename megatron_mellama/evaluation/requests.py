"""Items -> fixed-shape token rows, tokenized exactly as lm-evaluation-harness's HF model does.

lm-eval scores a choice by the log-likelihood of a (context, continuation) pair. Its HF model
(`lm_eval.models.huggingface.HFLM`, read in 0.4.13) turns the pair into tokens so:

1. trailing whitespace of the context moves to the front of the continuation;
2. `whole = encode(context + continuation)`, `context_enc = encode(context)`,
   `continuation_enc = whole[len(context_enc):]` (the continuation's tokens are those of the whole
   text past the context's, so a word split differently inside the whole text is still scored);
3. the model reads `(context_enc + continuation_enc)[-(S + 1):][:-1]` (left-truncated to its length S)
   and the last `len(continuation_enc)` predictions are scored.

`encode` is the tokenizer's own `encode(text)` with its default special tokens (HFLM's
`add_bos_token=None`): a LLaMA tokenizer prepends BOS to both encodings. `add_bos=True/False`
forces it as HFLM's `add_bos_token` does. One departure from HFLM: the text is plain text
(`split_special_tokens=True`), so a literal "<s>" or "</s>" in an item (HTML strike-through) is
encoded as its characters, as SentencePiece encodes it and as training data is, never as a BOS or
EOS id in the middle of a prompt; HFLM's rule for a text that starts with the BOS string goes
with it.

`encode_requests` turns each (item, choice) into a `Request`, its two token lists (cheap to keep
for a whole task); `rows_from_requests` makes fixed-shape rows of some of them, one per request:
`tokens[S]` (the model's input), `labels[S]` (the next token at each position) and `loss_mask[S]`
(1 on the continuation's labels only). Rows are padded at the end with token 0 and mask 0;
attention is causal, so padding after a row's tokens never changes them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from .tasks import Item
from ..errors import MellamaError

Encode = Callable[[str], list]  # text -> token ids, special tokens included as the model expects them


class RequestError(MellamaError, ValueError):
    """A choice that cannot be scored; `item` is the index of its item."""

    def __init__(self, item: int, message: str):
        super().__init__(message)
        self.item = item


def hf_encoder(tokenizer, add_bos: bool | None = None) -> Encode:
    """A `transformers` tokenizer's encoding as HFLM's `tok_encode` does it, on plain text (see
    the module docstring).

    `add_bos=None` keeps the tokenizer's default (`add_special_tokens` unset: LLaMA adds BOS)."""

    def encode(text: str) -> list:
        kwargs = {} if add_bos is None else {"add_special_tokens": add_bos}
        return list(tokenizer.encode(text, split_special_tokens=True, **kwargs))

    return encode


def sentencepiece_encoder(tokenizer, add_bos: bool = True) -> Encode:
    """One of our SentencePiece tokenizers (`data.tokenizer.Llama2Tokenizer` or
    `SentencePieceTokenizer`), BOS first by default as the LLaMA tokenizer's HF form does."""
    def encode(text: str) -> list:
        # plain text: Megatron's SentencePieceTokenizer.tokenize would read "<s>" as BOS
        return ([tokenizer.bos] if add_bos else []) + tokenizer.tokenize_plain(text)

    return encode


def tokenizer_encoder(tokenizer_type: str, tokenizer_model: str, add_bos: bool | None = None) -> Encode:
    """The encoding of a run's tokenizer (`--tokenizer-type`, `--tokenizer-model`); `add_bos` as
    `hf_encoder`'s (None: the tokenizer's default, BOS first for LLaMA)."""
    from ..data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)  # one-line errors for a bad path
    if tokenizer_type != "HuggingFaceTokenizer":
        return sentencepiece_encoder(tokenizer, add_bos is not False)
    # lm-eval encodes with the transformers tokenizer itself (its special-token defaults), which
    # our HuggingFaceTokenizer wraps without exposing; it was just read from this folder
    import transformers

    return hf_encoder(transformers.AutoTokenizer.from_pretrained(tokenizer_model, local_files_only=True), add_bos)


def encode_pair(encode: Encode, context: str, continuation: str) -> tuple[list, list]:
    """(context tokens, continuation tokens), split as HFLM's `_encode_pair` splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(context + continuation)
    context_enc = encode(context)
    return context_enc, whole[len(context_enc):]


@dataclasses.dataclass(frozen=True)
class Request:
    """One (item, choice) as token ids: what the model reads before the choice, and the choice."""

    item: int
    choice: int
    context: list
    continuation: list


def encode_requests(items: Sequence[Item], encode: Encode) -> list:
    """Every choice of every item, in item order then choice order."""
    requests = []
    for i, item in enumerate(items):
        for c, continuation in enumerate(item.continuations):
            context_enc, continuation_enc = encode_pair(encode, item.prompt, continuation)
            if not continuation_enc:
                raise RequestError(i, f"choice {c}: the continuation {continuation!r} has no tokens of its own")
            requests.append(Request(item=i, choice=c, context=context_enc, continuation=continuation_enc))
    return requests


@dataclasses.dataclass
class Rows:
    """Fixed-shape rows, one per request, in the requests' order."""

    tokens: torch.Tensor  # int64 [rows, S]
    labels: torch.Tensor  # int64 [rows, S]
    loss_mask: torch.Tensor  # float32 [rows, S]
    item: list  # the item index of each row
    choice: list  # the choice index of each row

    def __len__(self) -> int:
        return len(self.item)


def rows_from_requests(requests: Sequence[Request], seq_length: int) -> Rows:
    n = len(requests)
    tokens = torch.zeros(n, seq_length, dtype=torch.long)
    labels = torch.zeros(n, seq_length, dtype=torch.long)
    loss_mask = torch.zeros(n, seq_length, dtype=torch.float32)
    for row, r in enumerate(requests):
        if len(r.continuation) > seq_length:
            raise RequestError(r.item, f"choice {r.choice}: the continuation alone is {len(r.continuation)} tokens, "
                               f"longer than the sequence length {seq_length}")
        # the last S + 1 tokens: S inputs and their S next tokens (HFLM's left truncation)
        window = (r.context + r.continuation)[-(seq_length + 1):]
        length = len(window) - 1
        tokens[row, :length] = torch.tensor(window[:-1])
        labels[row, :length] = torch.tensor(window[1:])
        loss_mask[row, length - len(r.continuation):length] = 1.0
    return Rows(tokens=tokens, labels=labels, loss_mask=loss_mask, item=[r.item for r in requests],
                choice=[r.choice for r in requests])


def build_rows(items: Sequence[Item], encode: Encode, seq_length: int) -> Rows:
    """Every choice of every item as a fixed-shape row of `seq_length` tokens."""
    return rows_from_requests(encode_requests(items, encode), seq_length)
