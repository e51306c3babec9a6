"""Model families, each described once (`spec.py`): LLaMA2 (`llama2.py`)."""

from . import llama2  # noqa: F401  (registers the family)
from .spec import DEFAULT, HFFormat, MetaFormat, ModelSpec, model_spec, register

__all__ = ["DEFAULT", "HFFormat", "MetaFormat", "ModelSpec", "model_spec", "register"]
