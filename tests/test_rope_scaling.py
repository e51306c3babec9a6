"""RoPE scaling (linear, llama3, YaRN): the flags, the tables, Hugging Face import and export, resume."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

from checkpoint_harness import copy_checkpoint, edit_train_state, load_with  # noqa: E402
from engine_harness import TINY  # noqa: E402
from megatron_mellama.model.hf_format import hf_config_dict, model_config_from_hf  # noqa: E402
from megatron_mellama.checkpoint.layout import CheckpointError  # noqa: E402
from megatron_mellama.checkpoint.manager import CheckpointManager  # noqa: E402
from megatron_mellama.config import ConfigError, parse_config  # noqa: E402
from megatron_mellama.model import rope  # noqa: E402
from megatron_mellama.tools.mellama_to_hf import main as mellama_to_hf  # noqa: E402
from megatron_mellama.training.engine import Engine  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

LENGTH = 4608  # past LLaMA2's 4096
SMALL = ["--model", "tiny", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--ffn-hidden-size", "96", "--vocab-size", "100", "--max-position-embeddings", str(LENGTH),
         "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1", "--lr", "1e-3",
         "--lr-decay-style", "constant", "--init-method-std", "0.2", "--seed", "5"]
KINDS = {
    "default": [],
    "linear": ["--rotary-seq-len-interpolation-factor", "2"],
    "llama3": ["--use-rope-scaling", "--rope-scaling-factor", "4", "--rope-scaling-original-max-position-embeddings",
               "2048"],
    "yarn": ["--position-embedding-type", "yarn", "--yarn-rotary-scaling-factor", "2.25",
             "--yarn-original-max-position-embeddings", "2048"],
    # Megatron-LM's mscale with mscale_all_dim 0, which transformers' own rule would ignore
    "yarn-mscale": ["--position-embedding-type", "yarn", "--yarn-rotary-scaling-factor", "2.25",
                    "--yarn-original-max-position-embeddings", "2048", "--yarn-mscale", "0.707",
                    "--yarn-beta-fast", "16", "--yarn-beta-slow", "2"],
}


def _hf_tables(hf_config):
    cos, sin = LlamaRotaryEmbedding(hf_config)(torch.zeros(1), torch.arange(hf_config.max_position_embeddings)[None])
    return cos[0], sin[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_exported_model_computes_transformers_logits_past_4096(kind, tmp_path):
    root, out = str(tmp_path / "ours"), str(tmp_path / "hf")
    cfg = parse_config(SMALL + KINDS[kind] + ["--save", root])
    engine = Engine(cfg)
    CheckpointManager(cfg, engine).save(1, 1)
    assert mellama_to_hf(["--load", root, "--hf-dir", out, "--no-progress"]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="sdpa").float().eval()
    tokens = torch.randint(0, 100, (1, 4500), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = engine.modules[0](tokens)[0, 4096:]
        theirs = hf(input_ids=tokens).logits[0, 4096:]
        diff = (ours - theirs).abs().max().item()
        print(f"{kind}: max |ours - transformers| past position 4096 = {diff:.3g}")
        assert diff <= 1e-5
        if kind != "default":  # the comparison sees the scaling: plain RoPE is far off
            plain = hf.config.to_dict()
            plain["rope_parameters"] = dict(rope_type="default", rope_theta=plain["rope_parameters"]["rope_theta"])
            hf.model.rotary_emb = LlamaRotaryEmbedding(transformers.LlamaConfig(**plain))
            assert (ours - hf(input_ids=tokens).logits[0, 4096:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("kind", list(KINDS))
def test_flags_hf_config_and_back_give_the_same_tables(kind):
    cfg = parse_config(SMALL + KINDS[kind]).model
    hf_config = transformers.LlamaConfig(**hf_config_dict(cfg))
    back = model_config_from_hf(hf_config.to_dict())
    assert rope.describe(back) == rope.describe(cfg)
    for ours, theirs in zip(rope.rotary_tables(cfg), _hf_tables(hf_config)):
        assert torch.equal(ours, theirs)


HF_ROPE = {
    # as released configs write them: transformers 4's rope_scaling ("type" or "rope_type") and 5's rope_parameters
    "linear-v4": dict(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 2.0}),
    "llama3.1": dict(rope_theta=500000.0, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 1024,
                                                        "rope_type": "llama3"}),
    "yarn-qwen": dict(rope_theta=1000000.0, rope_scaling={"type": "yarn", "factor": 4.5,
                                                          "original_max_position_embeddings": 1024}),
    "yarn-deepseek": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.707,
                                           "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1,
                                           "original_max_position_embeddings": 1152}),
    "yarn-mscale-ignored": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.5,
                                                 "mscale": 0.5, "original_max_position_embeddings": 1024}),
    "yarn-no-factor": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": None,
                                            "original_max_position_embeddings": 1024}),
}
SHAPE = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
             vocab_size=100, max_position_embeddings=LENGTH, tie_word_embeddings=False)


@pytest.mark.parametrize("name", list(HF_ROPE))
def test_hf_rope_imports_to_the_same_tables(name):
    raw = dict(SHAPE, **HF_ROPE[name])
    cfg = model_config_from_hf(raw)
    assert rope.kind(cfg) == name.split("-")[0].replace("llama3.1", "llama3")
    for ours, theirs in zip(rope.rotary_tables(cfg), _hf_tables(transformers.LlamaConfig(**raw))):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("rope_field,want", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type is 'dynamic'"),
    ({"rope_scaling": {"type": "su", "short_factor": [1.0], "long_factor": [1.0]}}, "rope_scaling.rope_type is 'su'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_parameters.rope_type is 'longrope'"),
    ({"rope_scaling": {"type": "mrope", "mrope_section": [2, 2]}}, "rope_scaling.rope_type is 'mrope'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0}},
     "rope_scaling.low_freq_factor is 1.0"),
    ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling.factor is None"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                          "truncate": False}}, "rope_parameters.truncate is False"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                          "attention_factor": 1.0}}, "rope_parameters.attention_factor is 1.0"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0},
      "rope_parameters": {"rope_type": "linear", "factor": 4.0}}, "rope_parameters is "),
    ({"rope_scaling": "linear"}, "rope_scaling is 'linear'"),
])
def test_rope_the_model_cannot_compute_is_refused_in_one_line(rope_field, want):
    with pytest.raises(ValueError) as err:
        model_config_from_hf(dict(SHAPE, **rope_field))
    assert want in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("flags,want", [
    (["--use-rope-scaling", "--rotary-seq-len-interpolation-factor", "2"],
     "--use-rope-scaling and --rotary-seq-len-interpolation-factor: choose one RoPE scaling"),
    (["--rotary-seq-len-interpolation-factor", "0"], "--rotary-seq-len-interpolation-factor must be positive, got 0"),
    (["--use-rope-scaling", "--rope-scaling-factor", "-1"], "--rope-scaling-factor must be positive, got -1.0"),
    (["--use-rope-scaling", "--rope-scaling-high-freq-factor", "1"],
     "--rope-scaling-high-freq-factor 1.0 must exceed --rope-scaling-low-freq-factor 1.0"),
    (["--position-embedding-type", "yarn"], "--position-embedding-type yarn needs --yarn-rotary-scaling-factor"),
    (["--position-embedding-type", "yarn", "--yarn-rotary-scaling-factor", "0"],
     "--yarn-rotary-scaling-factor must be positive"),
    (["--position-embedding-type", "yarn", "--yarn-rotary-scaling-factor", "2", "--yarn-beta-slow", "0"],
     "--yarn-beta-slow must be positive"),
    (["--position-embedding-type", "learned_absolute"], "invalid choice: 'learned_absolute'"),
])
def test_bad_rope_flags_are_one_line(flags, want):
    with pytest.raises(ConfigError) as err:
        parse_config(SMALL + flags)
    assert want in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def linear_checkpoint(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("linear"))
    cfg = parse_config(TINY + ["--rotary-seq-len-interpolation-factor", "2", "--save", root])
    CheckpointManager(cfg, Engine(cfg)).save(1, 8)
    return root


@pytest.mark.slow
def test_resume_with_another_rope_scaling_is_refused_in_one_line(linear_checkpoint, tmp_path):
    assert load_with(["--load", linear_checkpoint, "--rotary-seq-len-interpolation-factor", "2"])["iteration"] == 1
    for flags, ours in ((["--rotary-seq-len-interpolation-factor", "4"], "--rotary-seq-len-interpolation-factor 4.0"),
                        ([], "none"),
                        (["--position-embedding-type", "yarn", "--yarn-rotary-scaling-factor", "2"],
                         "--position-embedding-type yarn --yarn-rotary-scaling-factor 2.0")):
        with pytest.raises(CheckpointError) as err:
            load_with(["--load", linear_checkpoint] + flags)
        assert f"RoPE scaling {ours} " in str(err.value) and "\n" not in str(err.value)
        assert "but the checkpoint has --rotary-seq-len-interpolation-factor 2.0" in str(err.value)
    with pytest.raises(CheckpointError, match="RoPE scaling --rotary-seq-len-interpolation-factor 4.0 but"):
        load_with(["--load", linear_checkpoint, "--finetune", "--rotary-seq-len-interpolation-factor", "4"])
    # a checkpoint from before RoPE scaling was recorded computed plain RoPE
    root = copy_checkpoint(linear_checkpoint, tmp_path / "old")

    def forget(state):
        for key in [k for k in state["config"]["model"] if k.startswith(("position", "use_rope", "rope", "rotary_seq",
                                                                           "yarn"))]:
            del state["config"]["model"][key]

    edit_train_state(root, 1, forget)
    assert load_with(["--load", root])["iteration"] == 1
    with pytest.raises(CheckpointError, match="but the checkpoint has none"):
        load_with(["--load", root, "--rotary-seq-len-interpolation-factor", "2"])


def test_tables_in_a_compute_dtype_are_converted_once_and_again_after_a_write():
    cos, sin = rope.rotary_tables(parse_config(SMALL).model)
    first = rope.tables_in(cos, sin, torch.bfloat16)
    assert first[0].dtype == first[1].dtype == torch.bfloat16
    again = rope.tables_in(cos, sin, torch.bfloat16)
    assert again[0] is first[0] and again[1] is first[1]  # every layer and micro-batch: the same tensors
    assert rope.tables_in(cos, sin, torch.float32) == (cos, sin)
    with torch.inference_mode():
        inference = rope.tables_in(cos, sin, torch.bfloat16)[0]
    # what inference mode made (which cannot be saved for backward) stays there
    assert inference.is_inference() and not first[0].is_inference()
    assert rope.tables_in(cos, sin, torch.bfloat16)[0] is first[0]
    with torch.no_grad():
        cos.mul_(2)
    rewritten = rope.tables_in(cos, sin, torch.bfloat16)
    assert rewritten[0] is not first[0]
    torch.testing.assert_close(rewritten[0], cos.bfloat16())
