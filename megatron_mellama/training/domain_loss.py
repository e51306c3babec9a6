"""The training loss of each domain of the blend (`--log-loss-per-domain`), not only on validation:
continual pretraining wants to see the general domain forgotten as it happens.

The loader tags each sample with its domain's index (`data/mixture.py` `DomainTagged`); the model's
last stage appends each micro-batch's per-row summed token loss to `row_losses` (the fused loss
computes it beside the summed loss, without gradient). Per global batch the rows' losses and
trained tokens are added by domain on the device, with one one-hot product, and the step's sums join
the log window's only when the step was applied. Nothing is read by the host until the train log,
where one all-reduce over every rank sums the window (only the last pipeline stage's first
tensor-parallel rank contributes: the others hold no rows or copies of them; context-parallel ranks
each hold a part of every row, data-parallel ranks their own rows) and one read gives each domain's
token-mean loss over the window.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100


class DomainLosses:
    def __init__(self, modules: list, names: list[str], device: torch.device, contributes: bool = True):
        """`names`: the domains' names in the order of the loader's domain index; `contributes`:
        whether this rank's rows count (see the module doc)."""
        self.names, self.device, self.contributes = list(names), torch.device(device), contributes
        # the parts computing the loss (the last pipeline stage's): the others have no output layer
        self.loss_parts = [m for m in modules if getattr(m, "lm_head", None) is not None]
        # [summed token loss; trained tokens] x domain, fp64: a window of many steps stays exact
        self.window = torch.zeros(2, len(self.names), dtype=torch.float64, device=self.device)
        self._step = torch.zeros_like(self.window)

    @classmethod
    def for_run(cls, engine, samples, tp_rank: int) -> "DomainLosses":
        """The accumulator of `engine`'s steps over `samples` (`mixture.TrainingSamples`, whose `keys`
        order is the loader's domain index)."""
        return cls(engine.modules, [samples.name_of(key) for key in samples.keys], engine.device,
                   contributes=tp_rank == 0)

    def begin(self) -> None:
        """Before a computation of a global batch's gradients (a step computed twice counts once)."""
        self._step.zero_()
        for part in self.loss_parts:
            part.row_losses = []

    def add(self, labels: list[torch.Tensor], domains: list[torch.Tensor]) -> None:
        """After it: each micro-batch's `labels` (this rank's, as the model saw them) and its rows'
        domain indices."""
        # one call per micro-batch, the last ones: a pipeline schedule's first step calls the last
        # stage once more before them, to infer the shapes
        rows = [r for part in self.loss_parts for r in part.row_losses[len(part.row_losses) - len(labels):]]
        for part in self.loss_parts:
            part.row_losses = None
        if not rows or not self.contributes:
            return
        losses = torch.cat(rows).double()
        tokens = torch.cat([(lab != IGNORE_INDEX).sum(dim=-1) for lab in labels]).double()
        domain = torch.cat([d.to(self.device, non_blocking=True) for d in domains])
        self._step += torch.stack([losses, tokens]) @ F.one_hot(domain, len(self.names)).double()

    def end_step(self, applied: bool) -> None:
        if applied:
            self.window += self._step

    def reduce(self) -> dict[str, float]:
        """Each domain's token-mean training loss since the last call, the same on every rank (every
        rank calls it); domains without a trained token in the window are left out."""
        window = self.window.clone()
        self.window.zero_()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(window)
        losses, tokens = window.tolist()
        return {name: loss / count for name, loss, count in zip(self.names, losses, tokens) if count > 0}
