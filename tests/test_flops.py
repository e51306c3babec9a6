"""Parameter counts of the presets and FLOPs per token, against the model itself."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megatron_mellama.config import parse_config
from megatron_mellama.model import build_model
from megatron_mellama.model.flops import forward_flops_per_token, parameter_count, training_flops_per_token
from megatron_mellama.model.llama import Llama


@pytest.mark.parametrize("preset,published_billions,exact", [
    ("llama2-7b", 6.74, 6_738_415_616),
    ("llama2-13b", 13.0, 13_015_864_320),
    ("llama2-70b", 69.0, 68_976_648_192),
])
def test_preset_parameter_counts_match_published_llama2(preset, published_billions, exact):
    cfg = parse_config(["--model", preset]).model
    assert parameter_count(cfg) == exact
    assert round(exact / 1e9, 2 if published_billions < 10 else 1) == published_billions
    with torch.device("meta"):  # the real module, without allocating 70B parameters
        model = Llama(cfg)
    assert sum(p.numel() for p in model.parameters()) == exact


def test_forward_flops_equal_counted_matmuls():
    cfg = parse_config(["--model", "tiny", "--vocab-size", "300", "--seq-length", "48"])
    model = build_model(cfg.model)
    batch, seq = 2, 48
    tokens = torch.randint(0, 300, (batch, seq))
    # the math backend runs attention as countable matmuls
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens)
    assert counter.get_total_flops() == forward_flops_per_token(cfg.model, seq) * batch * seq
    assert training_flops_per_token(cfg.model, seq) == 3 * forward_flops_per_token(cfg.model, seq)


def test_7b_flops_per_token_is_about_six_times_parameters():
    cfg = parse_config(["--model", "llama2-7b"]).model
    non_embedding = parameter_count(cfg) - cfg.padded_vocab_size * cfg.hidden_size
    attention = 12 * cfg.num_layers * 4096 * cfg.hidden_size
    assert training_flops_per_token(cfg, 4096) == pytest.approx(6 * non_embedding + attention, rel=1e-3)
