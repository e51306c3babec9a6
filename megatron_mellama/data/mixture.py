"""The training samples: one endless stream per domain, blended by weights that may change on resume.

megatron-core's blended dataset fixes the sample order from the run's length: every domain is
shuffled over as many epochs as the run needs, so a longer run (a larger --train-iters) reads other
samples from the first step on, and its blend cannot change mid-run without repeating or skipping
samples. Here the order is a function of the sample's position alone:

* A domain's stream is its train split as megatron-core's `GPTDataset` orders one epoch (the order
  Megatron-LM gives a run that reads less than one epoch of that domain), then, for epoch e >= 1,
  the same samples in a permutation seeded by (--seed, e). Sample k of a domain never depends on how
  many samples the run will draw. (Megatron-LM re-packs documents into other samples each epoch;
  here a later epoch re-orders the first epoch's samples.)
* The blend is megatron-core's greedy one (each next sample goes to the domain furthest below its
  weight), itself a stable prefix. A run's blend is a list of segments, JSON in the train state:
  from global sample `start` on, `weights` (per domain key, summing to 1), each domain continuing
  its stream at `offsets[key]`. A resume with other weights (annealing from 15:1:4 toward more
  general text, a domain added or dropped) starts a new segment at the checkpoint's consumed
  samples, where every domain continues from its own position: within a domain no sample is
  repeated or skipped.

So a run with one segment reads, within the first epoch of every domain, exactly the samples
Megatron-LM reads for the same data, split, seed and sequence length.

Host memory: the blend of the current segment is two arrays over its remaining samples, 10 bytes per
sample (315 MB for 31.5M samples, 129B tokens at 4096, measured); a later epoch of a domain holds one
permutation of its samples (8 bytes each) per data-loader process.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy
import torch

from ..config import Config
from .blend import domain_names
from .sample_set import dataset_sizes

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron.core's package import warns about optional kernels
    from megatron.core.datasets import helpers
    from megatron.core.datasets.utils import normalize


class DomainStream:
    """Sample k of one domain, for any k >= 0: epoch k // L of its L one-epoch samples."""

    def __init__(self, one_epoch, seed: int):
        self.one_epoch, self.seed = one_epoch, int(seed)
        self.epoch_length = len(one_epoch)
        if self.epoch_length <= 0:
            raise ValueError("a domain's train split holds no sample")
        self._permutation = (0, None)

    def position(self, k: int) -> int:
        """The index into the one-epoch dataset of stream sample `k`."""
        epoch, j = divmod(int(k), self.epoch_length)
        if epoch == 0:
            return j
        if self._permutation[0] != epoch:
            rng = numpy.random.Generator(numpy.random.PCG64([self.seed, epoch]))
            self._permutation = (epoch, rng.permutation(self.epoch_length))
        return int(self._permutation[1][j])

    def __getitem__(self, k: int) -> dict:
        return self.one_epoch[self.position(k)]


def blend_indices(weights: list, n: int) -> tuple:
    """megatron-core's greedy blend of `n` samples: (domain of each, its count within the domain)."""
    domain = numpy.zeros(n, dtype=numpy.int16)
    within = numpy.zeros(n, dtype=numpy.int64)
    if n and len(weights) == 1:
        within[:] = numpy.arange(n)
    elif n:
        helpers.build_blending_indices(domain, within, numpy.asarray(weights, dtype=numpy.float64),
                                       len(weights), n, False)
    return domain, within


def segment(start: int, weights: dict, offsets: dict) -> dict:
    """A blend segment; `weights` are normalised as megatron-core normalises a blend's."""
    keys = [k for k, w in weights.items() if w > 0]
    values = normalize([float(weights[k]) for k in keys])
    return dict(start=int(start), weights=dict(zip(keys, values)),
                offsets={k: int(v) for k, v in offsets.items()})


