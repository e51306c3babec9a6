"""Checkpoints: one DCP directory per iteration, keyed by the full model's parameter names.

    SAVE/latest                       the iteration of the newest complete checkpoint (text)
    SAVE/iter_0000100/.metadata       DCP: model (top-level keys, e.g. `layers.3.mlp.up_proj.weight`)
    SAVE/iter_0000100/__*_*.distcp         and optimizer state (`optimizer.state.<name>.exp_avg`, ...)
    SAVE/iter_0000100/train_state.json     iteration, consumed samples, extras, LR schedule, loss
                                           scaler, world size and layout, the whole config
    SAVE/iter_0000100/rng/rank_00000.pt    each rank's python / numpy / torch (/ CUDA) RNG state
    SAVE/iter_0000100/checksums.json       size and CRC-32 of every other file (checksums.py), verified
                                           at every load before anything is read

Keys never mention the layout, so a checkpoint saved with one TP x PP x DP layout loads into any
other (DCP reshards). Optimizer state is keyed by parameter name
(`flatten_optimizer_state_dict`), not by the optimizer's integer ids, which differ per layout.

A save writes `iter_N.partial/`, and only after every rank finished does rank 0 rename it to
`iter_N/` and then replace `latest`: a run killed mid-save leaves `latest` naming the previous
complete checkpoint and no incomplete directory under a final name. The checksum list is written
after every file (an async save's too) and before the rename and `latest`.

A save that fails (a full disk, a quota, any other error of a write or rename, on any rank) stops
every rank with the same one-line CheckpointError naming the step or file, the error and, for a
full disk or quota, the free space. It leaves no `iter_N.partial/` and no temporary file; `latest`
and the checkpoints before stay as they were. Should only `latest` fail to move, the new
`iter_N/` it would have named is removed too: nothing would ever resume from it.

A load refuses, each with one line: a --load that finds no checkpoint (but the first launch of
`--save X --load X`), architecture flags that differ from the checkpoint's, on resume data
settings that differ (split, seed, sequence length, tokenizer, the files of a prefix it read: the
data positions would index another sample sequence), and a file that does not match its checksum.
The blend's weights may change on resume, and prefixes be added or dropped: every domain continues
its own sample order where it stopped (`data/mixture.py`; the positions are in the train state's
`extra.data_order`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..config import Config, ModelConfig, parse_data_path, parse_split
from ..model import rope
from . import checksums
from .reader import ShardReader
from ..errors import MellamaError

LATEST = "latest"
TRAIN_STATE = "train_state.json"
PARTIAL_SUFFIX = ".partial"
FORMAT_VERSION = 1
# DCP warns on every call without a process group (also from its async thread) that it assumes a
# single process: that is what a single-process run means
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
_OPTIONS = StateDictOptions(full_state_dict=False, flatten_optimizer_state_dict=True, strict=True)
# What the model computes follows from: (flag, the ModelConfig fields it needs in the saved
# config, value of a ModelConfig). The shapes, and the two values that change the function of the
# same weights (RMSNorm's epsilon and RoPE's base). A value an older checkpoint did not record is
# not compared.
_ARCH_FLAGS = (
    ("--num-layers", ("num_layers",), lambda m: m.num_layers),
    ("--hidden-size", ("hidden_size",), lambda m: m.hidden_size),
    ("--num-attention-heads", ("num_attention_heads",), lambda m: m.num_attention_heads),
    ("--num-query-groups", ("num_attention_heads",), lambda m: m.kv_heads),
    ("--ffn-hidden-size", ("hidden_size",), lambda m: m.ffn_size),
    ("--vocab-size (padded)", ("vocab_size",), lambda m: m.padded_vocab_size),
    ("--norm-epsilon", ("norm_epsilon",), lambda m: m.norm_epsilon),
    ("--rotary-base", ("rotary_base",), lambda m: m.rotary_base),
    # an older checkpoint records no scaling: its defaults are the plain RoPE it was trained with
    ("RoPE scaling", (), rope.describe),
)
# The values that place tokens (RoPE and its tables), which --finetune --extend-context may change
_POSITION_FLAGS = frozenset({"--rotary-base", "RoPE scaling", "--max-position-embeddings"})
# Optimizer settings that depend on the layout (DTensors cannot take the fused kernel): the
# running optimizer's own values are kept, whatever the checkpoint's layout was.
_KEEP_GROUP_KEYS = ("fused", "foreach", "capturable", "differentiable")


class CheckpointError(MellamaError, ValueError):
    """A checkpoint cannot be used; the message names the path and what is wrong."""


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> int | None:
    """The iteration `root/latest` names, or None when there is no `latest`."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as fh:
            raw = fh.read(64)
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc.strerror or exc})") from None
    text = raw.decode("ascii", errors="replace").strip()
    if not text.isdigit() or not text.isascii():
        raise CheckpointError(f"{path}: expected an iteration number, found {raw[:40]!r}")
    return int(text)


