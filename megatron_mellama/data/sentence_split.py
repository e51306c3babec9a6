"""Sentence splitting for `--split-sentences`: nltk's Punkt, as Megatron-LM's preprocess_data.py uses it.

Punkt's parameters come from the installed `punkt_tab` data for the language when nltk finds it
(NLTK_DATA or nltk's search path). Without it (an offline cluster), Punkt is trained on a bounded
sample of the input itself: unsupervised, it learns abbreviations and sentence starters from the
corpus. nltk's old pickled `punkt` models are not loaded; nltk dropped them because unpickling runs
arbitrary code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

SAMPLE_CHARS = 4_000_000  # enough text for Punkt's statistics, seconds to train
MAX_CHUNK = 1_000_000  # Megatron splits texts in slices this long before Punkt


@dataclass
class SplitterSpec:
    """What workers need to rebuild the splitter; `params` is picklable PunktParameters."""

    params: object
    keep_newlines: bool
    description: str


def _custom_language_vars():
    from nltk.tokenize.punkt import PunktLanguageVars

    class CustomLanguageVars(PunktLanguageVars):
        # Megatron's variant for --keep-newlines: `\s*` after the sentence end instead of `\s+`
        # keeps the whitespace (newlines included) with the sentence rather than dropping it.
        _period_context_fmt = r"""
            \S*                          # some word material
            %(SentEndChars)s             # a potential sentence ending
            \s*                          # whitespace stays with the sentence
            (?=(?P<after_tok>
                %(NonWord)s              # either other punctuation
                |
                (?P<next_tok>\S+)        # or the next word
            ))"""

    return CustomLanguageVars()


def load_splitter_spec(lang: str, keep_newlines: bool, sample: Iterable[str]) -> SplitterSpec:
    """Punkt parameters from nltk's data for `lang`, else trained on `sample` (read only if needed)."""
    from nltk.tokenize.punkt import PunktTokenizer, PunktTrainer

    try:
        tokenizer = PunktTokenizer(lang)
        return SplitterSpec(tokenizer._params, keep_newlines, f"nltk punkt_tab data for {lang!r}")
    except (LookupError, ValueError, OSError):
        pass
    trainer = PunktTrainer()
    chars = docs = 0
    for text in sample:
        trainer.train(text, finalize=False)
        chars += len(text)
        docs += 1
        if chars >= SAMPLE_CHARS:
            break
    trainer.finalize_training()
    description = (f"Punkt trained on {docs} documents ({chars / 1e6:.1f}M characters) of the input "
                   f"(no nltk punkt_tab data for {lang!r} found)")
    return SplitterSpec(trainer.get_params(), keep_newlines, description)


class SentenceSplitter:
    def __init__(self, spec: SplitterSpec):
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        lang_vars = _custom_language_vars() if spec.keep_newlines else None
        self._punkt = PunktSentenceTokenizer(spec.params, lang_vars=lang_vars)

    def __call__(self, text: str) -> list[str]:
        return [s for i in range(0, len(text), MAX_CHUNK) for s in self._punkt.tokenize(text[i:i + MAX_CHUNK])]


def identity_split(text: str) -> list[str]:
    return [text]
