"""Command line and YAML -> the given settings -> Config.

Precedence, lowest first: dataclass defaults, the `--model` preset, the `--config` YAML file,
flags on the command line (`resolve` applies them and derives the rest).
"""

from __future__ import annotations

import argparse
import difflib
import math
from typing import Callable, Optional

from . import compat
from .errors import ConfigError
from .fields import configurable_fields, field_index, flag_of
from .presets import PRESETS
from .resolve import resolve
from .sections import Config, DataConfig
from .validate import validate


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump, no SystemExit from inside a library
        raise ConfigError(message)


def build_parser(prog: str = "pretrain", description: Optional[str] = None) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description, allow_abbrev=False, argument_default=argparse.SUPPRESS,
                     usage="%(prog)s [--model PRESET] [--config FILE.yaml] [flags]")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file setting any of the flags below; flags win")
    parser.add_argument("--model", dest="preset", choices=sorted(PRESETS), help="start from a preset model shape")
    groups = {}
    for section, f, kind in configurable_fields():
        if section not in groups:
            groups[section] = parser.add_argument_group(section)
        kwargs = dict(dest=f"{section}.{f.name}", help=f.metadata["help"])
        if kind is bool:
            # a flag whose default is decided from others (None) can also be turned off
            kwargs.update(action=argparse.BooleanOptionalAction if f.default is None else "store_true")
        elif kind is list:
            kwargs.update(nargs="+", metavar=f.metadata.get("metavar"))
        else:
            choices = f.metadata.get("choices")
            kwargs.update(type=kind, choices=choices, metavar=None if choices else f.name.upper())
        if f.default is not None and kind is not bool:
            kwargs["help"] += f" (default: {f.default})"
        groups[section].add_argument(flag_of(f), **kwargs)
    compat.add_compat_flags(parser.add_argument_group("accepted for Megatron-LM launch scripts"))
    return parser


def _coerce_yaml(path: str, key: str, value, kind, choices):
    where = f"{path}: key '{key}'"
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} expects true or false, got {value!r}")
        return value
    if kind is list:
        if isinstance(value, str):
            return value.split()
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        raise ConfigError(f"{where} expects a list, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} expects an integer, got {value!r}")
    elif kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} expects a number, got {value!r}")
        try:  # YAML reads 1e-5 (no dot) as a string
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} expects a number, got {value!r}") from None
        if not math.isfinite(value):  # YAML's .inf and .nan
            raise ConfigError(f"{where} expects a finite number, got {value!r}")
    elif kind is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} expects a string, got {value!r}")
        value = str(value)
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def load_yaml(path: str) -> dict:
    """The YAML file as {'section.field' or 'compat.name' or 'preset': value}."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path}: is a directory; expected a YAML file") from None
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e}); expected a readable YAML file") \
            from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not UTF-8 text; expected a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark else ""
        raise ConfigError(f"--config {path}:{line} not valid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    index, extra = field_index(), compat.compat_names()
    out = {}
    for key, value in raw.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name == "model":
            if value not in PRESETS:
                raise ConfigError(f"{path}: key 'model': {value!r} is not one of {', '.join(sorted(PRESETS))}")
            out["preset"] = value
        elif name in index:
            section, f, kind = index[name]
            out[f"{section}.{name}"] = _coerce_yaml(path, key, value, kind, f.metadata.get("choices"))
        elif name in extra:
            try:  # the refusal a command-line value gets, naming the file and key as well
                compat.check_compat_value(name, value)
            except ConfigError as e:
                raise ConfigError(f"{path}: key '{key}': {e}") from None
            out[f"compat.{name}"] = value
        else:
            close = difflib.get_close_matches(name, list(index) + ["model"], n=1)
            hint = f" (did you mean '{close[0].replace('_', '-')}'?)" if close else ""
            raise ConfigError(f"{path}: unknown key '{key}'{hint}")
    return out


def read_given(argv=None, parser: Optional[argparse.ArgumentParser] = None) -> dict:
    """What the flags and their `--config` YAML file set, flags winning: {'section.field' or
    'compat.name' or 'preset': value}. Neither defaults nor the preset's values are in it."""
    parser = parser or build_parser()
    given = vars(parser.parse_args(argv))
    explicit = load_yaml(given.pop("config")) if "config" in given else {}
    explicit.update(given)
    return explicit


def parse_config(argv=None, *, world_size: int = 1,
                 vocab_size_of: Optional[Callable[[DataConfig], int]] = None,
                 parser: Optional[argparse.ArgumentParser] = None) -> Config:
    """Flags (and their YAML file) -> a resolved, validated Config for a run of `world_size`
    processes that loads no checkpoint's recorded values (`resolve` takes those from its caller).

    `vocab_size_of(data_config)` gives the tokenizer's vocabulary size; it is used unless the
    vocabulary size was set explicitly.
    """
    cfg, _ = resolve(read_given(argv, parser), world_size=world_size, vocab_size_of=vocab_size_of)
    validate(cfg)
    return cfg
