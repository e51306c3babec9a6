"""The `--data-path` blend as the pretraining and SFT pipelines read it: prefixes, weights, split, domain names.

Domain names (keys of `DataSets.valid_per_domain`, reported as `lm loss validation/<name>`): the last
component of the prefix without the `_text_document` / `_document` suffix that `preprocess_data.py`
appends (`data/pubmed_text_document` -> `pubmed`). Prefixes that would share a name take as many parent
directories as tell them apart, joined by `-` (`a/train_text_document`, `b/train_text_document` ->
`a-train`, `b-train`). A prefix listed twice, under any spelling (`data/x`, `./data/x`), is one domain.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from ..config import Config, parse_data_path, parse_split

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron.core's package import warns about optional kernels
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                        parse_and_normalize_split)


def domain_names(prefixes: list) -> list:
    """A distinct, readable name per (distinct) prefix; see the module docstring for the rule."""
    def parts(prefix):
        comps = [c for c in os.path.normpath(prefix).split(os.sep) if c not in ("", ".")]
        last = comps[-1]
        for suffix in ("_text_document", "_document"):
            if last.endswith(suffix) and len(last) > len(suffix):
                last = last[: -len(suffix)]
                break
        return comps[:-1] + [last]

    comps = [parts(p) for p in prefixes]
    depth = [1] * len(prefixes)
    while True:
        names = ["-".join(c[-d:]) for c, d in zip(comps, depth)]
        clashes = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(comps[i])]
        if not clashes:
            break
        for i in clashes:
            depth[i] += 1
    seen = {}
    for i, n in enumerate(names):  # only paths that differ in ways normpath hides (e.g. a/b vs a//b/)
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            names[i] = f"{n}-{seen[n]}"
    return names


def same_prefix_once(pairs: list) -> tuple:
    """`--data-path` pairs with every spelling of one prefix (`data/x`, `./data/x`, `/abs/data/x`,
    a symlink to it) written as its first spelling, and a line per prefix spelt more than one way.

    The datasets, their weights, domain names and checkpoint keys all follow from the prefix, so two
    spellings of one prefix must be one domain with the sum of their weights (the blend the user
    listed), as a prefix listed twice verbatim is; anything else pairs one domain's weight with
    another's data. Merged rather than refused: Megatron-LM itself blends repeated prefixes."""
    first, spellings = {}, {}
    for _, prefix in pairs:
        identity = os.path.realpath(prefix)
        first.setdefault(identity, prefix)
        names = spellings.setdefault(identity, [])
        if prefix not in names:
            names.append(prefix)
    notes = [f"--data-path: {' and '.join(repr(s) for s in names)} are one prefix: one domain "
             f"'{names[0]}' with the sum of their weights"
             for names in spellings.values() if len(names) > 1]
    return [(w, first[os.path.realpath(p)]) for w, p in pairs], notes


@dataclass(frozen=True)
class Blend:
    """`--data-path` and `--split` read once. `prefixes`: every distinct prefix in `--data-path`
    order, those of weight 0 included; `weight_of`: the summed weight of each prefix in the blend;
    `split_matrix`: megatron-core's [begin, end) fraction of the documents (or None) per split;
    `notes`: lines for the run to print."""

    prefixes: list
    weight_of: dict
    split_matrix: list
    notes: list

    @classmethod
    def from_config(cls, cfg: Config) -> "Blend":
        d = cfg.data
        pairs, notes = same_prefix_once(parse_data_path(d.data_path))
        prefixes = list(dict.fromkeys(p for _, p in pairs))
        parse_split(d.split)
        split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(d.split))
        # A weight of 0 keeps a prefix out of the blend; it is still validated on as its own domain. A
        # prefix listed twice is one domain with the sum of its weights (not two copies of one order).
        weight_of = {}
        for w, p in pairs:
            if w > 0:
                weight_of[p] = weight_of.get(p, 0.0) + w
        return cls(prefixes, weight_of, split_matrix, notes)

    @property
    def blended(self) -> list:
        """(weight, prefix) of each prefix in the blend."""
        return [(w, p) for p, w in self.weight_of.items()]

    def names_by_key(self) -> dict:
        """Each prefix's domain name, keyed by its absolute path (the key of its training stream)."""
        return dict(zip(map(os.path.abspath, self.prefixes), domain_names(self.prefixes)))

    def keyed_weights(self) -> dict:
        """The blend's weights keyed by absolute path."""
        return {os.path.abspath(p): w for p, w in self.weight_of.items()}
