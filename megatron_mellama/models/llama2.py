"""LLaMA2: the model of `model/llama.py`, laid out by `parallel/parallelize.py`."""

from __future__ import annotations

from ..model import Llama, materialise, meta_model
from ..model import flops, hf_format, meta_format
from ..parallel.parallelize import parallelize
from .spec import HFFormat, MetaFormat, ModelSpec, register

LLAMA2 = register(ModelSpec(
    name="llama2",
    model_class=Llama,
    meta_model=meta_model,
    materialise=materialise,
    parallelize=parallelize,
    hf=HFFormat(to_hf_name=hf_format.to_hf_name, from_hf_name=hf_format.from_hf_name,
                config_from_hf=hf_format.model_config_from_hf, config_to_hf=hf_format.hf_config_dict),
    meta=MetaFormat(to_ours=meta_format.meta_to_ours, skipped=meta_format.SKIPPED,
                    hf_config_from_params=meta_format.hf_config_from_params,
                    interleaved_to_half=meta_format.interleaved_to_half),
    parameter_count=flops.parameter_count,
    training_flops_per_token=flops.training_flops_per_token,
))
