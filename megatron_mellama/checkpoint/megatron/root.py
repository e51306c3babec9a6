"""Where a Megatron-LM checkpoint is, and in which format.

`--save` of Megatron-LM writes a root holding `latest_checkpointed_iteration.txt` (an iteration
number, or `release`) and one folder per saved iteration, `iter_0000100/` (or `release/`). The
folder is torch_dist when it holds `metadata.json` naming that backend (megatron-core's
dist_checkpointing: `.metadata`, `__*.distcp`, `common.pt`), and the torch format when it holds one
`mp_rank_TT[_PPP]/model_optim_rng.pt` per model-parallel rank.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from ..sources import ConvertError

TRACKER = "latest_checkpointed_iteration.txt"
_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?")


@dataclasses.dataclass
class MegatronCheckpoint:
    directory: str            # the iteration folder
    iteration: int | None     # None for `release`
    format: str               # "torch_dist" or "torch"
    rank_files: dict          # torch format: (tp rank, pp rank) -> path of model_optim_rng.pt


def find(root: str, iteration: int | None = None) -> MegatronCheckpoint:
    """The checkpoint under Megatron-LM root `root` (its tracker's iteration, or `iteration`); `root`
    may also be an iteration folder itself."""
    if not os.path.isdir(root):
        raise ConvertError(f"--load {root}: no such directory")
    if iteration is not None:
        directory = os.path.join(root, f"iter_{iteration:07d}")
        if not os.path.isdir(directory):
            have = sorted(e for e in os.listdir(root) if e.startswith("iter_") or e == "release")
            raise ConvertError(f"--iteration {iteration}: {directory} does not exist (the root holds "
                               f"{', '.join(have[-5:]) or 'no iter_* folders'})")
    elif os.path.isfile(os.path.join(root, TRACKER)):
        with open(os.path.join(root, TRACKER)) as fh:
            text = fh.read().strip()
        if text == "release":
            directory, iteration = os.path.join(root, "release"), None
        elif text.isdigit():
            iteration = int(text)
            directory = os.path.join(root, f"iter_{iteration:07d}")
        else:
            raise ConvertError(f"{os.path.join(root, TRACKER)}: holds {text[:40]!r}; expected an iteration "
                               "number or 'release'")
        if not os.path.isdir(directory):
            raise ConvertError(f"{os.path.join(root, TRACKER)} names {os.path.basename(directory)}, which does "
                               f"not exist in {root}")
    else:
        directory = root
        m = re.fullmatch(r"iter_(\d{7})", os.path.basename(os.path.normpath(root)))
        iteration = int(m.group(1)) if m else None
    return MegatronCheckpoint(directory, iteration, *_format(directory, root))


def _format(directory: str, root: str) -> tuple[str, dict]:
    meta = os.path.join(directory, "metadata.json")
    if os.path.isfile(meta):
        try:
            with open(meta) as fh:
                backend = json.load(fh).get("sharded_backend")
        except (OSError, ValueError, AttributeError) as exc:
            raise ConvertError(f"{meta}: unreadable ({exc})") from None
        if backend != "torch_dist":
            raise ConvertError(f"{meta}: sharded_backend is {backend!r}; this importer reads torch_dist and torch "
                               "(the legacy per-rank files)")
        return "torch_dist", {}
    if os.path.isfile(os.path.join(directory, ".metadata")):
        raise ConvertError(f"{directory}: a PyTorch DCP checkpoint without megatron-core's metadata.json: "
                           "Megatron-LM's torch_dcp or fsdp_dtensor format, which this importer does not read "
                           "(torch_dist and torch are read)")
    files = {}
    for entry in sorted(os.listdir(directory)):
        m = _RANK_DIR.fullmatch(entry)
        path = os.path.join(directory, entry, "model_optim_rng.pt")
        if m and os.path.isfile(path):
            if m.group(3) is not None:
                raise ConvertError(f"{os.path.join(directory, entry)}: an expert-parallel rank; mixture-of-experts "
                                   "models are not LLaMA2")
            files[(int(m.group(1)), int(m.group(2) or 0))] = path
    if not files:
        raise ConvertError(f"--load {root}: {directory} is not a Megatron-LM checkpoint (no metadata.json for "
                           "torch_dist, no mp_rank_*/model_optim_rng.pt for the torch format)")
    tps = sorted({t for t, _ in files})
    pps = sorted({p for _, p in files})
    missing = [(t, p) for t in tps for p in pps if (t, p) not in files]
    if tps != list(range(len(tps))) or pps != list(range(len(pps))) or missing:
        t, p = missing[0] if missing else (len(tps), len(pps))
        raise ConvertError(f"{directory}: the model-parallel rank files are incomplete (no mp_rank_{t:02d}"
                           f"{'_%03d' % p if len(pps) > 1 else ''}/model_optim_rng.pt for the "
                           f"{len(tps)} x {len(pps)} TP x PP layout)")
    return "torch", files
