"""One optimizer step over one global batch, for any TP x PP x DP x CP layout.

The model is built on the meta device and `parallel.parallelize` cuts it into pipeline stages,
tensor-parallelises, checkpoints and compiles them, materialises and initialises them (every
parameter from its name, so all layouts start equal) and wraps them for data parallelism. `step()`
runs the micro-batches through the pipeline schedule (or a plain accumulation loop when PP = 1),
reduces gradients, clips and steps AdamW.

The loss is the token mean over the whole global batch: every micro-batch contributes its summed
token loss divided by the token count of the global batch (all DP ranks together). Data-parallel
reduction averages gradients, so the backward loss is multiplied by the DP size to make it a sum.
With context parallelism (`parallel/context.py`) each rank computes the loss of its part of every
sequence: DP x CP ranks split the batch, count its tokens and average gradients.
The model's last stage computes the summed token loss itself (`model(tokens, labels)`: the fused,
chunked, vocabulary-parallel output layer and cross-entropy), so the logits never exist.

Precision (`--bf16`, `--fp16`): whenever there is a process group (the engine is given meshes),
every part is wrapped by `apply_data_parallel` with `param_dtype` bf16/fp16 and `reduce_dtype`
fp32, in every data-parallel mode and also at a data-parallel size of 1 (`replicate` over the
1-rank dp mesh): the weights a layer computes with are FSDP2's gathered bf16 copies, gradients are
computed in bf16, reduced in fp32 onto the fp32 sharded gradients, and AdamW updates fp32 master
weights. The residual stream and the tensors pipeline stages exchange are bf16. `torch.autocast`
still wraps the forward: with bf16 weights it changes little (the rotary tables, fp32 buffers, are
cast to the activations' dtype by the kernels themselves), but it makes the compute dtype explicit
for the ops that ask for it (the norm's output, the fused loss's matmuls) and catches any fp32
operand of a matmul.

A single-process run (world size 1: no meshes, no process group) cannot use FSDP2, so it keeps
the fp32 parameters and runs the forward under `torch.autocast`: each matmul casts its weight to
bf16 (a bf16 copy of every weight per micro-batch), the residual stream stays fp32, and the norms
return bf16.
"""

from __future__ import annotations

import contextlib
import functools
import math
import socket
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .. import kernels
from ..config import Config, ConfigError
from ..models import model_spec
from ..parallel.context import split_micro_batch
from ..parallel.data import set_gradient_sync
from ..parallel.mesh import Meshes, ParallelDims
from ..parallel.pipeline import build_schedule, run_pipeline_step
from .grad_clip import count_zero_grads, get_params_norm
from .optim import LossScaler, build_lr_scheduler, build_optimizer, clip_grad_norm_
from .timers import Timers

IGNORE_INDEX = kernels.IGNORE_INDEX
# micro-batch keys of packed documents (--reset-position-ids, --reset-attention-mask), handed to
# every model part (every pipeline stage) as keyword arguments when the batch has them
DOCUMENT_KEYS = ("position_ids", "document_ids")


NONFINITE = "inf/NaN loss or gradients"


@dataclass
class StepResult:
    loss: float  # token mean over the global batch
    grad_norm: float  # before clipping, over every shard of every stage
    skipped: bool  # no update was applied (`why`)
    lr: float
    why: str = ""  # why it was skipped: NONFINITE, the step's judge's reason, or the loop's
    # the first computation was not finite and the step was computed again (`Engine.step`): the
    # ranks whose own loss was not finite, with their hosts ("" where every rank's was finite)
    recomputed: Optional[str] = None
    # with --log-num-zeros-in-grad: gradient elements equal to zero after clipping, over all ranks
    num_zeros: Optional[float] = None


def _require_trained_tokens(tokens: float, what: str) -> None:
    """A batch whose every label is masked out of the loss would report loss 0 (and a zero gradient
    norm, a validation perplexity of 1): an error, the same on every rank (the count is global)."""
    if tokens == 0:
        raise ConfigError(f"{what} holds no trained token (every loss-mask entry is 0): with --sft, "
                          "conversations cut to --seq-length lost their answers (see the 'cut to --seq-length' "
                          "line of the data); raise --seq-length or preprocess with --overlong drop")


