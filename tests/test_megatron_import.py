"""Megatron-LM checkpoints written by megatron-core itself import exactly: transformers' logits of
the Hugging Face export equal megatron-core's own forward, for every format and layout a user may hold.

The roots are written once per test process (`shared_megatron_checkpoint`) and first checked to be
what Megatron-LM's save_checkpoint writes: the import's proof rests on them."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.multiprocessing import ProcessExitedException

from megatron_checkpoints import megatron_logits, shared_megatron_checkpoint, write_megatron_checkpoint
from megatron_mellama.checkpoint.megatron import pickles
from megatron_mellama.checkpoint.megatron.importer import open_source
from megatron_mellama.checkpoint.sources import ConvertError
from megatron_mellama.tools.megatron_to_mellama import main as megatron_to_mellama
from megatron_mellama.tools.mellama_to_hf import main as mellama_to_hf

VOCAB = 400  # the session's sentencepiece_model
LAYERS, HIDDEN, FFN, QKV_ROWS = 4, 64, 96, 128  # 4 heads of 16 + 2 x 2 KV heads of 16
# the roots the tests share (each written once per process)
DIST_TP2_PP2 = dict(fmt="torch_dist", tp=2, pp=2)
TORCH_TP2_PP2 = dict(fmt="torch", tp=2, pp=2)
TE = dict(fmt="torch", tp=2, names="te", epsilon_arg="norm_epsilon")
LEGACY_VP = dict(fmt="torch", tp=2, pp=2, vp=2, names="legacy")
MCORE_VP = dict(fmt="torch", pp=2, vp=2)


@pytest.fixture(scope="module")
def megatron_root(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("megatron"))
    return lambda **kwargs: shared_megatron_checkpoint(base, vocab_size=VOCAB, **kwargs)


# -- the roots are what Megatron-LM writes ------------------------------------------------------------
def rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def global_tensors(iteration_dir, keys):
    """Whole tensors of a torch_dist folder, read with torch's own reader."""
    metadata = FileSystemReader(iteration_dir).read_metadata().state_dict_metadata
    state = {k: torch.empty(metadata[k].size, dtype=metadata[k].properties.dtype) for k in keys}
    dcp_load(state, storage_reader=FileSystemReader(iteration_dir), no_dist=True)
    return state


def rank_files(iteration_dir):
    return sorted(os.path.relpath(os.path.join(d, f), iteration_dir) for d, _, fs in os.walk(iteration_dir) for f in fs)


@pytest.fixture(scope="module")
def dist_root(dist_tp2_pp2):
    return dist_tp2_pp2


@pytest.fixture(scope="module")
def tp1_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp1") / "megatron"
    return write_megatron_checkpoint(str(root), release=True,
                                     args_overrides={"normalization": "LayerNorm", "swiglu": False})


def test_tp1_torch_dist_root_loads_back_with_the_reference_logits(tp1_root):
    ckpt = tp1_root
    assert open(os.path.join(ckpt.root, "latest_checkpointed_iteration.txt")).read() == "release"
    assert ckpt.iteration_dir == os.path.join(ckpt.root, "release")
    assert ckpt.padded_vocab_size == 112 and ckpt.logits.shape == (2, 16, 112)
    assert ckpt.tokens.shape == (2, 16) and int(ckpt.tokens.max()) < 100
    assert ckpt.args.layernorm_epsilon == 1e-5 and not hasattr(ckpt.args, "norm_epsilon")
    saved = torch.load(os.path.join(ckpt.iteration_dir, "common.pt"), weights_only=False)["args"]
    assert (saved.normalization, saved.swiglu, saved.iteration) == ("LayerNorm", False, 0)
    logits = megatron_logits(ckpt.iteration_dir, ckpt.tokens)
    assert rel_diff(logits, ckpt.logits) <= 1e-5
    # the reference is not a trivial function of the tokens: other tokens give other logits
    assert rel_diff(megatron_logits(ckpt.iteration_dir, ckpt.tokens.flip(1)), ckpt.logits) > 0.1


def test_megatron_logits_refuses_a_checkpoint_without_every_key_the_model_asks_for(tp1_root):
    with pytest.raises(ProcessExitedException):  # a fifth layer, which the checkpoint does not hold
        megatron_logits(tp1_root.iteration_dir, tp1_root.tokens, num_layers=5)


