"""The Megatron-LM checkpoint fixtures: each root holds the files and keys Megatron-LM's
save_checkpoint writes, the formats agree with each other, and a torch_dist root loads back
strictly into megatron-core with the reference logits."""

import io
import os

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.multiprocessing import ProcessExitedException

from megatron_checkpoints import megatron_logits, write_megatron_checkpoint

LAYERS, HIDDEN, FFN, QKV_ROWS = 4, 64, 96, 128  # 4 heads of 16 + 2 x 2 KV heads of 16


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
def dist_root(tmp_path_factory):
    return write_megatron_checkpoint(str(tmp_path_factory.mktemp("dist") / "megatron"), tp=2, pp=2)


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


@pytest.mark.slow
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
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.padded_vocab_size) == (2, 2, 128)
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
    assert tuple(meta["embedding.word_embeddings.weight"].size) == (128, HIDDEN)
    assert tuple(meta["output_layer.weight"].size) == (128, HIDDEN)
    assert tuple(meta["decoder.final_layernorm.weight"].size) == (HIDDEN,)
    for layer in range(LAYERS):
        assert f"decoder.layers.mlp.linear_fc2._extra_state/shard_{layer}_{LAYERS}" in meta
    assert {f"rng_state/shard_{p}.{t}_2.2" for p in (0, 1) for t in (0, 1)} <= set(meta)
    assert "optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight" in meta
    assert not any(k.startswith("decoder.layers.0.") or "input_layernorm" in k for k in meta)

    norms = global_tensors(it, ["decoder.layers.self_attention.linear_qkv.layer_norm_weight"])
    assert (norms["decoder.layers.self_attention.linear_qkv.layer_norm_weight"] - 1).abs().max() > 0.05


@pytest.mark.slow
def test_tp2_pp2_torch_dist_root_loads_back_with_the_reference_logits(dist_root):
    assert dist_root.logits.shape == (2, 16, 128)
    logits = megatron_logits(dist_root.iteration_dir, dist_root.tokens)
    assert rel_diff(logits, dist_root.logits) <= 1e-5


@pytest.mark.slow
def test_torch_root_at_tp2_pp2_holds_each_ranks_shard(tmp_path, dist_root):
    ckpt = write_megatron_checkpoint(str(tmp_path / "megatron"), fmt="torch", tp=2, pp=2)
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
def test_transformer_engine_names(tmp_path, extra_state):
    ckpt = write_megatron_checkpoint(str(tmp_path / "megatron"), fmt="torch", tp=2, names="te",
                                     extra_state=extra_state, epsilon_arg="norm_epsilon")
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
    assert model["embedding.word_embeddings.weight"].shape == (64, HIDDEN)  # half of 128 padded rows


@pytest.mark.slow
def test_virtual_pipeline_root_with_legacy_names(tmp_path, dist_root):
    ckpt = write_megatron_checkpoint(str(tmp_path / "megatron"), fmt="torch", pp=2, vp=2, names="legacy")
    assert rank_files(ckpt.iteration_dir) == ["mp_rank_00_000/model_optim_rng.pt", "mp_rank_00_001/model_optim_rng.pt"]
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
            qkv = lm["encoder"]["layers.0.self_attention.query_key_value.weight"]
            assert torch.equal(qkv, whole["decoder.layers.self_attention.linear_qkv.weight"][2 * chunk + p])
    first = torch.load(os.path.join(ckpt.iteration_dir, "mp_rank_00_000", "model_optim_rng.pt"), weights_only=False)
    assert first["model0"]["language_model"]["embedding"]["word_embeddings"]["weight"].shape == (112, HIDDEN)


def test_virtual_pipeline_root_with_megatron_core_names(tmp_path):
    ckpt = write_megatron_checkpoint(str(tmp_path / "megatron"), fmt="torch", pp=2, vp=2)
    state = torch.load(os.path.join(ckpt.iteration_dir, "mp_rank_00_001", "model_optim_rng.pt"), weights_only=False)
    assert sorted(k for k in state if k.startswith("model")) == ["model0", "model1"]
    assert [k for k in state["model1"] if ".layers." in k][0].startswith("decoder.layers.0.")
    assert "output_layer.weight" in state["model1"] and "output_layer.weight" not in state["model0"]


def test_invalid_combinations_are_refused(tmp_path):
    with pytest.raises(ValueError, match="torch_dist"):
        write_megatron_checkpoint(str(tmp_path), names="legacy")
    with pytest.raises(ValueError, match="vp"):
        write_megatron_checkpoint(str(tmp_path), fmt="torch", vp=2)