def _local_value(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _rows_as_they_are(summed_rows, labels):
    """Scoring's loss function in the pipeline schedule: each row's own summed loss, no weight, no
    loss scale."""
    return summed_rows


class Engine:
    def __init__(self, cfg: Config, meshes: Meshes | None = None, device: str | torch.device = "cpu",
                 initialise: bool = True):
        """`initialise=False` leaves the parameters unset (memory allocated, values undefined): for a
        run that loads every weight from a checkpoint next, or a dry run under fake tensors."""
        self.cfg, self.meshes, self.device = cfg, meshes, torch.device(device)
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.dims = ParallelDims.from_config(cfg, world)
        if self.dims.world_size > 1 and meshes is None:
            raise ValueError("a multi-process layout needs the meshes (ParallelDims.build_mesh)")
        self.pp_rank = meshes.pp.get_local_rank() if meshes else 0

        # the compute dtype: bf16/fp16 weights from FSDP2 when there are meshes, autocast without
        self.autocast_dtype = torch.bfloat16 if cfg.train.bf16 else torch.float16 if cfg.train.fp16 else None
        param_dtype = self.autocast_dtype if meshes is not None else None
        # `auto` times the backends on this rank's own shapes and dtypes (bf16 parameters and
        # residual stream when FSDP2 casts them)
        kernels.configure(cfg.train.kernel_backend, self.device,
                          timing_shapes=kernels.run_shapes(cfg, self.dims.tp, param_dtype=param_dtype),
                          compiled=cfg.train.compile)
        spec = model_spec()
        self.parts = spec.parallelize(spec.meta_model(cfg.model), cfg, self.dims, meshes, param_dtype=param_dtype,
                                      materialise=functools.partial(spec.materialise, cfg=cfg.model,
                                                                    device=self.device, seed=cfg.train.seed,
                                                                    initialise=initialise))
        self.modules = [part for _, part in self.parts]

        self.optimizer = build_optimizer(self.modules, cfg)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg)
        self.scaler = LossScaler.from_config(cfg)
        self.schedule = None
        if self.dims.pp > 1:
            self.schedule = build_schedule(self.parts, meshes.pp, self.device, cfg.num_microbatches,
                                           cfg.parallel.pipeline_schedule)
        # the last global batch's trained tokens (all DP ranks), on the device: the host reads it
        # with the loss, not on its own
        self._batch_tokens = None
        self._local_loss = None  # this rank's share of the last loss, before the sum over DP x CP
        # testing only (`fault_injection.py`): what each computation of the next step multiplies
        # this rank's micro-batch losses by, and so their gradients; None (no cost) otherwise
        self.injected_loss_factors: Optional[tuple] = None
        self._loss_factor = None
        self._num_zeros = self._read_zeros = None  # --log-num-zeros-in-grad: on the device, then read
        # --log-loss-per-domain: a `domain_loss.DomainLosses` the loop sets (it knows the domains);
        # the micro-batches then carry each row's `domain`
        self.domain_losses = None
        self.timers = Timers.from_config(cfg, self.device)  # --timing-log-level: nothing at 0

    # -- loss ---------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _loss_weight(self, global_tokens: torch.Tensor) -> torch.Tensor:
        """What a micro-batch's summed token loss is multiplied by: DP x CP over the global token
        count (see module doc), a device scalar."""
        # float64 keeps counts beyond 2^24 exact; a batch without targets weighs its zero loss by 1
        return (self._grad_ranks / global_tokens.clamp(min=1).double()).float()

    # -- one step -----------------------------------------------------------------------------
    # Host synchronisation: the step keeps every scalar (token count, loss, gradient norm) on the
    # run's device and reads them once, together, at its end. Nothing is read per micro-batch.
    def _model_inputs(self, micro_batches: list[dict]) -> tuple[list, list, list]:
        """(tokens, labels with -100 where the loss mask is 0, document keys) of each micro-batch, on
        the device and, under context parallelism, this rank's part of each sequence."""
        # the batch moves to the device first (from pinned memory, without waiting), so that
        # everything computed from it stays there
        on_device = [{k: mb[k].to(self.device, non_blocking=True) for k in ("tokens", "labels", "loss_mask")}
                     for mb in micro_batches]
        labels = [mb["labels"].masked_fill(mb["loss_mask"] == 0, IGNORE_INDEX) for mb in on_device]
        tokens = [mb["tokens"] for mb in on_device]
        documents = [{k: mb[k].to(self.device, non_blocking=True) for k in DOCUMENT_KEYS if k in mb}
                     for mb in micro_batches]
        if self.dims.cp > 1:
            cp_rank = self.meshes.cp.get_local_rank()
            tokens, labels, documents = map(list, zip(*(split_micro_batch(t, lab, docs, self.dims.cp, cp_rank)
                                                         for t, lab, docs in zip(tokens, labels, documents))))
        return tokens, labels, documents

    def _global_batch_loss(self, micro_batches: list[dict], train: bool) -> torch.Tensor:
        """Forward (and backward when training) over one global batch; its token-mean loss as a
        0-dim fp32 tensor on the run's device, the same on every rank."""
        tokens, labels, documents = self._model_inputs(micro_batches)
        global_tokens = self._dp_sum(torch.stack([(lab != IGNORE_INDEX).sum() for lab in labels]).sum())
        weight = self._loss_weight(global_tokens)
        self._batch_tokens = global_tokens
        by_domain = self.domain_losses if train else None
        if by_domain is not None:
            by_domain.begin()
        if self.schedule is None:
            loss = self._accumulate(tokens, labels, documents, weight, train)
        else:
            loss = self._pipeline(tokens, labels, documents, weight, train)
        if by_domain is not None:
            by_domain.add(labels, [mb["domain"] for mb in micro_batches])
        self._local_loss = loss
        return self._dp_sum(loss)

    def evaluate(self, micro_batches: list[dict]) -> float:
        """The token-mean loss of one global batch, without gradients or an update."""
        for m in self.modules:
            m.eval()
        try:
            loss = self._global_batch_loss(micro_batches, train=False)
            loss, tokens = torch.stack([loss, self._batch_tokens.to(loss.dtype)]).tolist()
            _require_trained_tokens(tokens, "a validation batch")
            return loss
        finally:
            for m in self.modules:
                m.train()

    @torch.no_grad()
    def sequence_loglikelihoods(self, micro_batches: list[dict]) -> torch.Tensor:
        """The summed log-probability of the masked labels of every row of one global batch (this DP
        rank's micro-batches in, every rank's rows out): fp32 [global batch rows] on the run's device,
        in global row order, the same on every rank. No gradients, no update, nothing read by the host.

        The model's last stage sums its fused loss per row (`per_row=True`), unweighted; the
        rows then come together: from the last pipeline stage to every stage, summed over the context
        parallel ranks (each holds part of every row), gathered over data parallel ranks (each holds a
        contiguous slice of the global batch)."""
        tokens, labels, documents = self._model_inputs(micro_batches)
        for m in self.modules:
            m.eval()
        try:
            rows = self._per_row_losses(tokens, labels, documents)
        finally:
            for m in self.modules:
                m.train()
        if self.dims.cp > 1:
            dist.all_reduce(rows, group=self.meshes.cp.get_group())
        if self.dims.dp > 1:
            gathered = [torch.empty_like(rows) for _ in range(self.dims.dp)]
            dist.all_gather(gathered, rows, group=self.meshes.dp.get_group())
            rows = torch.cat(gathered)
        return -rows

    def _per_row_losses(self, tokens, labels, documents) -> torch.Tensor:
        """Each of this rank's rows' summed token loss (its part of the sequence under CP), fp32 [rows]."""
        if self.schedule is None:
            with self._autocast():
                return torch.cat([_local_value(self.modules[0](t, lab, per_row=True, **docs)).float()
                                  for t, lab, docs in zip(tokens, labels, documents)])
        per_token = {k: torch.cat([d[k] for d in documents]) for k in documents[0]}
        with self._autocast():
            losses = run_pipeline_step(self.schedule, self.parts, torch.cat(tokens), torch.cat(labels),
                                       _rows_as_they_are, train=False, per_row=True, **per_token)
        rows = torch.zeros(sum(t.shape[0] for t in tokens), device=self.device)
        if losses is not None:
            rows = torch.cat([_local_value(x).float() for x in losses])
        # the rows live on the last stage; every rank returns them
        dist.all_reduce(rows, group=self.meshes.pp.get_group())
        return rows

    def compute_gradients(self, micro_batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over one global batch, gradients unscaled and clipped; the loss and
        the gradient norm before clipping, as device tensors (nothing read by the host)."""
        with self.timers("forward-backward"):
            loss = self._global_batch_loss(micro_batches, train=True)
        params = [q for m in self.modules for q in m.parameters()]
        with self.timers("grads-clip"):
            # overflow shows in the gradient norm read below: no flag of its own to read
            self.scaler.unscale_(params, find_inf=False)
            grad_norm = clip_grad_norm_(params, self.cfg.optim.clip_grad, pp_group=self._pp_group,
                                        device=self.device)
            if self.cfg.logging.log_num_zeros_in_grad:
                self._num_zeros = count_zero_grads(params, self._pp_group, self.device)
        return loss, grad_norm

    @property
    def _pp_group(self):
        return self.meshes.pp.get_group() if self.dims.pp > 1 else None

    def params_norm(self) -> torch.Tensor:
        """The L2 norm of every parameter of the model (all shards, all stages), a device scalar;
        every rank calls it."""
        return get_params_norm([q for m in self.modules for q in m.parameters()], self._pp_group, self.device)

    def step(self, micro_batches: list[dict], judge: Optional[Callable[[float, float], Optional[str]]] = None
             ) -> StepResult:
        """One optimizer step over this DP rank's micro-batches of one global batch.

        A non-finite loss or gradient norm is computed once more from the same micro-batches and
        weights (nothing was applied) before the step counts as skipped: a finite rerun was a
        transient fault, and its result is applied. An fp16 overflow the dynamic loss scaler answers
        by lowering the scale is not recomputed (the same scale would overflow again).

        `judge(loss, grad_norm)`, asked about a finite step after the host read and before the
        update: None applies it, a reason skips it as a non-finite step is skipped (no optimizer or
        scheduler step). Its inputs are global, so every rank decides alike without a collective."""
        loss, grad_norm = self._computed(micro_batches, 0)
        recomputed = None
        if not (math.isfinite(loss) and math.isfinite(grad_norm)) and not self._scaler_answers(loss):
            recomputed = self._nonfinite_ranks()
            self.optimizer.zero_grad(set_to_none=True)
            loss, grad_norm = self._computed(micro_batches, 1)
        self.injected_loss_factors = None
        finite = math.isfinite(grad_norm) and math.isfinite(loss)
        why = "" if finite else NONFINITE
        if finite and judge is not None:
            why = judge(loss, grad_norm) or ""
        self.scaler.update(found_inf=not finite)
        if self.domain_losses is not None:
            self.domain_losses.end_step(applied=not why)
        lr = self.optimizer.param_groups[0]["lr"]
        with self.timers("optimizer"):
            if not why:
                self.optimizer.step()
                self.scheduler.step(self.cfg.train.global_batch_size)
            self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss, grad_norm=grad_norm, skipped=bool(why), lr=lr, why=why, recomputed=recomputed,
                          num_zeros=self._read_zeros)

    def _computed(self, micro_batches: list[dict], attempt: int) -> tuple[float, float]:
        """Gradients of one global batch; its loss and gradient norm, read by the host together
        (the step's one host synchronisation; a second only when the first was not finite)."""
        factors = self.injected_loss_factors
        self._loss_factor = factors[min(attempt, len(factors) - 1)] if factors else None
        loss, grad_norm = self.compute_gradients(micro_batches)
        read = [loss, grad_norm, self._batch_tokens] + ([self._num_zeros] if self._num_zeros is not None else [])
        # fp64: a zero count beyond 2^24 stays exact; the fp32 loss and norm convert exactly
        loss, grad_norm, tokens, *zeros = torch.stack([t.to(loss.device, torch.float64) for t in read]).tolist()
        self._read_zeros = zeros[0] if zeros else None
        _require_trained_tokens(tokens, "a training step's global batch")
        return loss, grad_norm

    def _scaler_answers(self, loss: float) -> bool:
        """An fp16 overflow of the gradients (the loss finite) that the dynamic scaler answers by
        lowering its scale: its normal work, not a fault."""
        return math.isfinite(loss) and self.scaler.dynamic and self.scaler.loss_scale > self.scaler.min_scale

    def _nonfinite_ranks(self) -> str:
        """The ranks whose own share of the loss was not finite, with their hosts ("" when none): one
        small gather over every rank, on this path only."""
        own = (math.isfinite(self._local_loss.item()), socket.gethostname())
        flags = [own]
        if dist.is_initialized() and dist.get_world_size() > 1:
            flags = [None] * dist.get_world_size()
            dist.all_gather_object(flags, own)
        return ", ".join(f"rank {r} ({host})" for r, (ok, host) in enumerate(flags) if not ok)

    def _accumulate(self, tokens, labels, documents, weight: torch.Tensor, train: bool) -> torch.Tensor:
        model = self.modules[0]
        total = torch.zeros((), device=self.device)
        for i, (t, lab, docs) in enumerate(zip(tokens, labels, documents)):
            if train:
                # a part without data parallelism ignores this
                set_gradient_sync(model, i == len(tokens) - 1)
            with torch.set_grad_enabled(train):
                with self._autocast():
                    loss = model(t, lab, **docs) * weight
                    if self._loss_factor is not None and train:
                        loss = loss * self._loss_factor
                if train:
                    self.scaler.scale(loss).backward()
            total += _local_value(loss.detach()).float()
        return total / self._grad_ranks  # back from the DP-scaled backward loss to this rank's share

    def _pipeline(self, tokens, labels, documents, weight: torch.Tensor, train: bool) -> torch.Tensor:
        factor = self._loss_factor if train else None

        def loss_fn(summed_loss, labels):
            if factor is not None:
                summed_loss = summed_loss * factor
            return self.scaler.scale(summed_loss * weight)

        per_token = {k: torch.cat([d[k] for d in documents]) for k in documents[0]}
        with self._autocast():
            losses = run_pipeline_step(self.schedule, self.parts, torch.cat(tokens), torch.cat(labels), loss_fn,
                                       train=train, **per_token)
        total = torch.zeros((), device=self.device)
        if losses is not None:
            summed = torch.stack([_local_value(x.detach()).float() for x in losses]).sum()
            total = summed / (self.scaler.loss_scale * self._grad_ranks)
        # the loss lives on the last stage; every rank reports it
        dist.all_reduce(total, group=self.meshes.pp.get_group())
        return total

    @property
    def _grad_ranks(self) -> int:
        """The ranks whose gradients are averaged: data x context parallel, which split the batch."""
        return self.dims.dp * self.dims.cp

    def _dp_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Summed over the ranks that split the global batch (data x context parallel)."""
        if self._grad_ranks > 1:
            value = value.clone()
            dist.all_reduce(value, group=self.meshes.dp_cp.get_group())
        return value

    # -- inspection -----------------------------------------------------------------------------
    def full_state(self) -> dict[str, torch.Tensor]:
        """Every parameter of this rank's parts as full (unsharded) CPU tensors, by full-model name."""
        out = {}
        for m in self.modules:
            for name, param in m.named_parameters():
                out[name] = _local_value(param.detach()).cpu().clone()
        return out
