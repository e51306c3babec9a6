"""Megatron-LM checkpoints written by megatron-core itself import exactly: transformers' logits of
the Hugging Face export equal megatron-core's own forward, for every format and layout a user may hold."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from megatron_checkpoints import write_megatron_checkpoint
from megatron_mellama.checkpoint.megatron import pickles
from megatron_mellama.checkpoint.megatron.importer import open_source
from megatron_mellama.checkpoint.sources import ConvertError
from megatron_mellama.tools.megatron_to_mellama import main as megatron_to_mellama
from megatron_mellama.tools.mellama_to_hf import main as mellama_to_hf

VOCAB = 400  # the session's sentencepiece_model


def hf_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


def import_and_export(tmp_path, mc, *extra) -> torch.Tensor:
    """Megatron root -> ours -> Hugging Face; transformers' logits on the checkpoint's tokens."""
    ours, hf = str(tmp_path / "ours"), str(tmp_path / "hf")
    assert megatron_to_mellama(["--load", mc.root, "--save", ours, "--no-progress", *extra]) == 0
    assert mellama_to_hf(["--load", ours, "--hf-dir", hf, "--no-progress"]) == 0
    return hf_logits(hf, mc.tokens)


def assert_same_logits(ours: torch.Tensor, mc) -> None:
    want = mc.logits[..., :ours.shape[-1]]
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.fixture(scope="module")
def dist_tp2_pp2(tmp_path_factory):
    return write_megatron_checkpoint(str(tmp_path_factory.mktemp("mc") / "root"), fmt="torch_dist", tp=2, pp=2,
                                     vocab_size=VOCAB)


@pytest.fixture(scope="module")
def torch_tp2_pp2(tmp_path_factory):
    return write_megatron_checkpoint(str(tmp_path_factory.mktemp("mc") / "root"), fmt="torch", tp=2, pp=2,
                                     vocab_size=VOCAB)


def test_torch_dist_tp2_pp2_imports_exactly(tmp_path, dist_tp2_pp2, sentencepiece_model, capsys):
    logits = import_and_export(tmp_path, dist_tp2_pp2, "--tokenizer-model", sentencepiece_model)
    assert logits.shape[-1] == VOCAB < dist_tp2_pp2.padded_vocab_size
    assert_same_logits(logits, dist_tp2_pp2)
    assert f"{dist_tp2_pp2.padded_vocab_size - VOCAB} rows of Megatron-LM's padding dropped" in capsys.readouterr().out


def test_torch_format_tp2_pp2_imports_exactly(tmp_path, torch_tp2_pp2, sentencepiece_model):
    assert_same_logits(import_and_export(tmp_path, torch_tp2_pp2, "--tokenizer-model", sentencepiece_model),
                       torch_tp2_pp2)


def test_without_a_tokenizer_every_padded_row_is_kept(tmp_path, dist_tp2_pp2, capsys):
    logits = import_and_export(tmp_path, dist_tp2_pp2)
    assert logits.shape[-1] == dist_tp2_pp2.padded_vocab_size
    assert_same_logits(logits, dist_tp2_pp2)
    assert "padding included" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("variant", [
    dict(fmt="torch", tp=2, pp=1, names="te", extra_state="tensor"),
    dict(fmt="torch", tp=1, pp=2, names="te", extra_state="bytesio", epsilon_arg="norm_epsilon"),
    dict(fmt="torch", tp=2, pp=1, names="legacy"),
    dict(fmt="torch", tp=1, pp=2, vp=2),
    dict(fmt="torch_dist", tp=1, pp=2, vp=2, release=True),
    dict(fmt="torch_dist", tp=2, pp=1, singleton_local_shards=True),
], ids=["te-tp2", "te1-pp2-norm_epsilon", "legacy-tp2", "torch-vp2", "dist-vp2-release", "dist-singleton-tp2"])
def test_every_variant_imports_exactly(tmp_path, variant, sentencepiece_model):
    mc = write_megatron_checkpoint(str(tmp_path / "root"), vocab_size=VOCAB, **variant)
    if variant.get("singleton_local_shards"):  # per-layer keys, fc1 as two halves
        keys = pickles.load_dcp_metadata(os.path.join(mc.iteration_dir, ".metadata")).state_dict_metadata
        assert "decoder.layers.1.mlp.linear_fc1.weight_w" in keys and "decoder.layers.mlp.linear_fc1.weight" not in keys
    assert_same_logits(import_and_export(tmp_path, mc, "--tokenizer-model", sentencepiece_model), mc)


def test_the_args_tokenizer_is_used_when_it_exists_here(tmp_path, sentencepiece_model, capsys):
    mc = write_megatron_checkpoint(str(tmp_path / "root"), fmt="torch", vocab_size=VOCAB,
                                   args_overrides=dict(tokenizer_model=sentencepiece_model))
    logits = import_and_export(tmp_path, mc)
    assert logits.shape[-1] == VOCAB
    assert_same_logits(logits, mc)
    assert f"tokenizer: {sentencepiece_model} (the checkpoint's args.tokenizer_model)" in capsys.readouterr().out


def test_streaming_reads_one_layer_of_a_stacked_tensor(dist_tp2_pp2):
    source = open_source(dist_tp2_pp2.root, tokenizer_model=None, say=lambda _: None)
    q = source.load("layers.1.self_attn.q_proj.weight")
    k = source.load("layers.1.self_attn.k_proj.weight")  # the same fused QKV: not read again
    a = dist_tp2_pp2.args
    qkv_layer_bytes = (a.num_attention_heads + 2 * a.num_query_groups) * a.kv_channels * a.hidden_size * 4
    assert source._reader.bytes_read == qkv_layer_bytes
    assert q.shape == (a.num_attention_heads * a.kv_channels, a.hidden_size) and k.shape[0] == 2 * a.kv_channels


@pytest.mark.parametrize("field,value,says", [
    ("normalization", "LayerNorm", "args.normalization is 'LayerNorm'"),
    ("swiglu", False, "args.swiglu is False"),
    ("untie_embeddings_and_output_weights", False, "not tied"),
    ("add_bias_linear", True, "no biases"),
    ("position_embedding_type", "learned_absolute", "learned or no position embeddings"),
    ("num_experts", 8, "mixture-of-experts"),
])
def test_a_model_this_llama_cannot_represent_is_refused_before_writing(tmp_path, dist_tp2_pp2, field, value, says,
                                                                      capsys):
    common = os.path.join(dist_tp2_pp2.iteration_dir, "common.pt")
    state = torch.load(common, weights_only=False)
    setattr(state["args"], field, value)
    root = tmp_path / "edited"
    iteration = root / "iter_0000007"
    iteration.mkdir(parents=True)
    for entry in os.listdir(dist_tp2_pp2.iteration_dir):
        if entry != "common.pt":
            os.symlink(os.path.join(dist_tp2_pp2.iteration_dir, entry), iteration / entry)
    torch.save(state, iteration / "common.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("7")
    save = tmp_path / "ours"
    assert megatron_to_mellama(["--load", str(root), "--save", str(save), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not save.exists()


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo ran",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, torch_tp2_pp2):
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"args": _RunsCode()}, path)
    with pytest.raises(ConvertError, match=r"asks for (posix|os)\.system, which is not a type Megatron-LM stores"):
        pickles.load(str(path))
    meta = tmp_path / ".metadata"
    meta.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(ConvertError, match="not a type of PyTorch's checkpoint metadata"):
        pickles.load_dcp_metadata(str(meta))


def test_megatron_enums_are_read_as_inert_placeholders(tmp_path):
    import argparse

    from megatron.core.transformer.enums import AttnBackend

    path = tmp_path / "common.pt"
    torch.save({"args": argparse.Namespace(attention_backend=AttnBackend.flash)}, path)
    args = pickles.load(str(path))["args"]
    assert "flash" in repr(args.attention_backend) or args.attention_backend == AttnBackend.flash


def test_the_wrong_tokenizer_is_refused(tmp_path, dist_tp2_pp2, capsys):
    import sentencepiece as spm

    other = tmp_path / "small"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c d e f g h"] * 50), model_prefix=str(other),
                                   vocab_size=40, hard_vocab_limit=False, minloglevel=2)
    assert megatron_to_mellama(["--load", dist_tp2_pp2.root, "--save", str(tmp_path / "o"),
                                "--tokenizer-model", f"{other}.model"]) == 2
    assert "not this model's tokenizer" in capsys.readouterr().err


def test_missing_rank_file_and_bad_root_are_one_line(tmp_path, torch_tp2_pp2, capsys):
    assert megatron_to_mellama(["--load", str(tmp_path / "none"), "--save", str(tmp_path / "o")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert megatron_to_mellama(["--load", torch_tp2_pp2.root, "--save", str(tmp_path / "o"), "--iteration", "3"]) == 2
    assert "--iteration 3" in capsys.readouterr().err
