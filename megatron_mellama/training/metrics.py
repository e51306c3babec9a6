"""Training metrics: a Megatron-style console line, TensorBoard scalars (W&B's too with
--wandb-project, `wandb_writer.py`) and a JSONL file.

Only global rank 0 writes anything. TensorBoard tags are Megatron-LM's (`lm loss`, `learning-rate`,
`grad-norm`, `throughput`, `lm loss validation`, ... and their `... vs samples` twins stepped by
consumed samples), so existing dashboards and comparison scripts keep working.

Throughput follows Megatron, logged with --log-throughput (tokens/s always): `throughput` is model
TFLOP/s per device (FLOPs from the shape, see `model/flops.py`), MFU divides it by the device's
dense bf16 peak. MFU is logged in percent.
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch

from ..models import model_spec
from .wandb_writer import WandbWriter

GIB = 2 ** 30
# the train log's optional metrics (--log-throughput, --log-params-norm, --log-num-zeros-in-grad):
# JSON key -> Megatron-LM's TensorBoard tag
HEALTH_TAGS = {"tflops_per_device": "throughput", "mfu": "mfu", "params_norm": "params-norm",
               "num_zeros": "num-zeros"}

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, matched as substrings of the CUDA device
# name in this order, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None where it is unknown (CPU, unlisted GPUs)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def memory_gib(device: torch.device) -> dict[str, float]:
    """Peak memory so far: CUDA max allocated/reserved, or the process's peak RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"max_allocated": torch.cuda.max_memory_allocated(device) / GIB,
                "max_reserved": torch.cuda.max_memory_reserved(device) / GIB}
    try:
        import resource
    except ImportError:  # not on POSIX
        return {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux but in bytes on macOS
    return {"max_rss": peak / GIB if sys.platform == "darwin" else peak / 2 ** 20}


def perplexity(loss: float) -> float:
    # capped so an early or diverged loss does not overflow to inf
    return math.exp(min(loss, 20.0))


def _finite_or_none(value):
    # strict JSON has no NaN/Infinity; a skipped step's loss is recorded as null
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    def __init__(self, cfg, rank: int, world_size: int, device, wandb_run_id: str | None = None):
        """`wandb_run_id`: the W&B run a resumed run continues (its checkpoint's)."""
        self.cfg, self.rank, self.world_size = cfg, rank, max(world_size, 1)
        self.device = torch.device(device)
        self.flops_per_token = model_spec().training_flops_per_token(cfg.model, cfg.seq_length)
        self.peak = peak_tflops(self.device)
        t = cfg.train
        self.total_iters = t.train_iters if t.train_iters is not None else t.train_samples // t.global_batch_size
        self._writer = None
        self._log_file = None
        self.wandb = WandbWriter(cfg, wandb_run_id) if self.is_writer and cfg.logging.wandb_project else None

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    # -- sinks ----------------------------------------------------------------------------------
    def _tensorboard(self):
        if self._writer is None and self.cfg.logging.tensorboard_dir:
            # imported lazily: tensorboard is slow to import and only rank 0 needs it
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.cfg.logging.tensorboard_dir)
        return self._writer

    def _scalars(self, values: dict[str, float], iteration: int, consumed_samples: int,
                 vs_samples: tuple[str, ...] = ()) -> None:
        if self.wandb is not None:
            self.wandb.log(values, iteration, consumed_samples, vs_samples)
        writer = self._tensorboard()
        if writer is None:
            return
        for tag, value in values.items():
            writer.add_scalar(tag, value, iteration)
            if tag in vs_samples:
                writer.add_scalar(f"{tag} vs samples", value, consumed_samples)
        # flushed at every log so a preempted run keeps its curves up to the last log
        writer.flush()

    def _json(self, record: dict) -> None:
        path = self.cfg.logging.log_file
        if not path:
            return
        if self._log_file is None:
            self._log_file = open(path, "a", encoding="utf-8")
        # one level down too: the training loss per domain is a dict
        record = {k: {n: _finite_or_none(x) for n, x in v.items()} if isinstance(v, dict) else _finite_or_none(v)
                  for k, v in record.items()}
        self._log_file.write(json.dumps(record, allow_nan=False) + "\n")
        self._log_file.flush()

    # -- training -------------------------------------------------------------------------------
    def log_train(self, iteration: int, consumed_samples: int, result, elapsed_seconds_since_last_log: float,
                  steps_since_last_log: int, skipped_total: int, loss_scale: float | None = None,
                  per_domain: dict | None = None, params_norm: float | None = None,
                  loss_per_domain: dict | None = None) -> dict:
        """Log one training iteration; returns the computed metrics (on every rank). `per_domain`:
        consumed samples of each domain (shown when the run blends more than one). TFLOP/s and MFU
        only with --log-throughput (as Megatron-LM); tokens/s always. `loss_per_domain`: each
        domain's training loss over the log window (--log-loss-per-domain)."""
        steps = max(steps_since_last_log, 1)
        elapsed = max(elapsed_seconds_since_last_log, 1e-9)
        batch = self.cfg.train.global_batch_size
        tokens_per_sec = batch * self.cfg.seq_length * steps / elapsed
        tflops = tokens_per_sec * self.flops_per_token / self.world_size / 1e12
        mfu = 100.0 * tflops / self.peak if self.peak else None
        memory = memory_gib(self.device)
        metrics = dict(iteration=iteration, consumed_samples=consumed_samples, lm_loss=float(result.loss),
                       lr=float(result.lr), grad_norm=float(result.grad_norm), skipped=bool(result.skipped),
                       skipped_total=skipped_total, tokens_per_sec=tokens_per_sec,
                       memory_gib=next(iter(memory.values()), None), iteration_time_s=elapsed / steps,
                       time=time.time())
        if self.cfg.logging.log_throughput:
            metrics.update(tflops_per_device=tflops, mfu=mfu)
        if params_norm is not None:
            metrics["params_norm"] = params_norm
        if getattr(result, "num_zeros", None) is not None:
            metrics["num_zeros"] = result.num_zeros
        if per_domain and len(per_domain) > 1:
            metrics["consumed_samples_per_domain"] = dict(per_domain)
        if loss_per_domain is not None:
            metrics["loss_per_domain"] = dict(loss_per_domain)
        if not self.is_writer:
            return metrics

        print(self._train_line(metrics, batch, memory, loss_scale), flush=True)
        scalars = {"lm loss": metrics["lm_loss"], "learning-rate": metrics["lr"],
                   "grad-norm": metrics["grad_norm"], "batch-size": batch,
                   "iteration-time": metrics["iteration_time_s"], "tokens-per-sec": tokens_per_sec}
        if loss_scale is not None:
            scalars["loss-scale"] = loss_scale
        for key, tag in HEALTH_TAGS.items():
            if metrics.get(key) is not None:
                scalars[tag] = metrics[key]
        if metrics["memory_gib"] is not None:
            scalars["memory"] = metrics["memory_gib"]
        for name, count in metrics.get("consumed_samples_per_domain", {}).items():
            scalars[f"consumed samples/{name}"] = count
        for name, loss in metrics.get("loss_per_domain", {}).items():
            scalars[f"lm loss/{name}"] = loss
        self._scalars(scalars, iteration, consumed_samples, vs_samples=("lm loss", "learning-rate"))
        self._json(metrics)
        return metrics

    def _train_line(self, m: dict, batch: int, memory: dict, loss_scale) -> str:
        width = len(str(self.total_iters))
        per_domain = m.get("consumed_samples_per_domain")
        parts = [f" iteration {m['iteration']:>{max(width, 8)}}/{self.total_iters:>{max(width, 8)}}",
                 f"consumed samples: {m['consumed_samples']:>12}"
                 + (" (" + ", ".join(f"{k} {v}" for k, v in per_domain.items()) + ")" if per_domain else ""),
                 f"elapsed time per iteration (ms): {m['iteration_time_s'] * 1000:.1f}",
                 f"learning rate: {m['lr']:.6E}",
                 f"global batch size: {batch:>5}",
                 f"lm loss: {m['lm_loss']:.6E}"]
        # the TensorBoard tags' names, as the validation line's
        parts += [f"lm loss/{name}: {loss:.6E}" for name, loss in m.get("loss_per_domain", {}).items()]
        if loss_scale is not None:
            parts.append(f"loss scale: {loss_scale:.1f}")
        parts += [f"grad norm: {m['grad_norm']:.3f}",
                  f"number of skipped iterations: {m['skipped_total']:>3}",
                  f"tokens/s: {m['tokens_per_sec']:,.0f}"]
        if "tflops_per_device" in m:
            parts += [f"TFLOP/s per device: {m['tflops_per_device']:.2f}",
                      "MFU: n/a" if m["mfu"] is None else f"MFU: {m['mfu']:.1f}%"]
        if "params_norm" in m:
            parts.append(f"params norm: {m['params_norm']:.3f}")
        if "num_zeros" in m:
            parts.append(f"num zeros: {m['num_zeros']:.0f}")
        parts.append("memory (GiB): " + (", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in memory.items())
                                         or "n/a"))
        return " | ".join(parts) + " |"

    # -- evaluation -----------------------------------------------------------------------------
    def log_eval(self, iteration: int, consumed_samples: int, losses: dict[str, float]) -> None:
        """Log validation losses: "all" is the blended set, other keys are domain names."""
        if not self.is_writer:
            return
        evals = {name: {"lm_loss": float(loss), "ppl": perplexity(loss)} for name, loss in losses.items()}
        parts = []
        for name, e in evals.items():
            # the TensorBoard tag's name, so the console and the dashboards read alike
            prefix = "lm loss validation" if name == "all" else f"lm loss validation/{name}"
            parts.append(f"{prefix}: {e['lm_loss']:.6E} | ppl: {e['ppl']:.6E}")
        line = f" validation loss at iteration {iteration} | " + " | ".join(parts) + " |"
        rule = "-" * len(line)
        print(f"{rule}\n{line}\n{rule}", flush=True)

        scalars = {}
        for name, e in evals.items():
            suffix = "" if name == "all" else f"/{name}"
            scalars[f"lm loss validation{suffix}"] = e["lm_loss"]
            scalars[f"lm loss validation ppl{suffix}"] = e["ppl"]
        self._scalars(scalars, iteration, consumed_samples, vs_samples=tuple(scalars))
        self._json({"iteration": iteration, "consumed_samples": consumed_samples,
                    "eval": {name: {k: _finite_or_none(v) for k, v in e.items()} for name, e in evals.items()},
                    "time": time.time()})

    def log_downstream(self, iteration: int, consumed_samples: int, scores: dict[str, dict]) -> None:
        """Log multiple-choice task scores: {task: {"acc", "acc_norm", "items", "seconds"}}."""
        if not self.is_writer:
            return
        for name, r in scores.items():
            print(f"downstream {name} acc {r['acc']:.3f} acc_norm {r['acc_norm']:.3f} "
                  f"({r['items']} items, {r['seconds']:.1f} s)", flush=True)
        scalars = {f"downstream/{name}/{k}": r[k] for name, r in scores.items() for k in ("acc", "acc_norm")}
        self._scalars(scalars, iteration, consumed_samples, vs_samples=tuple(scalars))
        self._json({"iteration": iteration, "consumed_samples": consumed_samples, "downstream": scores,
                    "time": time.time()})

    def log_event(self, record: dict) -> None:
        """Something that happened to the run (a rollback), as one record of the JSON log."""
        if self.is_writer:
            self._json(dict(record, time=time.time()))

    def log_report(self, iteration: int, consumed_samples: int, name: str, record: dict, line: str,
                   scalars: dict[str, float]) -> None:
        """A periodic job's report (e.g. the straggler report): its console line, its TensorBoard
        scalars, and `record` under `name` in the JSON log (finite numbers only)."""
        if not self.is_writer:
            return
        print(line, flush=True)
        self._scalars(scalars, iteration, consumed_samples)
        self._json({"iteration": iteration, "consumed_samples": consumed_samples, name: record, "time": time.time()})

    def checkpoint_extra(self) -> dict:
        """What a checkpoint keeps for the writers: the W&B run id (rank 0 writes the train state)."""
        return self.wandb.checkpoint_extra() if self.wandb is not None else {}

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.close()
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
