"""Every command in README.md, docs/, benchmarks/README.md and tests/README.md runs as written.

The fenced shell blocks (```bash, ```sh, ```shell, ```console) are read as a shell reads them
(continuation lines joined, comments dropped, `&&`, `;` and `|` separating commands, leading
`VAR=value` assignments skipped). A command that invokes one of the project's entry points
(`python -m megatron_mellama...`, `torchrun ... -m megatron_mellama.pretrain`, a console script of
setup.py, `python tools/...`, `checkpoints_convert/...`, `benchmarks/...`, the launch scripts,
which hand their arguments to `pretrain`) must name a file or module that exists, and every
`--flag` it uses must be one its argument parser accepts. The parsers are the entry points' own:
each is run in this process with `--help` while every parser it asks to parse is recorded (the job
never starts). Other shell scripts of the repository must mention each flag they are given.
Commands ending in `--help` are also run as written, in a subprocess. Every relative link of the
docs points to a file that exists and, with an anchor, to one of its headings, and every file the
docs name in code spans (`training/loop.py`, `run_13b.sh`) is in the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import io
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), REPO / "benchmarks" / "README.md",
        REPO / "tests" / "README.md"]
SHELL_FENCES = {"bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
PACKAGE = "megatron_mellama"
PRETRAIN = ("module", f"{PACKAGE}.pretrain")
# shell scripts that pass every argument to `pretrain` unchanged
LAUNCHERS = {"launch/torchrun_single_node.sh", "launch/slurm_multi_node.sbatch"}
SCRIPT_FOLDERS = ("tools/", "benchmarks/", "checkpoints_convert/", "examples/", "launch/")


def console_scripts() -> dict[str, str]:
    """setup.py's console scripts: name -> 'module:function'."""
    text = (REPO / "setup.py").read_text(encoding="utf-8")
    return dict(re.findall(r'"(mellama-[\w-]+)=([\w.]+:\w+)"', text))


def shell_blocks(text: str) -> list[str]:
    blocks = re.findall(r"(?ms)^```(\w*)[^\n]*\n(.*?)^```", text)
    return [body for lang, body in blocks if lang in SHELL_FENCES]


def commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block, each as its words."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = ""  # a '#' inside a word is no comment; one opening a word is
        words = []
        for word in lexer:
            if word.startswith("#"):
                break
            words.append(word)
        current: list[str] = []
        redirected = False
        for word in words + [";"]:
            if word in SEPARATORS:
                if current:
                    found.append(current)
                current, redirected = [], False
            elif redirected or set(word) <= set("<>()&") or word.startswith(("<", ">")):
                redirected = True  # a redirection: what follows is no argument
            else:
                current.append(word)
    return [strip_assignments(c) for c in found if strip_assignments(c)]


def strip_assignments(words: list[str]) -> list[str]:
    i = 0
    while i < len(words) and re.fullmatch(r"[A-Za-z_]\w*=.*", words[i]):
        i += 1
    return words[i:]


def entry_point(words: list[str]):
    """(target, its arguments) when the command runs one of the project's entry points, else None.

    A target is ('module', name), ('script', path), ('console', 'module:function') or ('shell', path)."""
    prog, rest = words[0], words[1:]
    scripts = console_scripts()
    if prog in scripts:
        return ("console", scripts[prog]), rest
    if re.fullmatch(r"python3?", prog) or prog == "torchrun":
        for i, word in enumerate(rest):
            if word == "-m" and i + 1 < len(rest):
                module = rest[i + 1]
                return (("module", module), rest[i + 2:]) if module.split(".")[0] == PACKAGE else None
            if word.endswith(".py"):
                return (("script", word), rest[i + 1:]) if word.startswith(SCRIPT_FOLDERS) else None
            if prog.startswith("python") and not word.startswith("-"):
                return None
        return None
    if prog in ("bash", "sh", "sbatch", "srun"):
        for i, word in enumerate(rest):
            if word.startswith(SCRIPT_FOLDERS):
                return ("shell", word), rest[i + 1:]
        return None
    if prog.startswith(SCRIPT_FOLDERS):
        return ("shell", prog), rest
    return None


