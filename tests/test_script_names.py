"""A script's file name is a module name: `python benchmarks/X.py` puts `benchmarks/` first on
`sys.path`, so a script named like an installed package becomes that package for every library the
script imports (transformers 5.25 imports Hugging Face's `kernels` whenever it is importable, and
found `benchmarks/kernels.py` instead). No runnable script may share its name with a module of the
standard library or of the environment the README's set-up installs."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_FOLDERS = ("benchmarks", "tools", "checkpoints_convert", "examples")


def _scripts():
    for folder in SCRIPT_FOLDERS:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _module_elsewhere(name: str, own_folder: Path) -> bool:
    """Whether `import name` finds something when the script's own folder is not on the path."""
    if name in sys.stdlib_module_names:
        return True
    own = own_folder.resolve()
    saved = sys.path[:]
    try:
        sys.path[:] = [p for p in saved if Path(p or ".").resolve() != own]
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
    finally:
        sys.path[:] = saved


@pytest.mark.parametrize("script", list(_scripts()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_script_shadows_an_installed_or_standard_module(script):
    assert not _module_elsewhere(script.stem, script.parent), (
        f"{script.relative_to(ROOT)} is named like the module `{script.stem}`: running it would make every "
        f"`import {script.stem}` in the libraries it uses load this script instead; rename it")


def test_the_check_sees_the_case_that_broke():
    """The check itself finds a shadowing name (the stand-in: a stdlib module, present everywhere)."""
    assert _module_elsewhere("json", ROOT / "benchmarks")
    assert not _module_elsewhere("kernel_speed", ROOT / "benchmarks")
