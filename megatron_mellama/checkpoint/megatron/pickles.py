"""Read Megatron-LM's pickles (`common.pt`, `model_optim_rng.pt`, torch_dist's `.metadata`) without
running code from them.

A checkpoint downloaded from the internet is untrusted: unpickling may call any function it names.
`torch.load(weights_only=True)` builds only tensors, containers and the types on an allow-list:
- the types Megatron-LM stores beside the weights: argparse.Namespace (its args), numpy's RNG
  state (ndarray, dtype), io.BytesIO (Transformer Engine 1.x extra state), SimpleNamespace,
  PosixPath, signal.Signals;
- any name from Megatron's own modules (`megatron.*`: enums such as AttnBackend and ModelType,
  config dataclasses) becomes an inert `MegatronObject` that records its name and arguments: none
  of Megatron's code runs, and a checkpoint from another Megatron version, whose enums moved, reads
  the same.
Anything else is refused in one line naming it. torch_dist's `.metadata` (which PyTorch's own DCP
reader unpickles with no restriction) is read by a restricted unpickler allowing DCP's metadata
classes, torch.Size and dtypes, and plain containers.
"""

from __future__ import annotations

import argparse
import collections
import io
import pathlib
import pickle
import signal
import types

import numpy
import torch

from ..sources import ConvertError

_ALWAYS = [argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath, io.BytesIO, signal.Signals,
           numpy.ndarray, numpy.dtype, collections.OrderedDict]
_RECONSTRUCT_NAMES = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")


def _numpy_types() -> list:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    found = [(_reconstruct, name) for name in _RECONSTRUCT_NAMES]
    dtypes = getattr(numpy, "dtypes", None)  # numpy >= 1.25 pickles dtypes by their class
    if dtypes is not None:
        found += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return found


class MegatronObject:
    """Stands in for an object of one of Megatron's classes: its name, constructor arguments and state."""

    qualified_name = "megatron"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        value = self.args[0] if len(self.args) == 1 else self.args
        return f"<{self.qualified_name} {value!r}>"


def _placeholder(name: str):
    return (type(name.rsplit(".", 1)[-1], (MegatronObject,), {"qualified_name": name}), name)


def load(path: str, mmap: bool = False):
    """`torch.load` of a Megatron-LM pickle with the allow-list above; ConvertError if it names anything else."""
    allowed = _ALWAYS + _numpy_types()
    try:
        asked = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:
        raise ConvertError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    known = {getattr(a, "__module__", "") + "." + getattr(a, "__qualname__", "") for a in allowed if not isinstance(a, tuple)}
    known |= {a[1] for a in allowed if isinstance(a, tuple)}
    refused = [name for name in asked if name not in known and not name.startswith("megatron.")]
    if refused:
        raise ConvertError(f"{path}: its pickle asks for {refused[0]}"
                           + (f" (and {', '.join(refused[1:3])}{', ...' if len(refused) > 3 else ''})"
                              if len(refused) > 1 else "")
                           + ", which is not a type Megatron-LM stores; refusing to load it (unpickling may run code)")
    allowed += [_placeholder(name) for name in asked if name.startswith("megatron.")]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        raise ConvertError(f"{path}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                     "torch.distributed.checkpoint.planner")
_METADATA_BUILTINS = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                      ("builtins", "slice"), ("torch", "Size"), ("torch", "device"), ("pathlib", "PosixPath"),
                      # how torch pickles a torch.layout: a lookup in its table of layouts by name
                      ("torch.serialization", "_get_layout")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        obj = None
        if module in _METADATA_MODULES or (module, name) in _METADATA_BUILTINS:
            obj = super().find_class(module, name)
            # a class (a dataclass or an enum of DCP's metadata), never a function that could act
            if module in _METADATA_MODULES and not isinstance(obj, type):
                obj = None
        elif module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            obj = getattr(torch, name)
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return obj


def load_dcp_metadata(path: str):
    """torch_dist's `.metadata` (a pickled DCP Metadata), through the restricted unpickler."""
    try:
        with open(path, "rb") as fh:
            return _MetadataUnpickler(fh).load()
    except FileNotFoundError:
        raise ConvertError(f"{path}: no such file (not a torch_dist checkpoint)") from None
    except pickle.UnpicklingError as exc:
        raise ConvertError(f"{path}: its pickle asks for {exc}, which is not a type of PyTorch's checkpoint "
                           "metadata; refusing to load it (unpickling may run code)") from None
    except Exception as exc:
        raise ConvertError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
