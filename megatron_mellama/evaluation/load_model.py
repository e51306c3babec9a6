"""Load a model to evaluate in one process: a Hugging Face LLaMA folder, or one of our checkpoints.

Our checkpoint is read with the export's own pieces (`checkpoint.convert.find_checkpoint`, the
model config saved with it, `checkpoint.reader.ShardReader`): DCP reads whole tensors without a
process group (`no_dist=True`) whatever tensor/pipeline/data-parallel layout saved them.
"""

from __future__ import annotations

import os

import torch

from ..errors import MellamaError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelLoadError(MellamaError, ValueError):
    """A model folder or checkpoint that cannot be loaded; one line naming the path."""


def load_hf_model(hf_dir: str, device: str = "cpu", dtype: str = "fp32", progress: bool = True):
    """(transformers causal LM, its tokenizer, its maximum sequence length) from a local folder."""
    if not os.path.isdir(hf_dir):
        raise ModelLoadError(f"--hf-dir {hf_dir}: no such directory")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ModelLoadError(f"--hf-dir {hf_dir}: no config.json (expected a Hugging Face model folder)")
    import transformers

    if not progress:
        transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"--hf-dir {hf_dir}: no usable tokenizer ({_one_line(exc)})") from None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True,
                                                                  dtype=DTYPES[dtype])
    except Exception as exc:
        raise ModelLoadError(f"--hf-dir {hf_dir}: cannot load the model ({_one_line(exc)})") from None
    return model.to(device).eval(), tokenizer, int(model.config.max_position_embeddings)


def load_our_checkpoint(load: str, device: str = "cpu", dtype: str = "fp32"):
    """(`Llama` with the checkpoint's weights, its maximum sequence length) from a checkpoint root
    (its latest iteration) or one `iter_*` directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from ..checkpoint.convert import _saved_model_config, find_checkpoint
    from ..checkpoint.reader import ShardReader
    from ..model import build_model

    ckpt = find_checkpoint(load)
    cfg = _saved_model_config(ckpt)
    # the rotary tables, buffers no checkpoint holds, are computed in fp32 as training keeps them
    model = build_model(cfg, device, initialise=False, dtype=DTYPES[dtype])
    try:
        # every weight comes from the checkpoint, copied into the model's dtype
        dcp.load(model.state_dict(), storage_reader=ShardReader(ckpt), no_dist=True)
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException only
        raise ModelLoadError(f"--load {ckpt}: cannot read the weights ({_one_line(exc)})") from None
    model.eval()
    return model, int(cfg.max_position_embeddings)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__
