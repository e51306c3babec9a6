"""The configuration reference, `docs/configuration.md`, written from the flags themselves: every
flag of `pretrain` (and of `tools/plan_layout.py`, which takes the same), its default and its help,
by section, then the Megatron-LM flags accepted for launch scripts. A test fails when the file and
the parser differ; regenerate it with

    python -m megatron_mellama.config.reference > docs/configuration.md
"""

from __future__ import annotations

import dataclasses

from . import compat
from .fields import configurable_fields, flag_of

_INTRO = """# Configuration reference

Generated from the argument parser by `python -m megatron_mellama.config.reference`; a test fails
when this file and the parser differ. Flags carry Megatron-LM's names where Megatron-LM has the
setting. Any flag may also be a key of the `--config` YAML file (dashes or underscores);
precedence, lowest first: these defaults, the `--model` preset, the YAML file, the command line.
A default of "-" means unset: derived from other values (the preset, the tokenizer, the sharding
mode) or the feature is off.

| flag | default | meaning |
| --- | --- | --- |
| `--config FILE.yaml` | - | YAML file setting any of the flags below; flags win |
| `--model PRESET` | - | start from a preset model shape: llama2-7b, llama2-13b, llama2-70b, tiny |
"""


def _default(f: dataclasses.Field, kind) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        value = None
    if value is None or value == []:
        return "-"
    if kind is bool:
        return "on" if value else "off"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    out = [_INTRO]
    section = None
    for name, f, kind in configurable_fields():
        if name != section:
            section = name
            out.append(f"\n## {section}\n\n| flag | default | meaning |\n| --- | --- | --- |\n")
        flag = flag_of(f)
        if kind is bool and f.default is None:
            flag += f"` / `--no-{flag[2:]}"
        choices = f.metadata.get("choices")
        meaning = f.metadata["help"] + (f" (one of: {', '.join(map(str, choices))})" if choices else "")
        out.append(f"| `{flag}` | {_cell(_default(f, kind))} | {_cell(meaning)} |\n")
    out.append("\n## Accepted for Megatron-LM launch scripts\n\n"
               "What LLaMA2 always is; a value that asks for another architecture is refused.\n\n"
               "| flag | accepted value |\n| --- | --- |\n")
    for name in compat.ALWAYS_ON:
        out.append(f"| `--{name.replace('_', '-')}` | always on here |\n")
    for name, (value, why) in compat.FIXED_VALUES.items():
        out.append(f"| `--{name.replace('_', '-')}` | {value} only ({why}) |\n")
    for name, choices in compat.IGNORED_CHOICES.items():
        out.append(f"| `--{name.replace('_', '-')}` | {', '.join(choices)} (ignored) |\n")
    return "".join(out)


if __name__ == "__main__":
    print(render(), end="")
