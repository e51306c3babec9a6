"""The configurable fields: each dataclass field with a --help text is one flag and one YAML key."""

from __future__ import annotations

import dataclasses
import typing

from .sections import SECTIONS, Config


def configurable_fields():
    """(section, dataclasses.Field, python type) for every configurable field."""
    for section in SECTIONS:
        cls = Config.__dataclass_fields__[section].default_factory
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "help" not in f.metadata:
                continue
            kind = hints[f.name]
            if typing.get_origin(kind) is typing.Union:  # Optional[X]
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            if typing.get_origin(kind) is list:
                kind = list
            yield section, f, kind


def field_index() -> dict:
    """{field name: (section, dataclasses.Field, python type)}."""
    return {f.name: (section, f, kind) for section, f, kind in configurable_fields()}


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")
