"""The model description: every consumer reaches LLaMA2 through `models.model_spec()`."""

import pytest
import torch

from megatron_mellama.config import ModelConfig
from megatron_mellama.model import Llama
from megatron_mellama.model.flops import parameter_count
from megatron_mellama.models import ModelSpec, model_spec, register


def _tiny() -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, vocab_size=96,
                       max_position_embeddings=64)


def test_llama2_is_the_default_family_and_builds_on_meta():
    spec = model_spec()
    assert spec.name == "llama2" and spec.model_class is Llama
    model = spec.meta_model(_tiny())
    assert isinstance(model, Llama) and all(p.device.type == "meta" for p in model.parameters())
    assert spec.parameter_count(_tiny()) == parameter_count(_tiny())


def test_hf_names_and_config_round_trip_through_the_description():
    spec = model_spec()
    names = list(spec.meta_model(_tiny()).state_dict())
    assert [spec.hf.from_hf_name(spec.hf.to_hf_name(n)) for n in names] == names
    assert "model.layers.0.self_attn.q_proj.weight" in {spec.hf.to_hf_name(n) for n in names}
    cfg = spec.hf.config_from_hf(spec.hf.config_to_hf(_tiny()))
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_size) == (2, 64, 128)
    with pytest.raises(KeyError):
        spec.hf.from_hf_name("transformer.h.0.attn.c_attn.weight")


def test_meta_names_map_to_ours():
    spec = model_spec()
    assert spec.meta.to_ours("layers.1.attention.wq.weight")[0] == "layers.1.self_attn.q_proj.weight"
    w = torch.arange(4 * 8 * 2, dtype=torch.float32).reshape(4 * 8, 2)
    assert spec.meta.interleaved_to_half(w, 4).shape == w.shape


def test_unknown_and_duplicate_families_are_refused():
    with pytest.raises(KeyError, match="no model family 'llama9'.*llama2"):
        model_spec("llama9")
    with pytest.raises(ValueError, match="registered twice"):
        register(ModelSpec(**{**model_spec().__dict__}))
