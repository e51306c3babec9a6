"""Checkpoints: one DCP directory per iteration, keyed by the full model's parameter names
(the directory's files: layout.py).

Keys never mention the layout, so a checkpoint saved with one TP x PP x DP layout loads into any
other (DCP reshards). Optimizer state is keyed by parameter name
(`flatten_optimizer_state_dict`), not by the optimizer's integer ids, which differ per layout.

A save that fails (a full disk, a quota, any other error of a write or rename, on any rank) stops
every rank with the same one-line CheckpointError naming the step or file, the error and, for a
full disk or quota, the free space. It leaves no `iter_N.partial/` and no temporary file; `latest`
and the checkpoints before stay as they were. Should only `latest` fail to move, the new
`iter_N/` it would have named is removed too: nothing would ever resume from it.

A load checks first what resume.py decides (which checkpoint, its model and data settings), then
every file against its checksum, then reads the tensors.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..config import Config
from ..data.identity import data_identity
from . import checksums
from .failures import NamingFileSystem, StepFailed, attempt, explain_load_failure, failing_as, relative
from .layout import (LATEST, PARTIAL_SUFFIX, TRAIN_STATE, CheckpointError, bytes_under, checkpoint_dir, fsync_dir,
                     read_train_state, remove_unnamed, replace_dir, rng_file, saved_iterations, write_latest,
                     write_train_state)
from .reader import ShardReader
from .resume import check_data, check_model, checkpoint_to_load
from .rng_state import rng_state, set_rng_state

# DCP warns on every call without a process group (also from its async thread) that it assumes a
# single process: that is what a single-process run means
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
_OPTIONS = StateDictOptions(full_state_dict=False, flatten_optimizer_state_dict=True, strict=True)


class FullModelView(nn.Module):
    """The union of one rank's pipeline parts as one module with the full model's names.

    A rank running several (virtual) stages holds several `Llama` parts; DCP's state-dict helpers
    need one module whose parameters cover everything the (single) optimizer steps. The view only
    references the parts' submodules: no copies, and FSDP/TP wrapping stays as it is.
    """

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        first = [p.embed_tokens for p in parts if getattr(p, "embed_tokens", None) is not None]
        if first:
            self.embed_tokens = first[0]
        layers = {name: layer for p in parts for name, layer in p.layers.items()}
        self.layers = nn.ModuleDict({k: layers[k] for k in sorted(layers, key=int)})
        for attr in ("norm", "lm_head"):
            owned = [getattr(p, attr) for p in parts if getattr(p, attr, None) is not None]
            if owned:
                setattr(self, attr, owned[0])


class CheckpointManager:
    """Saves and resumes the engine's whole training state. Every rank calls every method."""

    def __init__(self, cfg: Config, engine):
        self.cfg, self.engine = cfg, engine
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        modules = list(engine.modules)
        self.model = modules[0] if len(modules) == 1 else FullModelView(modules)
        self._pool = None  # the thread that checksums an async save's files once they are written
        self._data = None  # this run's data_identity, computed once (it hashes the tokenizer)
        self._pending = None  # (future, iteration, partial dir, start time) of an async save not yet finalised
        # DCP's background thread runs collectives while training runs its own: they must not
        # share a process group. gloo, because async DCP stages on the CPU.
        self._async_group = None
        if cfg.checkpoint.async_save and self.distributed:
            self._async_group = dist.new_group(backend="gloo")

    # -- save --------------------------------------------------------------------------------------
    # Every step only some ranks take is followed by an agreement (one all_gather of each rank's
    # error line or None): all ranks raise the same line together and none waits in a collective
    # for a rank that stopped. Whatever fails, a save runs the same collectives: two agreements
    # before DCP's, one gather of the checksums (or failures) after them, one agreement at the end.
    def save(self, iteration: int, consumed_samples: int, extra: dict | None = None) -> None:
        """Write checkpoint `iteration`; returns once it is complete, or staged when saving async."""
        root = self.cfg.checkpoint.save
        if not root:
            raise CheckpointError("save() needs --save")
        self.wait()
        started = time.perf_counter()
        partial = checkpoint_dir(root, iteration) + PARTIAL_SUFFIX
        failed = attempt(self._prepare, partial, iteration, consumed_samples, extra) if self.rank == 0 else None
        self._agree(failed, partial)
        rng = rng_file(partial, self.rank)
        self._agree(attempt(self._write_rng, rng, iteration), partial)
        writer = dcp.FileSystemWriter(partial, sync_files=True)
        writer.fs = NamingFileSystem()
        state = self._state_dict(optimizer=True)
        if self.cfg.checkpoint.async_save:
            future = dcp.async_save(state, storage_writer=writer, process_group=self._async_group,
                                    no_dist=not self.distributed)
            upload = getattr(future, "upload_completion", future)
            # this rank's files are checksummed in the background as soon as they are written
            sums = self._checksum_pool().submit(lambda: (upload.result(), self._own_checksums(partial))[1])
            self._pending = (sums, iteration, partial, started)
            self._print(f"checkpoint of iteration {iteration} staged in {time.perf_counter() - started:.1f} s; "
                        "writing it in the background")
        else:
            # DCP's own collectives make every rank raise when one rank's write fails
            self._finalise(iteration, partial, started, attempt(self._write_tensors, state, writer, iteration))

    def _prepare(self, partial: str, iteration: int, consumed_samples: int, extra: dict | None) -> None:
        """Rank 0: the empty `partial` directory and its train_state.json."""
        root = os.path.dirname(partial)
        with self._step(iteration, f"creating {root}"):
            os.makedirs(root, exist_ok=True)
            # nothing is being written now (wait() finalised any async save): partial
            # directories are leftovers of a crashed run
            for name in os.listdir(root):
                if name.endswith(PARTIAL_SUFFIX):
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        with self._step(iteration, f"creating {relative(partial, root)}/rng"):
            os.makedirs(os.path.join(partial, "rng"))
        with self._step(iteration, f"writing {relative(os.path.join(partial, TRAIN_STATE), root)}"):
            d = self.engine.dims
            write_train_state(partial, iteration=iteration, consumed_samples=consumed_samples, config=self.cfg,
                              extra=extra, world_size=self.world, layout=dict(tp=d.tp, pp=d.pp, dp=d.dp),
                              scheduler=self.engine.scheduler.state_dict(), scaler=self.engine.scaler.state_dict(),
                              data=self._data_identity())

    def _write_rng(self, path: str, iteration: int) -> None:
        with self._step(iteration, f"writing {relative(path, self.cfg.checkpoint.save)}"):
            torch.save(rng_state(), path)

    def _write_tensors(self, state: dict, writer, iteration: int) -> dict:
        """The DCP files (every rank together); this rank's checksums of its files."""
        partial = os.fspath(writer.path)
        with self._step(iteration, f"writing {relative(partial, self.cfg.checkpoint.save)}/", name_file=True):
            dcp.save(state, storage_writer=writer, no_dist=not self.distributed)
        with self._step(iteration, f"checksumming {relative(partial, self.cfg.checkpoint.save)}/"):
            return self._own_checksums(partial)

    def wait(self) -> None:
        """Block until a pending async save is written, then finalise it (rename, `latest`)."""
        if self._pending is None:
            return
        future, iteration, partial, started = self._pending
        self._pending = None
        self._finalise(iteration, partial, started, attempt(self._background_result, future, iteration, partial))

    def _background_result(self, future, iteration: int, partial: str) -> dict:
        where = f"writing {relative(partial, self.cfg.checkpoint.save)}/ in the background"
        with self._step(iteration, where, name_file=True):
            return future.result()

    def close(self) -> None:
        self.wait()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _checksum_pool(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-checksums")
        return self._pool

    def _own_checksums(self, partial: str) -> dict:
        """Checksums of the files this rank wrote into `partial` (its DCP data files, its RNG state)."""
        mine = re.compile(rf"^(__{self.rank}_\d+\.distcp|rng/rank_{self.rank:05d}\.pt)$")
        return checksums.checksum_files(partial, [n for n in checksums.files_under(partial) if mine.match(n)])

    def _finalise(self, iteration: int, partial: str, started: float, sums: dict | StepFailed) -> None:
        # every rank's files are written and checksummed (or failed); rank 0 checksums the rest
        # (.metadata, train_state.json) and writes the list before the rename and `latest`
        gathered = self._gather(str(sums) if isinstance(sums, StepFailed) else sums)
        self._settle(gathered, sums, partial)
        failed = attempt(self._publish, iteration, partial, started, gathered) if self.rank == 0 else None
        self._agree(failed, partial)

    def _publish(self, iteration: int, partial: str, started: float, gathered: list[dict]) -> None:
        """Rank 0: the checksum list, the final name, `latest`."""
        root = os.path.dirname(partial)
        final = checkpoint_dir(root, iteration)
        with self._step(iteration, f"writing {relative(partial, root)}/{checksums.CHECKSUMS}"):
            files = {k: v for part in gathered for k, v in part.items()}
            rest = [n for n in checksums.files_under(partial) if n not in files]
            files.update(checksums.checksum_files(partial, rest))
            checksums.write_checksums(partial, files)
            fsync_dir(partial)
        with self._step(iteration, f"renaming {relative(partial, root)} to {relative(final, root)}"):
            replace_dir(partial, final)
        try:
            with self._step(iteration, f"syncing {root}"):
                fsync_dir(root)
            with self._step(iteration, f"writing {LATEST}"):
                write_latest(root, iteration)
        except StepFailed:
            remove_unnamed(root, iteration)
            raise
        try:
            # what a preemption's lead time (--signal=USR1@N) must cover, measured on every save
            seconds = time.perf_counter() - started
            size = bytes_under(final)
            print(f"saved checkpoint {final}: {size / 2 ** 30:.2f} GiB in {seconds:.1f} s "
                  f"({size / 2 ** 30 / max(seconds, 1e-9):.2f} GiB/s)", flush=True)
            self._prune(root, iteration)
        except OSError as exc:
            # the checkpoint is complete and `latest` names it: not a failed save
            print(f"saved checkpoint {final}; removing older ones failed: {exc}", flush=True)

    def _step(self, iteration: int, step: str, name_file: bool = False):
        """A context in which any failure becomes `StepFailed` with the line naming `step`."""
        return failing_as(self.cfg.checkpoint.save, iteration, step, name_file)

    def _agree(self, failed: StepFailed | None, partial: str) -> None:
        """After a step some ranks took: every rank raises the first rank's failure, if any."""
        self._settle(self._gather(str(failed) if failed is not None else None), failed, partial)

    def _settle(self, gathered: list, own, partial: str) -> None:
        lines = [g for g in gathered if isinstance(g, str)]
        if not lines:
            return
        # every rank is past its writes: the incomplete directory can go
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(lines[0]) from (own if isinstance(own, StepFailed) else None)

    def _gather(self, obj) -> list:
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def _prune(self, root: str, latest: int) -> None:
        keep = self.cfg.checkpoint.keep_last
        if not keep:
            return
        for it in saved_iterations(root)[:-keep]:
            if it != latest:
                shutil.rmtree(checkpoint_dir(root, it), ignore_errors=True)

    def _data_identity(self) -> dict:
        if self._data is None:
            self._data = data_identity(self.cfg)
        return self._data

    def _state_dict(self, optimizer: bool) -> dict:
        state = get_model_state_dict(self.model, options=_OPTIONS)
        if optimizer:
            state["optimizer"] = get_optimizer_state_dict(self.model, self.engine.optimizer, options=_OPTIONS)
        return state

    # -- load --------------------------------------------------------------------------------------
    def load(self, path: str | None = None) -> dict | None:
        """Resume from `path` (default --load); returns the train state, or None when there is nothing.

        With --finetune only the weights are read and the state starts at iteration 0.
        """
        c = self.cfg.checkpoint
        root = path or c.load
        ckpt = checkpoint_to_load(self.cfg, path)
        if ckpt is None:
            if root:
                self._print(f"no checkpoint in {root} yet (the first launch of --save {root} --load {root}): "
                            "starting from scratch")
            return None
        missing = [f for f in (".metadata", TRAIN_STATE) if not os.path.isfile(os.path.join(ckpt, f))]
        if missing:
            raise CheckpointError(f"{ckpt}: incomplete checkpoint (missing {', '.join(missing)})")
        self._verify(ckpt)
        saved = read_train_state(ckpt)
        check_model(self.cfg, saved, ckpt, self._print)

        weights_only = c.finetune
        if not weights_only:
            check_data(saved, self._data_identity, ckpt, self._print)
        if not weights_only and not saved.get("scheduler"):
            raise CheckpointError(f"{ckpt} holds weights only (imported from Hugging Face or Meta): "
                                  "start from it with --finetune")
        load_optim = not weights_only and not c.no_load_optim
        self._load_tensors(ckpt, load_optim)
        if load_optim:
            try:
                o = self.cfg.optim
                self.engine.scheduler.load_state_dict(saved["scheduler"], override=o.override_opt_param_scheduler,
                                                      use_checkpoint=o.use_checkpoint_opt_param_scheduler)
            except ValueError as exc:
                raise CheckpointError(f"{ckpt}: {exc}") from None
            self.engine.scaler.load_state_dict(saved["scaler"])
        if not weights_only and not c.no_load_rng:
            self._load_rng(ckpt, saved)
        if weights_only:
            return dict(iteration=0, consumed_samples=0, loaded_from=ckpt)
        return dict(saved.get("extra", {}), iteration=saved["iteration"],
                    consumed_samples=saved["consumed_samples"], loaded_from=ckpt)

    def _verify(self, ckpt: str) -> None:
        """Every file against its checksum (rank r reads its 1/world share of the bytes); a mismatch
        anywhere stops every rank with the same line. A checkpoint without checksums is not checked."""
        try:
            files = checksums.read_checksums(ckpt)
        except checksums.ChecksumError as exc:
            raise CheckpointError(str(exc)) from None
        if files is None:
            self._print(f"{ckpt}: no {checksums.CHECKSUMS} (saved before checksums were written): not verified")
            return
        started = time.perf_counter()
        problems = checksums.verify(ckpt, files, checksums.share(files, self.rank, self.world))
        if self.distributed:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, problems)
            problems = sorted(p for part in gathered for p in part)
        if problems:
            more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
            raise CheckpointError(f"{ckpt}: unreadable or corrupt checkpoint (checksums: {'; '.join(problems[:3])}"
                                  f"{more})")
        size = sum(v["size"] for v in files.values())
        self._print(f"verified {len(files)} files of {ckpt} ({size / 2 ** 30:.2f} GiB) against their checksums "
                    f"in {time.perf_counter() - started:.1f} s")

    def _load_tensors(self, ckpt: str, load_optim: bool) -> None:
        state = self._state_dict(optimizer=load_optim)
        try:
            # each rank reads only its share of every tensor, not whole stored tensors
            dcp.load(state, storage_reader=ShardReader(ckpt), no_dist=not self.distributed)
        except (Exception, CheckpointException) as exc:
            raise explain_load_failure(exc, ckpt) from None
        optim_state = state.pop("optimizer", None)
        set_model_state_dict(self.model, state, options=_OPTIONS)
        if optim_state is not None:
            optimizer = self.engine.optimizer
            # the flags decide the hyperparameters (and the scheduler the lr): only the
            # per-parameter state (step, moments) comes from the checkpoint
            groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            set_optimizer_state_dict(self.model, optimizer, optim_state, options=_OPTIONS)
            for group, kept in zip(optimizer.param_groups, groups):
                group.update(kept)

    def _load_rng(self, ckpt: str, saved: dict) -> None:
        path = rng_file(ckpt, self.rank)
        if saved.get("world_size") != self.world or not os.path.isfile(path):
            self._print(f"{ckpt}: saved with {saved.get('world_size')} processes, running {self.world}: "
                        "random-number-generator states not restored")
            return
        try:
            set_rng_state(torch.load(path, weights_only=False))
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable RNG state ({type(exc).__name__}: {exc})") from None

    def _print(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)