class TrainingSamples(torch.utils.data.Dataset):
    """Global sample i of the run -> a sample of one domain's stream, per the last blend segment.

    `streams` maps each domain key to its `DomainStream`; `names` each key to the domain's name (for
    logs); `segments` is the blend's history (the last one is read); `total` the run's samples.
    Positions before the last segment's start are history: a run only reads forward from its
    consumed samples. `blend`: the last segment's blend arrays, when already built."""

    def __init__(self, streams: dict, names: dict, segments: list, total: int, blend: Optional[tuple] = None):
        self.streams, self.names, self.segments, self.total = streams, names, list(segments), int(total)
        last = self.segments[-1]
        self.start, self.offsets = last["start"], last["offsets"]
        self.keys = list(last["weights"])
        self._domain, self._within = blend or blend_indices(list(last["weights"].values()),
                                                            max(self.total - self.start, 0))
        self._counted = (0, numpy.zeros(len(self.keys), dtype=numpy.int64))

    def __len__(self) -> int:
        return self.total

    def locate(self, i: int) -> tuple:
        """(domain key, sample of its stream) of global sample `i`."""
        j = int(i) - self.start
        if not 0 <= j < len(self._domain):
            raise IndexError(f"sample {i} is outside this blend segment [{self.start}, {self.total})")
        key = self.keys[self._domain[j]]
        return key, self.offsets.get(key, 0) + int(self._within[j])

    def __getitem__(self, i: int) -> dict:
        key, k = self.locate(i)
        return self.streams[key][k]

    def consumed_per_domain(self, position: int) -> dict:
        """Samples of each domain (key) read before global sample `position` (>= the segment's start)."""
        n = int(position) - self.start
        if not 0 <= n <= len(self._domain):
            raise ValueError(f"position {position} is outside this blend segment [{self.start}, {self.total}]")
        done, counts = self._counted
        if n < done:
            done, counts = 0, numpy.zeros(len(self.keys), dtype=numpy.int64)
        counts = counts + numpy.bincount(self._domain[done:n], minlength=len(self.keys))
        self._counted = (n, counts)
        consumed = dict(self.offsets)
        for key, count in zip(self.keys, counts.tolist()):
            consumed[key] = consumed.get(key, 0) + count
        return consumed

    def named(self, per_key: dict) -> dict:
        """Per-domain values keyed by domain name, domains no longer in the run included."""
        return {self.name_of(k): v for k, v in per_key.items()}

    def name_of(self, key: str) -> str:
        """A domain's name; for a domain this run no longer reads (a checkpoint's, dropped from
        --data-path), the name it would have beside this run's domains, never its full path."""
        if key in self.names:
            return self.names[key]
        return domain_names([*self.names, key])[-1]

    def state(self, position: int) -> dict:
        """What a checkpoint at `position` records: the segments and each domain's consumed samples."""
        return dict(segments=self.segments, consumed=self.consumed_per_domain(position))

    def continued(self, saved: Optional[dict], position: int) -> tuple:
        """This run's samples when resuming at `position` from a checkpoint whose data order is
        `saved` (its `state`); returns (TrainingSamples, lines saying what changed).

        The saved segments are kept. When this run's weights differ from the last saved ones, a new
        segment starts at `position` with every domain continuing from its saved count."""
        ours = self.segments[-1]["weights"]
        if not saved or not saved.get("segments"):
            # a checkpoint written before per-domain positions were recorded
            return self._with([dict(self.segments[-1], start=0)]), [
                "the checkpoint records no per-domain data positions: the blend is taken as unchanged"]
        segments = [dict(s, weights=self._rekey(s["weights"]), offsets=self._rekey(s["offsets"]))
                    for s in saved["segments"]]
        consumed = self._rekey(saved["consumed"])
        theirs = segments[-1]["weights"]
        if set(theirs) == set(ours) and all(abs(theirs[k] - ours[k]) <= 1e-12 for k in ours):
            return self._with(segments), []
        segments.append(segment(position, ours, consumed))
        name = self.name_of
        changes = [f"{name(k)} {theirs.get(k, 0.0):.4f} -> {ours.get(k, 0.0):.4f}"
                   for k in dict.fromkeys([*theirs, *ours]) if abs(theirs.get(k, 0.0) - ours.get(k, 0.0)) > 1e-12]
        where = ", ".join(f"{name(k)} at its sample {consumed.get(k, 0)}" for k in ours)
        return self._with(segments), [f"data blend changed at sample {position}: {'; '.join(changes)}; "
                                      f"each domain continues where it stopped ({where})"]

    def _with(self, segments: list) -> "TrainingSamples":
        # a resume with the blend it started with has the same last segment (keys in the same
        # order): its blend arrays are these, not a second build (about 1 s at 31M samples)
        mine, theirs = self.segments[-1], segments[-1]
        same = (mine["start"] == theirs["start"] and list(mine["weights"].items()) == list(theirs["weights"].items())
                and mine["offsets"] == theirs["offsets"])
        return TrainingSamples(self.streams, self.names, segments, self.total,
                               blend=(self._domain, self._within) if same else None)

    def _rekey(self, per_key: dict) -> dict:
        """Saved keys (absolute prefixes) onto this run's: the same path, or, for data moved
        elsewhere, the one key of the same file name that is not itself a saved key (the data checks
        compare the files' sizes and indexes)."""
        by_base = {}
        for key in self.streams:
            if key not in per_key:
                by_base.setdefault(os.path.basename(key), []).append(key)
        out = {}
        for key, value in per_key.items():
            if key not in self.streams and len(by_base.get(os.path.basename(key), ())) == 1:
                key = by_base[os.path.basename(key)][0]
            out[key] = value
        return out


class DomainTagged(torch.utils.data.Dataset):
    """`samples` with each sample's `domain`: the index of its domain in `samples.keys`, for the
    training loss per domain (`--log-loss-per-domain`, `training/domain_loss.py`)."""

    def __init__(self, samples: TrainingSamples):
        self.samples = samples
        self.index = {key: i for i, key in enumerate(samples.keys)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        key, k = self.samples.locate(i)
        return dict(self.samples.streams[key][k], domain=self.index[key])


def training_samples(cfg: Config, one_epochs: list, weights: dict, names: dict) -> Optional[TrainingSamples]:
    """A fresh run's training samples: one blend segment from sample 0, every domain at its start.
    `one_epochs`: each domain's one-epoch train split, in the order of `weights` (domain key ->
    weight); `names`: each key's domain name. None when there is no train split."""
    if one_epochs[0] is None:
        return None
    streams = {key: DomainStream(ds, cfg.train.seed) for key, ds in zip(weights, one_epochs)}
    return TrainingSamples(streams, names, [segment(0, weights, {k: 0 for k in weights})], dataset_sizes(cfg)[0])