def run_for_help(target) -> None:
    """Runs the entry point as its command line would, with argv [name, '--help']."""
    kind, name = target
    if kind == "module":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the module may be imported already
            runpy.run_module(name, run_name="__main__", alter_sys=True)
    elif kind == "script":
        runpy.run_path(str(REPO / name), run_name="__main__")
    else:
        module, function = name.split(":")
        sys.exit(getattr(importlib.import_module(module), function)())


def _forget_script_neighbours() -> None:
    """A script imports the files beside it as top-level modules (its folder first on sys.path);
    left in sys.modules, `benchmarks/convert.py` would answer every later `import convert` here."""
    folders = {(REPO / folder).resolve() for folder in SCRIPT_FOLDERS}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if "." not in name and path and Path(path).resolve().parent in folders:
            del sys.modules[name]


@functools.lru_cache(maxsize=None)
def accepted_flags(target) -> frozenset[str]:
    """Every option string of every parser the entry point parses with, found by running its --help."""
    parsers = []
    parse_known_args = argparse.ArgumentParser.parse_known_args

    def recording(self, args=None, namespace=None):
        parsers.append(self)
        return parse_known_args(self, args, namespace)

    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", recording), \
            mock.patch.object(sys, "argv", [target[1], "--help"]), \
            mock.patch.object(sys, "path", [str(REPO), *sys.path]), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_for_help(target)
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            _forget_script_neighbours()
    assert code in (0, None), f"{target[1]} --help exited {code}: {err.getvalue()[-2000:]}"
    assert parsers and "usage:" in out.getvalue(), f"{target[1]} --help printed no usage"
    return frozenset(s for p in parsers for action in p._actions for s in action.option_strings)


