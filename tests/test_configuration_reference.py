"""docs/configuration.md is the parser's own account of the flags: it names every flag `pretrain`
accepts, and is exactly what `python -m megatron_mellama.config.reference` writes today."""

import re
from pathlib import Path

from megatron_mellama.config.cli import build_parser
from megatron_mellama.config.reference import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_the_reference_is_what_the_parser_generates():
    assert DOC.read_text() == render(), (
        "docs/configuration.md differs from the flags: python -m megatron_mellama.config.reference > "
        "docs/configuration.md")


def test_the_reference_names_every_flag_of_the_parser():
    flags = {s for action in build_parser()._actions for s in action.option_strings if s.startswith("--")}
    flags -= {"--help"}
    named = set(re.findall(r"`(--[a-z0-9_-]+)", render()))
    assert flags - named == set()
    assert named - flags == set()
