"""The chat template an instruction-tuning dataset was rendered with, kept beside it and carried to
the export, so that the exported model is prompted the way it was trained.

`tools/preprocess_sft.py` writes the template's Jinja source to `PREFIX_chat_template.jinja` beside
`PREFIX_{text,loss_mask}_document.{bin,idx}`; `pretrain --sft` reads it from every `--data-path`
prefix and records it in each checkpoint's train state; `mellama_to_hf` writes it into the exported
`tokenizer_config.json` (`chat_template`), where transformers' `apply_chat_template` finds it.
"""

from __future__ import annotations

# meta-llama/Llama-2-7b-chat-hf's `chat_template`, as published: the Jinja form of the LLaMA-2-chat
# rendering `tools/preprocess_sft.py` does without jinja2 (a test holds the two equal).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")

TEMPLATE_SUFFIX = "_chat_template.jinja"


def template_path(prefix: str) -> str:
    """Where the template of the SFT dataset `prefix` is kept."""
    return prefix + TEMPLATE_SUFFIX


def read_template(prefix: str) -> str | None:
    """The template `prefix` was rendered with; None for data written without one."""
    try:
        with open(template_path(prefix), encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def run_template(prefixes: list) -> tuple[str | None, str | None]:
    """(the one template every prefix was rendered with, or None; a line saying why there is none)."""
    found = {p: read_template(p) for p in prefixes}
    sources = set(found.values())
    if len(sources) == 1 and None not in sources:
        return sources.pop(), None
    missing = [p for p, s in found.items() if s is None]
    if missing:
        return None, (f"no chat template beside {', '.join(missing)} (no {TEMPLATE_SUFFIX}): the export will "
                      "carry none unless mellama_to_hf is given --chat-template")
    return None, ("the --data-path prefixes were rendered with different chat templates: the export will carry "
                  "none unless mellama_to_hf is given --chat-template")
