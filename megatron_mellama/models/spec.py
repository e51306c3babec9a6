"""A model family's description: what the engine, the converters and the reports need to know of it.

The package around a model never names the model's classes or name maps itself: the engine builds
and parallelises it, the converters translate its weights from and to Hugging Face's and Meta's
formats, and the start-up report and throughput log count its parameters and FLOPs, each through
the family's `ModelSpec` (as torchtitan's TrainSpec). A new family (say, LLaMA-3-style tied
embeddings or another RoPE) is a model file, its name maps, and one `ModelSpec` registered beside
`llama2.py` (`docs/extending.md`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..config import ModelConfig


@dataclass(frozen=True)
class HFFormat:
    """Hugging Face's names and config.json for this family's weights."""
    to_hf_name: Callable[[str], str]
    from_hf_name: Callable[[str], str]  # KeyError for a name the family does not have
    config_from_hf: Callable[[dict], ModelConfig]  # refuses, by field, what the family cannot represent
    config_to_hf: Callable[[ModelConfig], dict]


@dataclass(frozen=True)
class MetaFormat:
    """Meta's original release format (`params.json` + `consolidated.NN.pth`)."""
    to_ours: Callable[[str], tuple]  # Meta name -> (our name, the dim its shards are concatenated on)
    skipped: tuple  # Meta names that hold no weight (buffers)
    hf_config_from_params: Callable[[dict, int], dict]
    interleaved_to_half: Callable  # q/k rows from Meta's interleaved RoPE to rotate-half


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_class: type[nn.Module]
    meta_model: Callable[[ModelConfig], nn.Module]  # shapes only, on the meta device
    materialise: Callable  # memory and (unless a checkpoint supplies them) initial values, in place
    parallelize: Callable  # the run's layout applied to a meta model: this rank's (stage, part) list
    hf: HFFormat
    meta: MetaFormat
    parameter_count: Callable[..., int]
    training_flops_per_token: Callable[[ModelConfig, int], int]


_SPECS: dict[str, ModelSpec] = {}
# every preset and every imported checkpoint is LLaMA2 today; a second family adds the config
# field that chooses it
DEFAULT = "llama2"


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _SPECS:
        raise ValueError(f"model family '{spec.name}' is registered twice")
    _SPECS[spec.name] = spec
    return spec


def model_spec(name: str = DEFAULT) -> ModelSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise KeyError(f"no model family '{name}' (registered: {', '.join(sorted(_SPECS))})") from None