def _same_path(a: str | None, b: str | None) -> bool:
    return bool(a and b) and os.path.realpath(a) == os.path.realpath(b)


def checkpoint_to_load(cfg: Config, path: str | None = None) -> str | None:
    """The checkpoint directory `CheckpointManager.load(path)` reads (default --load), or None when
    the run starts from scratch; raises CheckpointError where `load` would. Reads no tensor.

    Starting from scratch with a --load is only Megatron-LM's first launch of `--save X --load X`:
    X missing or holding no checkpoint yet, and the same directory as --save, without --finetune.
    Any other --load that finds no checkpoint is an error (a typo must not train from random weights).

    Every load reads every weight of the model (resume and --finetune alike, strictly: a weight the
    checkpoint lacks is an error), so a run for which this names a directory can build its engine
    with `initialise=False` and pass the directory to `load`.
    """
    root = path or cfg.checkpoint.load
    if not root:
        return None
    first_launch = _same_path(root, cfg.checkpoint.save) and not cfg.checkpoint.finetune
    if not os.path.isdir(root):
        if first_launch and not os.path.exists(root):
            return None
        raise CheckpointError(f"--load {root}: no such directory")
    iteration = latest_iteration(root)
    if iteration is not None:
        ckpt = checkpoint_dir(root, iteration)
        if not os.path.isdir(ckpt):
            raise CheckpointError(f"{os.path.join(root, LATEST)} names iteration {iteration} but {ckpt} "
                                  "does not exist")
        return ckpt
    if os.path.isfile(os.path.join(root, ".metadata")):
        return root  # an iteration directory given directly
    saved = sorted(n for n in os.listdir(root) if _ITER_DIR.match(n))
    if saved:
        raise CheckpointError(f"--load {root}: no '{LATEST}' file, but it holds {', '.join(saved[-3:])}: "
                              f"point --load at one of them, or write its iteration into {root}/{LATEST}")
    if first_launch:
        return None
    why = ("--finetune needs a checkpoint to start from" if cfg.checkpoint.finetune else
           "only the first launch of --save X --load X (the same directory) starts from scratch")
    raise CheckpointError(f"--load {root}: no checkpoint there (no '{LATEST}' file); {why}")


def read_train_state(ckpt: str) -> dict:
    """`ckpt/train_state.json`, checked to hold what `load` reads; CheckpointError otherwise."""
    path = os.path.join(ckpt, TRAIN_STATE)
    try:
        with open(path) as fh:
            saved = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable train state ({type(exc).__name__}: {exc})") from None
    missing = [k for k in ("iteration", "consumed_samples", "scheduler", "scaler", "config")
               if not isinstance(saved, dict) or k not in saved]
    if missing or "model" not in saved["config"]:
        raise CheckpointError(f"{path}: unreadable train state (missing {', '.join(missing) or 'config.model'})")
    return saved


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


def write_train_state(ckpt_dir: str, *, iteration: int, consumed_samples: int, config: Config,
                      extra: dict | None = None, world_size: int = 1, layout: dict | None = None,
                      scheduler: dict | None = None, scaler: dict | None = None, data: dict | None = None) -> None:
    """`train_state.json`: everything in a checkpoint but its tensors, in the one format `load` reads.

    Empty scheduler and scaler states mark a weights-only checkpoint (one imported from elsewhere).
    `data` (`data_identity`): what the sample sequence `consumed_samples` indexes depends on."""
    state = dict(format=FORMAT_VERSION, iteration=iteration, consumed_samples=consumed_samples,
                 extra=dict(extra or {}), world_size=world_size, layout=layout or dict(tp=1, pp=1, dp=1),
                 scheduler=scheduler or {}, scaler=scaler or {}, config=dataclasses.asdict(config))
    if data is not None:
        state["data"] = data
    _fsync_write(os.path.join(ckpt_dir, TRAIN_STATE), json.dumps(state, indent=1))


