"""The LLaMA2 model and its cost model."""

from .llama import Llama, build_model

__all__ = ["Llama", "build_model"]