def test_torch_dist_root_at_tp2_pp2_is_what_megatron_writes(dist_root):
    root, it = dist_root.root, dist_root.iteration_dir
    assert open(os.path.join(root, "latest_checkpointed_iteration.txt")).read() == "7"
    assert it == os.path.join(root, "iter_0000007")
    files = set(os.listdir(it))
    assert {".metadata", "common.pt", "metadata.json"} <= files
    assert any(f.startswith("__") and f.endswith(".distcp") for f in files)
    common = torch.load(os.path.join(it, "common.pt"), weights_only=False)
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 7
    assert common["content_metadata"] == {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    args = common["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.padded_vocab_size) == (2, 2, 416)
    assert args.ckpt_format == "torch_dist" and args.swiglu and args.normalization == "RMSNorm"

    meta = FileSystemReader(it).read_metadata().state_dict_metadata
    qkv = meta["decoder.layers.self_attention.linear_qkv.weight"]
    assert tuple(qkv.size) == (LAYERS, QKV_ROWS, HIDDEN)
    # one chunk per (layer, TP rank): each rank holds whole query groups
    assert sorted((tuple(c.offsets), tuple(c.sizes)) for c in qkv.chunks) == [
        ((layer, row, 0), (1, 64, HIDDEN)) for layer in range(LAYERS) for row in (0, 64)]
    fc1 = meta["decoder.layers.mlp.linear_fc1.weight"]
    # [all gate rows; all up rows], each TP rank's half of each
    assert tuple(fc1.size) == (LAYERS, 2 * FFN, HIDDEN)
    assert sorted((c.offsets[0], c.offsets[1], c.sizes[1]) for c in fc1.chunks) == [
        (layer, row, 48) for layer in range(LAYERS) for row in (0, 48, 96, 144)]
    for key in ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"):
        assert tuple(meta[f"decoder.layers.{key}"].size) == (LAYERS, HIDDEN)
    assert tuple(meta["embedding.word_embeddings.weight"].size) == (416, HIDDEN)
    assert tuple(meta["output_layer.weight"].size) == (416, HIDDEN)
    assert tuple(meta["decoder.final_layernorm.weight"].size) == (HIDDEN,)
    for layer in range(LAYERS):
        assert f"decoder.layers.mlp.linear_fc2._extra_state/shard_{layer}_{LAYERS}" in meta
    assert {f"rng_state/shard_{p}.{t}_2.2" for p in (0, 1) for t in (0, 1)} <= set(meta)
    assert "optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight" in meta
    assert not any(k.startswith("decoder.layers.0.") or "input_layernorm" in k for k in meta)

    norms = global_tensors(it, ["decoder.layers.self_attention.linear_qkv.layer_norm_weight"])
    assert (norms["decoder.layers.self_attention.linear_qkv.layer_norm_weight"] - 1).abs().max() > 0.05


def test_tp2_pp2_torch_dist_root_loads_back_with_the_reference_logits(dist_root):
    assert dist_root.logits.shape == (2, 16, 416)
    logits = megatron_logits(dist_root.iteration_dir, dist_root.tokens)
    assert rel_diff(logits, dist_root.logits) <= 1e-5


def test_torch_root_at_tp2_pp2_holds_each_ranks_shard(torch_tp2_pp2, dist_root):
    ckpt = torch_tp2_pp2
    assert torch.equal(ckpt.logits, dist_root.logits)
    assert rank_files(ckpt.iteration_dir) == [
        f"mp_rank_{t:02d}_{p:03d}/model_optim_rng.pt" for t in (0, 1) for p in (0, 1)]
    whole = global_tensors(dist_root.iteration_dir, ["decoder.layers.mlp.linear_fc1.weight",
                                                     "decoder.layers.self_attention.linear_qkv.weight"])
    for t in (0, 1):
        for p in (0, 1):
            state = torch.load(os.path.join(ckpt.iteration_dir, f"mp_rank_{t:02d}_{p:03d}", "model_optim_rng.pt"),
                               weights_only=False)
            assert set(state) == {"args", "checkpoint_version", "iteration", "model", "optimizer",
                                  "opt_param_scheduler", "rng_state", "num_floating_point_operations_so_far"}
            assert state["checkpoint_version"] == 3.0 and state["iteration"] == 7
            assert set(state["rng_state"][0]) == {"random_rng_state", "np_rng_state", "torch_rng_state",
                                                  "cuda_rng_state", "rng_tracker_states"}
            assert state["optimizer"]["state"] and state["optimizer"]["param_groups"][0]["lr"] == 3e-4
            model = state["model"]
            assert ("embedding.word_embeddings.weight" in model) == (p == 0)
            assert ("output_layer.weight" in model) == ("decoder.final_layernorm.weight" in model) == (p == 1)
            assert model["decoder.layers.0.self_attention.linear_qkv._extra_state"] is None
            assert "decoder.layers.2.input_layernorm.weight" not in model  # local layer numbers
            for local in (0, 1):
                layer = 2 * p + local
                fc1 = model[f"decoder.layers.{local}.mlp.linear_fc1.weight"]
                gate = whole["decoder.layers.mlp.linear_fc1.weight"][layer, 48 * t:48 * (t + 1)]
                up = whole["decoder.layers.mlp.linear_fc1.weight"][layer, FFN + 48 * t:FFN + 48 * (t + 1)]
                assert torch.equal(fc1, torch.cat([gate, up]))  # [gate_r; up_r]
                qkv = whole["decoder.layers.self_attention.linear_qkv.weight"][layer, 64 * t:64 * (t + 1)]
                assert torch.equal(model[f"decoder.layers.{local}.self_attention.linear_qkv.weight"], qkv)


TE_LAYER_KEYS = [
    "self_attention.core_attention._extra_state", "self_attention.linear_proj.weight",
    "self_attention.linear_proj._extra_state", "self_attention.linear_qkv.layer_norm_weight",
    "self_attention.linear_qkv.weight", "self_attention.linear_qkv._extra_state", "mlp.linear_fc1.layer_norm_weight",
    "mlp.linear_fc1.weight", "mlp.linear_fc1._extra_state", "mlp.linear_fc2.weight", "mlp.linear_fc2._extra_state"]


@pytest.mark.parametrize("extra_state", ["tensor", "bytesio"])
def test_transformer_engine_names(megatron_root, extra_state):
    ckpt = megatron_root(**TE, extra_state=extra_state)
    assert rank_files(ckpt.iteration_dir) == ["mp_rank_00/model_optim_rng.pt", "mp_rank_01/model_optim_rng.pt"]
    state = torch.load(os.path.join(ckpt.iteration_dir, "mp_rank_01", "model_optim_rng.pt"), weights_only=False)
    assert state["args"].transformer_impl == "transformer_engine" and state["args"].norm_epsilon == 1e-5
    model = state["model"]
    final = ["decoder.final_layernorm.weight"] + (["decoder.final_layernorm._extra_state"]
                                                  if extra_state == "tensor" else [])
    assert list(model) == (["embedding.word_embeddings.weight"]
                           + [f"decoder.layers.{n}.{k}" for n in range(LAYERS) for k in TE_LAYER_KEYS]
                           + final + ["output_layer.weight", "output_layer._extra_state"])
    extra = model["decoder.layers.3.self_attention.core_attention._extra_state"]
    if extra_state == "tensor":
        assert extra.dtype == torch.uint8 and extra.numel() == 0
    else:
        assert isinstance(extra, io.BytesIO) and torch.load(io.BytesIO(extra.getvalue())) is None
    assert model["output_layer._extra_state"] is None
    assert model["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (64, HIDDEN)
    assert model["embedding.word_embeddings.weight"].shape == (208, HIDDEN)  # half of 416 padded rows


def test_virtual_pipeline_root_with_legacy_names(megatron_root, dist_root):
    ckpt = megatron_root(**LEGACY_VP)
    assert rank_files(ckpt.iteration_dir) == [
        f"mp_rank_{t:02d}_{p:03d}/model_optim_rng.pt" for t in (0, 1) for p in (0, 1)]
    assert ckpt.args.virtual_pipeline_model_parallel_size == 2 and ckpt.args.num_layers_per_virtual_pipeline_stage == 1
    whole = global_tensors(dist_root.iteration_dir, ["decoder.layers.self_attention.linear_qkv.weight"])
    for p in (0, 1):
        state = torch.load(os.path.join(ckpt.iteration_dir, f"mp_rank_00_{p:03d}", "model_optim_rng.pt"),
                           weights_only=False)
        assert "model" not in state and {"model0", "model1"} <= set(state)
        for chunk in (0, 1):
            lm = state[f"model{chunk}"]["language_model"]
            first, last = (p, chunk) == (0, 0), (p, chunk) == (1, 1)
            assert ("embedding" in lm) == first and ("output_layer" in lm) == last
            assert list(lm["encoder"]) == [
                "layers.0.input_norm.weight", "layers.0.self_attention.query_key_value.weight",
                "layers.0.self_attention.query_key_value._extra_state", "layers.0.self_attention.dense.weight",
                "layers.0.self_attention.dense._extra_state", "layers.0.post_attention_norm.weight",
                "layers.0.mlp.dense_h_to_4h.weight", "layers.0.mlp.dense_h_to_4h._extra_state",
                "layers.0.mlp.dense_4h_to_h.weight", "layers.0.mlp.dense_4h_to_h._extra_state",
            ] + (["final_norm.weight"] if last else [])
            # virtual stage `chunk` of pipeline rank p holds global layer chunk * 2 + p
            # (tensor-parallel rank 0: the first half of the query groups)
            qkv = lm["encoder"]["layers.0.self_attention.query_key_value.weight"]
            assert torch.equal(qkv, whole["decoder.layers.self_attention.linear_qkv.weight"][2 * chunk + p, :64])
    first = torch.load(os.path.join(ckpt.iteration_dir, "mp_rank_00_000", "model_optim_rng.pt"), weights_only=False)
    assert first["model0"]["language_model"]["embedding"]["word_embeddings"]["weight"].shape == (208, HIDDEN)


def test_virtual_pipeline_root_with_megatron_core_names(megatron_root):
    ckpt = megatron_root(**MCORE_VP)
    state = torch.load(os.path.join(ckpt.iteration_dir, "mp_rank_00_001", "model_optim_rng.pt"), weights_only=False)
    assert sorted(k for k in state if k.startswith("model")) == ["model0", "model1"]
    assert [k for k in state["model1"] if ".layers." in k][0].startswith("decoder.layers.0.")
    assert "output_layer.weight" in state["model1"] and "output_layer.weight" not in state["model0"]


def test_invalid_combinations_are_refused(tmp_path):
    with pytest.raises(ValueError, match="torch_dist"):
        write_megatron_checkpoint(str(tmp_path), names="legacy")
    with pytest.raises(ValueError, match="vp"):
        write_megatron_checkpoint(str(tmp_path), fmt="torch", vp=2)


# -- the import ------------------------------------------------------------------------------------
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
def dist_tp2_pp2(megatron_root):
    return megatron_root(**DIST_TP2_PP2)


@pytest.fixture(scope="module")
def torch_tp2_pp2(megatron_root):
    return megatron_root(**TORCH_TP2_PP2)


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
    dict(TE, extra_state="tensor"), dict(TE, extra_state="bytesio"), LEGACY_VP, MCORE_VP,
    dict(fmt="torch_dist", tp=2, pp=2, vp=2, release=True, singleton_local_shards=True),
], ids=["te2-tp2-norm_epsilon", "te1-tp2", "legacy-tp2-pp2-vp2", "torch-vp2", "dist-tp2-pp2-vp2-release-singleton"])
def test_every_variant_imports_exactly(tmp_path, megatron_root, variant, sentencepiece_model):
    mc = megatron_root(**variant)
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
    dcp_only = tmp_path / "dcp" / "iter_0000001"
    dcp_only.mkdir(parents=True)
    (dcp_only / ".metadata").write_bytes(b"")
    assert megatron_to_mellama(["--load", str(dcp_only), "--save", str(tmp_path / "o")]) == 2
    assert "torch_dcp or fsdp_dtensor format" in capsys.readouterr().err