# Tokenizer files of a Hugging Face tokenizer directory (which may be a whole model's folder):
# what the tokenizer hash covers.
_TOKENIZER_FILES = re.compile(r"^(tokenizer.*|vocab.*|merges\.txt|special_tokens_map\.json|added_tokens\.json|.*\.model)$")


def tokenizer_hash(path: str | None) -> str | None:
    """sha256 of the tokenizer model file (or of a tokenizer directory's tokenizer files), None
    when there is none or it cannot be read."""
    if not path:
        return None
    try:
        named = os.path.isdir(path)  # a directory's hash covers its files' names too, a file's only its bytes
        if named:
            files = sorted(f for f in os.listdir(path) if _TOKENIZER_FILES.match(f)
                           and os.path.isfile(os.path.join(path, f)))
        else:
            path, files = os.path.dirname(path), [os.path.basename(path)]
        digest = hashlib.sha256()
        for name in files:
            if named:
                digest.update(name.encode() + b"\0")
            with open(os.path.join(path, name), "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()
    except OSError:
        return None


def _prefix_record(prefix: str, sft: bool) -> dict:
    """A --data-path prefix: its absolute path, the sizes of its files and the sha256 of its .idx
    (the same dataset moved elsewhere has the same name, sizes and index; data preprocessed again
    has another index even at the same sizes); for --sft, those of its token file."""
    from ..data.index_file import index_fingerprint

    sizes, files = {}, prefix
    if sft:
        from ..data.sft_dataset import pair_of

        files = pair_of(prefix)[0]
    for ext in ("bin", "idx"):
        try:
            sizes[ext] = os.path.getsize(f"{files}.{ext}")
        except OSError:
            sizes[ext] = None
    return dict(path=os.path.abspath(prefix), **sizes, idx_sha256=index_fingerprint(files))


def data_identity(cfg: Config, tokenizer_sha256: str | None = None) -> dict:
    """What the sample sequence of a run depends on: a resume (not --finetune) must find the same."""
    d = cfg.data
    blend = None
    if d.data_path:
        pairs = parse_data_path(d.data_path)
        total = sum(w for w, _ in pairs)
        blend = [dict(weight=w / total, **_prefix_record(p, d.sft)) for w, p in pairs]
    return dict(mock_data=bool(d.mock_data), data_path=list(d.data_path or []), blend=blend, split=d.split,
                seed=cfg.train.seed, seq_length=cfg.seq_length, tokenizer_type=d.tokenizer_type,
                tokenizer_model=d.tokenizer_model, tokenizer_sha256=tokenizer_sha256,
                vocab_size=cfg.model.vocab_size, sft=bool(d.sft))


def _split_fractions(split: str):
    try:
        values = parse_split(split)
    except Exception:
        return split
    return [round(v / sum(values), 12) for v in values]


def _same_prefix(a: dict, b: dict) -> bool:
    """The same files, maybe moved: the same name, sizes and .idx fingerprint (where both have one:
    checkpoints written before it was recorded have none)."""
    fingerprints = (a.get("idx_sha256"), b.get("idx_sha256"))
    return (os.path.basename(a.get("path") or "") == os.path.basename(b.get("path") or "")
            and a.get("bin") is not None and (a.get("bin"), a.get("idx")) == (b.get("bin"), b.get("idx"))
            and (None in fingerprints or fingerprints[0] == fingerprints[1]))


def _counterparts(theirs: dict, ours: list, saved_paths: set) -> list:
    """This run's prefixes that may hold the data the checkpoint read as `theirs`: the one at the
    same path, else (data moved) those of the same file name that the checkpoint did not read at
    their own path. Matched by path first, so two prefixes of one file name in different folders
    (bio/text_document, clin/text_document) are each compared with themselves."""
    exact = [m for m in ours if m["path"] == theirs.get("path")]
    if exact:
        return exact
    name = os.path.basename(theirs.get("path") or "")
    return [m for m in ours if os.path.basename(m["path"]) == name and m["path"] not in saved_paths]


def data_notes(saved: dict, ours: dict) -> list[str]:
    """Lines for a resume whose data could be checked only in part."""
    blend = saved.get("blend") if isinstance(saved, dict) else None
    if blend and ours.get("blend") and any(not theirs.get("idx_sha256") for theirs in blend):
        return ["the checkpoint records no .idx fingerprint of its data (written before they were): the "
                "--data-path prefixes were checked by file name and size only"]
    return []


def _fingerprint_text(record: dict) -> str:
    digest = record.get("idx_sha256")
    return f" sha256 {digest[:12]}" if digest else ""


def data_differences(saved: dict, ours: dict) -> list[str]:
    """What changed between a checkpoint's data identity and this run's, one phrase each."""
    diffs = []
    if saved.get("mock_data") != ours["mock_data"] or bool(saved.get("blend")) != bool(ours["blend"]):
        def what(d):
            return "--mock-data" if d.get("mock_data") else f"--data-path {' '.join(d.get('data_path') or [])}"
        diffs.append(f"{what(ours)} but the checkpoint was trained on {what(saved)}")
    elif ours["blend"]:
        # Weights may change and prefixes come and go (data/mixture.py continues every domain where
        # it stopped); a prefix the checkpoint read must still hold the same data.
        saved_paths = {theirs.get("path") for theirs in saved["blend"]}
        for theirs in {t.get("path"): t for t in saved["blend"]}.values():
            candidates = _counterparts(theirs, ours["blend"], saved_paths)
            if candidates and not any(_same_prefix(theirs, mine) for mine in candidates):
                mine = candidates[0]
                diffs.append(f"--data-path {mine['path']} is not the data the checkpoint read as "
                             f"{theirs.get('path')} (.bin {mine['bin']} bytes, .idx {mine['idx']}"
                             f"{_fingerprint_text(mine)}; it read .bin {theirs.get('bin')}, .idx "
                             f"{theirs.get('idx')}{_fingerprint_text(theirs)})")
    if _split_fractions(saved.get("split")) != _split_fractions(ours["split"]) and not ours["mock_data"]:
        diffs.append(f"--split {ours['split']} but the checkpoint has {saved.get('split')}")
    for flag, key in (("--seed", "seed"), ("--seq-length", "seq_length"), ("--tokenizer-type", "tokenizer_type"),
                      ("--vocab-size", "vocab_size")):
        if key in saved and saved[key] != ours[key]:
            diffs.append(f"{flag} {ours[key]} but the checkpoint has {saved[key]}")
    if saved.get("sft", False) != ours["sft"]:
        diffs.append("--sft, but the checkpoint's run trained without it" if ours["sft"] else
                     "no --sft, but the checkpoint's run instruction-tuned with it")
    theirs_hash, our_hash = saved.get("tokenizer_sha256"), ours["tokenizer_sha256"]
    if theirs_hash != our_hash and (theirs_hash or saved.get("tokenizer_model")):
        def tok(model, digest):
            return f"{model} (sha256 {digest[:12]})" if digest else f"{model or 'none'}"
        diffs.append(f"--tokenizer-model {tok(ours['tokenizer_model'], our_hash)} but the checkpoint was trained "
                     f"with {tok(saved.get('tokenizer_model'), theirs_hash)}")
    return diffs


def write_latest(root: str, iteration: int) -> None:
    """Point `root/latest` at `iteration`, atomically: the last step of every save."""
    _fsync_write(os.path.join(root, LATEST), f"{iteration}\n")


def _fsync_write(path: str, text: str) -> None:
    """Write `text` to `path` atomically: a reader sees the old file or the whole new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # a full disk must not also keep the half-written temporary file
        _remove_file(tmp)
        raise
    _fsync_dir(os.path.dirname(path) or ".")


def _remove_file(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _fsync_dir(path: str) -> None:
    # makes renames inside `path` durable across a machine crash, not only a process crash
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _root_cause(exc: BaseException) -> BaseException:
    """The first rank's original exception inside DCP's CheckpointException."""
    if isinstance(exc, CheckpointException) and exc.failures:
        first = exc.failures[min(exc.failures)]
        return first[0] if isinstance(first, tuple) else first
    return exc


class _StepFailed(Exception):
    """A step of a save failed on this rank; the message is the line every rank raises."""


def _failure_line(root: str, iteration: int, step: str, exc: BaseException, name_file: bool) -> str:
    """`cannot save checkpoint iteration N to ROOT: REASON (STEP; X GiB free on that filesystem)`.

    `name_file`: the step wrote several files, so the one the error names (if any) says more."""
    cause = _root_cause(exc)
    if isinstance(cause, OSError):
        reason = cause.strerror or str(cause)
        if name_file and cause.filename:
            step = f"writing {_relative(os.fspath(cause.filename), root)}"
    else:
        reason = f"{type(cause).__name__}: {cause}"
    if getattr(cause, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        try:
            step += f"; {_size_text(shutil.disk_usage(root).free)} free on that filesystem"
        except OSError:
            pass
    return " ".join(f"cannot save checkpoint iteration {iteration} to {root}: {reason} ({step})".split())


@contextlib.contextmanager
def _failing_as(root: str, iteration: int, step: str, name_file: bool):
    try:
        yield
    except _StepFailed:
        raise
    except (Exception, CheckpointException) as exc:
        raise _StepFailed(_failure_line(root, iteration, step, exc, name_file)) from exc


def _relative(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else rel


def _size_text(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def _attempt(fn, *args):
    """`fn(*args)`, or the `_StepFailed` it raised: a rank must reach the agreement that follows
    whether its step failed or not."""
    try:
        return fn(*args)
    except _StepFailed as exc:
        return exc


class _NamingFileSystem(FileSystem):
    """DCP's file system, but an error while writing a file names it (a failed write() does not)."""

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        try:
            with super().create_stream(path, mode) as stream:
                yield stream
        except OSError as exc:
            if exc.filename is None:
                exc.filename = os.fspath(path)
            raise


def _replace_dir(partial: str, final: str) -> None:
    """Rename `partial` to `final`. An existing `final` (the same iteration saved again) stays
    until the rename succeeded, and comes back if it failed."""
    if not os.path.exists(final):
        os.rename(partial, final)
        return
    stale = final + ".old"
    shutil.rmtree(stale, ignore_errors=True)
    os.rename(final, stale)
    try:
        os.rename(partial, final)
    except OSError:
        os.rename(stale, final)
        raise
    shutil.rmtree(stale, ignore_errors=True)


def _remove_unnamed(root: str, iteration: int) -> None:
    """After `latest` failed to move: checkpoint `iteration` goes unless `latest` names it anyway
    (it had, or the failure came after the rename). Nothing resumes from a checkpoint `latest`
    does not name, and a full disk needs the space back."""
    try:
        named = latest_iteration(root)
    except CheckpointError:
        named = None
    if named != iteration:
        shutil.rmtree(checkpoint_dir(root, iteration), ignore_errors=True)


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
        failed = _attempt(self._prepare, partial, iteration, consumed_samples, extra) if self.rank == 0 else None
        self._agree(failed, partial)
        rng = os.path.join(partial, "rng", f"rank_{self.rank:05d}.pt")
        self._agree(_attempt(self._write_rng, rng, iteration), partial)
        writer = dcp.FileSystemWriter(partial, sync_files=True)
        writer.fs = _NamingFileSystem()
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
            self._finalise(iteration, partial, started, _attempt(self._write_tensors, state, writer, iteration))

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
        with self._step(iteration, f"creating {_relative(partial, root)}/rng"):
            os.makedirs(os.path.join(partial, "rng"))
        with self._step(iteration, f"writing {_relative(os.path.join(partial, TRAIN_STATE), root)}"):
            d = self.engine.dims
            write_train_state(partial, iteration=iteration, consumed_samples=consumed_samples, config=self.cfg,
                              extra=extra, world_size=self.world, layout=dict(tp=d.tp, pp=d.pp, dp=d.dp),
                              scheduler=self.engine.scheduler.state_dict(), scaler=self.engine.scaler.state_dict(),
                              data=self._data_identity())

    def _write_rng(self, path: str, iteration: int) -> None:
        with self._step(iteration, f"writing {_relative(path, self.cfg.checkpoint.save)}"):
            torch.save(_rng_state(), path)

    def _write_tensors(self, state: dict, writer, iteration: int) -> dict:
        """The DCP files (every rank together); this rank's checksums of its files."""
        partial = os.fspath(writer.path)
        with self._step(iteration, f"writing {_relative(partial, self.cfg.checkpoint.save)}/", name_file=True):
            dcp.save(state, storage_writer=writer, no_dist=not self.distributed)
        with self._step(iteration, f"checksumming {_relative(partial, self.cfg.checkpoint.save)}/"):
            return self._own_checksums(partial)

    def wait(self) -> None:
        """Block until a pending async save is written, then finalise it (rename, `latest`)."""
        if self._pending is None:
            return
        future, iteration, partial, started = self._pending
        self._pending = None
        self._finalise(iteration, partial, started, _attempt(self._background_result, future, iteration, partial))

    def _background_result(self, future, iteration: int, partial: str) -> dict:
        where = f"writing {_relative(partial, self.cfg.checkpoint.save)}/ in the background"
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

    def _finalise(self, iteration: int, partial: str, started: float, sums: dict | _StepFailed) -> None:
        # every rank's files are written and checksummed (or failed); rank 0 checksums the rest
        # (.metadata, train_state.json) and writes the list before the rename and `latest`
        gathered = self._gather(str(sums) if isinstance(sums, _StepFailed) else sums)
        self._settle(gathered, sums, partial)
        failed = _attempt(self._publish, iteration, partial, started, gathered) if self.rank == 0 else None
        self._agree(failed, partial)

    def _publish(self, iteration: int, partial: str, started: float, gathered: list[dict]) -> None:
        """Rank 0: the checksum list, the final name, `latest`."""
        root = os.path.dirname(partial)
        final = checkpoint_dir(root, iteration)
        with self._step(iteration, f"writing {_relative(partial, root)}/{checksums.CHECKSUMS}"):
            files = {k: v for part in gathered for k, v in part.items()}
            rest = [n for n in checksums.files_under(partial) if n not in files]
            files.update(checksums.checksum_files(partial, rest))
            checksums.write_checksums(partial, files)
            _fsync_dir(partial)
        with self._step(iteration, f"renaming {_relative(partial, root)} to {_relative(final, root)}"):
            _replace_dir(partial, final)
        try:
            with self._step(iteration, f"syncing {root}"):
                _fsync_dir(root)
            with self._step(iteration, f"writing {LATEST}"):
                write_latest(root, iteration)
        except _StepFailed:
            _remove_unnamed(root, iteration)
            raise
        try:
            # what a preemption's lead time (--signal=USR1@N) must cover, measured on every save
            seconds = time.perf_counter() - started
            size = _bytes_under(final)
            print(f"saved checkpoint {final}: {size / 2 ** 30:.2f} GiB in {seconds:.1f} s "
                  f"({size / 2 ** 30 / max(seconds, 1e-9):.2f} GiB/s)", flush=True)
            self._prune(root, iteration)
        except OSError as exc:
            # the checkpoint is complete and `latest` names it: not a failed save
            print(f"saved checkpoint {final}; removing older ones failed: {exc}", flush=True)

    def _step(self, iteration: int, step: str, name_file: bool = False):
        """A context in which any failure becomes `_StepFailed` with the line naming `step`."""
        return _failing_as(self.cfg.checkpoint.save, iteration, step, name_file)

    def _agree(self, failed: _StepFailed | None, partial: str) -> None:
        """After a step some ranks took: every rank raises the first rank's failure, if any."""
        self._settle(self._gather(str(failed) if failed is not None else None), failed, partial)

    def _settle(self, gathered: list, own, partial: str) -> None:
        lines = [g for g in gathered if isinstance(g, str)]
        if not lines:
            return
        # every rank is past its writes: the incomplete directory can go
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(lines[0]) from (own if isinstance(own, _StepFailed) else None)

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
        iterations = sorted(int(m.group(1)) for m in map(_ITER_DIR.match, os.listdir(root)) if m)
        for it in iterations[:-keep]:
            if it != latest:
                shutil.rmtree(checkpoint_dir(root, it), ignore_errors=True)

    def _data_identity(self) -> dict:
        if self._data is None:
            self._data = data_identity(self.cfg, tokenizer_hash(self.cfg.data.tokenizer_model))
        return self._data

    def _check_data(self, saved: dict, ckpt: str) -> None:
        """On resume: the data settings `consumed_samples` indexes must be the checkpoint's (a
        checkpoint from before they were recorded is not checked)."""
        if not isinstance(saved.get("data"), dict):
            return
        for line in data_notes(saved["data"], self._data_identity()):
            self._print(f"{ckpt}: {line}")
        diffs = data_differences(saved["data"], self._data_identity())
        if diffs:
            raise CheckpointError(f"{ckpt}: the data settings differ from the run that saved it, so its "
                                  f"{saved['consumed_samples']} consumed samples would index another sample "
                                  f"sequence: {'; '.join(diffs)} (--finetune starts a new run from its weights)")

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
        self._check_model(saved, ckpt)

        weights_only = c.finetune
        if not weights_only:
            self._check_data(saved, ckpt)
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

    def _check_model(self, saved: dict, ckpt: str) -> None:
        """Every architecture value the checkpoint recorded must equal this run's: one line naming
        each flag that differs and both values. Under --finetune, --max-position-embeddings (the
        length of the rotary tables, no weight) may be shorter than the checkpoint's; with
        --finetune --extend-context the position values (`_POSITION_FLAGS`: RoPE base, RoPE scaling,
        the tables' length) may differ, as LLaMA2-Long changed them (base 10,000 -> 500,000, longer
        sequences); they are no weight. On a resume they must match."""
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        recorded = {k: v for k, v in saved["config"]["model"].items() if k in names}
        theirs = ModelConfig(**recorded)
        ours = self.cfg.model
        diffs = {flag: f"{flag} {get(ours)} but the checkpoint has {get(theirs)}"
                 for flag, needs, get in _ARCH_FLAGS if all(n in recorded for n in needs) and get(ours) != get(theirs)}
        theirs_max, ours_max = recorded.get("max_position_embeddings"), ours.max_position_embeddings
        if theirs_max is not None and ours_max != theirs_max:
            diffs["--max-position-embeddings"] = f"--max-position-embeddings {ours_max} but the checkpoint has {theirs_max}"
        c = self.cfg.checkpoint
        extension = [flag for flag in diffs if flag in _POSITION_FLAGS] if c.finetune and c.extend_context else []
        if extension:
            self._print(f"extending the context of {ckpt} (--finetune --extend-context): "
                        + "; ".join(diffs.pop(flag) for flag in extension))
        elif c.finetune and theirs_max is not None and ours_max < theirs_max:
            # shorter rotary tables hold no weight: a --finetune may train on shorter sequences
            diffs.pop("--max-position-embeddings")
        if diffs:
            hint = ""
            if not c.extend_context and any(flag in _POSITION_FLAGS for flag in diffs):
                hint = " (a new run that changes the positions on purpose: --finetune --extend-context)"
            raise CheckpointError(f"{ckpt}: the model flags do not match the checkpoint: "
                                  f"{'; '.join(diffs.values())}{hint}")

    def _load_tensors(self, ckpt: str, load_optim: bool) -> None:
        state = self._state_dict(optimizer=load_optim)
        try:
            # each rank reads only its share of every tensor, not whole stored tensors
            dcp.load(state, storage_reader=ShardReader(ckpt), no_dist=not self.distributed)
        except (Exception, CheckpointException) as exc:
            raise self._explain(exc, ckpt) from None
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

    def _explain(self, exc: BaseException, ckpt: str) -> CheckpointError:
        cause = _root_cause(exc)
        text = str(cause)
        size = re.search(r"Size mismatch between saved (.+?) and current: (.+?) for (\S+)", text)
        if size:
            saved, current, key = size.groups()
            return CheckpointError(f"{ckpt}: tensor {key} has shape {list(_shape_of(saved))} in the checkpoint "
                                   f"but {list(_shape_of(current))} in this model")
        key = re.search(r"Missing key in checkpoint state_dict: (\S+?)\.?$", text, re.M)
        if key:
            hint = " (a weights-only checkpoint? use --finetune or --no-load-optim)" if key.group(1).startswith(
                "optimizer.") else ""
            return CheckpointError(f"{ckpt}: the checkpoint has no {key.group(1)}{hint}")
        first = text.strip().splitlines()[-1] if text.strip() else ""
        return CheckpointError(f"{ckpt}: unreadable or corrupt checkpoint ({type(cause).__name__}: {first})")

    def _load_rng(self, ckpt: str, saved: dict) -> None:
        path = os.path.join(ckpt, "rng", f"rank_{self.rank:05d}.pt")
        if saved.get("world_size") != self.world or not os.path.isfile(path):
            self._print(f"{ckpt}: saved with {saved.get('world_size')} processes, running {self.world}: "
                        "random-number-generator states not restored")
            return
        try:
            _set_rng_state(torch.load(path, weights_only=False))
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable RNG state ({type(exc).__name__}: {exc})") from None

    def _print(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)


def _bytes_under(path: str) -> int:
    """Total size of the files under `path` (every rank's, on a shared file system)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _shape_of(text: str) -> tuple:
    """`torch.Size([64, 32])` (as DCP prints it) -> (64, 32)."""
    return tuple(int(x) for x in re.findall(r"\d+", text))
