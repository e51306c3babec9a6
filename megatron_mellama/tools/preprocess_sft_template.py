"""preprocess_sft's chat template: LLaMA-2-chat's (rendered without jinja2), or the Jinja template of a
Hugging Face tokenizer directory (--chat-template-from), rendered as transformers renders it.
"""

from __future__ import annotations

import json
import os
import time

from megatron_mellama.data.chat_template import LLAMA2_CHAT_TEMPLATE
from megatron_mellama.data.tokenizer import HuggingFaceTokenizer
from megatron_mellama.tools.cli import UsageError
from megatron_mellama.tools.preprocess_run import one_line
from megatron_mellama.tools.preprocess_sft_records import Reject

from ..errors import MellamaError

LLAMA2_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


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
