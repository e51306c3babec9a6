"""The LLaMA2 model, how it is built and initialised, and its cost model."""

from .build import build_model, materialise, meta_model
from .llama import Llama

__all__ = ["Llama", "build_model", "materialise", "meta_model"]