def exists(target) -> bool:
    kind, name = target
    if kind in ("script", "shell"):
        return (REPO / name).is_file()
    module = name.split(":")[0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def flags_of(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--") and len(a) > 2]


def problems(text: str, where: str = "doc") -> list[str]:
    """What is wrong with the commands of a Markdown text, one line each."""
    found = []
    for block in shell_blocks(text):
        for words in commands(block):
            resolved = entry_point(words)
            if resolved is None:
                continue
            target, args = resolved
            shown = " ".join(words)
            if not exists(target):
                found.append(f"{where}: `{shown}`: no {target[1]}")
                continue
            for arg in args:
                if arg.startswith(SCRIPT_FOLDERS) and not (REPO / arg).exists():
                    found.append(f"{where}: `{shown}`: no file {arg}")
            flags = flags_of(args)
            if not flags:
                continue
            if target[0] == "shell" and target[1] not in LAUNCHERS:
                script = (REPO / target[1]).read_text(encoding="utf-8")
                known = {f for f in flags if f in script}
            else:
                known = accepted_flags(PRETRAIN if target[0] == "shell" else target)
            for flag in flags:
                if flag not in known:
                    found.append(f"{where}: `{shown}`: {target[1]} has no flag {flag}")
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_of_the_doc_names_what_exists_and_only_flags_its_parser_accepts(doc):
    assert problems(doc.read_text(encoding="utf-8"), str(doc.relative_to(REPO))) == []


def test_the_docs_hold_commands_of_every_kind_checked():
    kinds = set()
    for doc in DOCS:
        for block in shell_blocks(doc.read_text(encoding="utf-8")):
            for words in commands(block):
                resolved = entry_point(words)
                if resolved:
                    kinds.add(resolved[0][0])
    assert kinds == {"module", "script", "console", "shell"}


def help_commands() -> list[list[str]]:
    found = []
    for doc in DOCS:
        for block in shell_blocks(doc.read_text(encoding="utf-8")):
            for words in commands(block):
                if words[-1] == "--help" and entry_point(words) and words not in found:
                    found.append(words)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("words", help_commands(), ids=" ".join)
def test_help_commands_run_as_written(words):
    argv = [sys.executable, *words[1:]] if re.fullmatch(r"python3?", words[0]) else words
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_the_readme_test_command_is_the_one_ci_runs():
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip().startswith("python -m pytest")]
    readme = [" ".join(c) for block in shell_blocks((REPO / "README.md").read_text(encoding="utf-8"))
              for c in commands(block) if c[:3] == ["python", "-m", "pytest"]]
    assert len(ci) == 1 and readme, (ci, readme)
    assert readme[0] == " ".join(shlex.split(ci[0])), (readme[0], ci[0])


SYNTHETIC = """
Some prose with `--inline-flags` that are not checked.

```bash
python tools/preprocess_data.py --input 'x/*.jsonl' --output-prefx data/x \\
    --tokenizer-type Llama2Tokenizer   # a comment --not-a-flag
DRY_RUN=1 torchrun --nproc-per-node 2 -m megatron_mellama.pretrain --mock-data --trian-iters 3 && echo done
mellama-to-hf --load ckpt --hf-dir out --dtyp bf16
bash launch/torchrun_single_node.sh --tensor-model-parallel-size 2 --micro-batch-sise 1
python benchmarks/engine.py --seq-length 256 --no-such-flag
python tools/no_such_tool.py --input x
bash benchmarks/gpu_check.sh --gpu-only
```

```text
python tools/preprocess_data.py --not-checked-in-a-text-block
```
"""


def test_a_misspelled_flag_a_missing_tool_and_an_unknown_script_flag_are_found():
    found = problems(SYNTHETIC, "synthetic.md")
    assert [line.rsplit(" ", 1)[-1] for line in found] == [
        "--output-prefx", "--trian-iters", "--dtyp", "--micro-batch-sise", "--no-such-flag",
        "tools/no_such_tool.py", "--gpu-only"]
    assert all(line.startswith("synthetic.md: `") for line in found)


def test_correct_commands_of_each_kind_pass():
    text = SYNTHETIC.replace("--output-prefx", "--output-prefix").replace("--trian-iters", "--train-iters")
    text = text.replace("--dtyp ", "--dtype ").replace("--micro-batch-sise", "--micro-batch-size")
    text = text.replace(" --no-such-flag", "").replace("no_such_tool", "merge_datasets").replace("--gpu-only", "--cpu")
    assert problems(text) == []


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (fenced blocks hold none)."""
    anchors, seen = set(), {}
    for line in re.sub(r"(?ms)^```.*?^```", "", text).splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def broken_links(doc: Path) -> list[str]:
    found = []
    text = re.sub(r"(?ms)^```.*?^```", "", doc.read_text(encoding="utf-8"))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            found.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file.read_text(encoding="utf-8")):
            found.append(f"{target}: no such heading")
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_of_the_doc_reaches_its_file_and_heading(doc):
    assert broken_links(doc) == []


@functools.lru_cache(maxsize=None)
def repository_files() -> tuple[str, ...]:
    skip = {".git", "__pycache__", "outputs", "node_modules"}
    return tuple(str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.is_file() and not skip.intersection(p.relative_to(REPO).parts))


def missing_files(text: str) -> list[str]:
    """Files named in a Markdown text's code spans (a path, package-relative path or bare name) that
    no file of the repository is."""
    files = repository_files()
    names = {Path(f).name for f in files}
    found = []
    for name in re.findall(r"`([^`\s]+\.(?:py|sh|sbatch|yaml|md))`", text):
        if "<" in name or "*" in name:
            continue  # a pattern: tools/<name>.py, tests/test_kernels*.py
        if "/" not in name:
            ok = name in names
        else:
            ok = any(f == name or f.endswith("/" + name.lstrip("./")) for f in files)
        if not ok:
            found.append(name)
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_file_the_doc_names_exists(doc):
    assert missing_files(doc.read_text(encoding="utf-8")) == []


def test_a_renamed_file_and_a_link_to_a_missing_heading_are_found(tmp_path):
    text = ("`training/loop.py`, `loop.py`, `tools/<name>.py` and `training/no_such_file.py`, "
            "`no_such_script.sh`; [the guide](guide.md#no-such-heading), [README](README.md#set-up-two-commands)")
    assert missing_files(text) == ["training/no_such_file.py", "no_such_script.sh"]
    (tmp_path / "guide.md").write_text("# Guide\n\n## A heading\n")
    (tmp_path / "README.md").write_text((REPO / "README.md").read_text(encoding="utf-8"))
    (tmp_path / "doc.md").write_text(text)
    assert broken_links(tmp_path / "doc.md") == ["guide.md#no-such-heading: no such heading"]
