"""Export to Megatron-LM, judged by megatron-core itself: our checkpoint written as torch_dist loads
strictly into megatron-core's GPTModel at TP1, TP2 and PP2 (megatron reshards it) and computes our
logits; the torch format's rank files load strictly into the matching ranks' models and assemble to
our logits; the Transformer Engine names match megatron-core's TE spec; bad inputs fail in one line."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

transformers = pytest.importorskip("transformers")
pytest.importorskip("megatron.core")

from engine_harness import spawn_gloo  # noqa: E402
from megatron_checkpoints import (NON_MODEL_KEYS, build_model, forward_logits, load_model_strictly,  # noqa: E402
                                  megatron_cpu)

from megatron_mellama.checkpoint.megatron.export_dist import extra_state_keys  # noqa: E402
from megatron_mellama.checkpoint.megatron.export_torch import rank_names  # noqa: E402
from megatron_mellama.checkpoint.megatron.layouts import merge_tp  # noqa: E402
from megatron_mellama.checkpoint.megatron.names import canonical  # noqa: E402
from megatron_mellama.tools.hf_to_mellama import main as hf_to_mellama  # noqa: E402
from megatron_mellama.tools.mellama_to_megatron import main as mellama_to_megatron  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAYERS, VOCAB = 2, 101  # 101 pads to 128 at TP1 and to 256 at TP2 (divisible by 128 x TP)
HF = dict(num_hidden_layers=LAYERS, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
          intermediate_size=96, vocab_size=VOCAB, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=64)
# the keys megatron-core's TE spec asks for that a local-spec model without Transformer Engine does not
TE_ONLY = ("decoder.layers.self_attention.core_attention._extra_state", "decoder.final_layernorm._extra_state")


def spec(padded_vocab_size: int) -> dict:
    """megatron_checkpoints.build_model's description of the model HF describes."""
    return dict(num_layers=LAYERS, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                norm_epsilon=1e-5, padded_vocab_size=padded_vocab_size, max_position_embeddings=64, rotary_base=10000)


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Our checkpoint (GQA, a vocabulary that needs padding, norms away from one), its logits on `tokens`."""
    from megatron_mellama.model import build_model as build_ours
    from megatron_mellama.model.hf_format import model_config_from_hf

    tmp = tmp_path_factory.mktemp("ours")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(tie_word_embeddings=False, attn_implementation="eager", initializer_range=0.1, **HF)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp / "hf")
    assert hf_to_mellama(["--hf-dir", str(tmp / "hf"), "--save", str(tmp / "ckpt"), "--no-progress"]) == 0
    model = build_ours(model_config_from_hf(cfg.to_dict()), seed=1)
    state = {k: torch.empty_like(v) for k, v in model.state_dict().items()}
    dcp.load(state, checkpoint_id=str(tmp / "ckpt" / "iter_0000000"), no_dist=True)
    model.load_state_dict(state, strict=True)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(tokens).float()[..., :VOCAB]
    return dict(root=str(tmp / "ckpt"), tokens=tokens, logits=logits, tmp=tmp)


def export(ours, name, *flags):
    out = str(ours["tmp"] / name)
    assert mellama_to_megatron(["--load", ours["root"], "--save", out, "--no-progress", *flags]) == 0
    return out


def assert_logits(got: torch.Tensor, ours) -> None:
    assert got.shape[-1] > VOCAB  # megatron's padded vocabulary
    got = got[..., :VOCAB]
    torch.testing.assert_close(got, ours["logits"], rtol=1e-5, atol=1e-5)


# -- torch_dist ------------------------------------------------------------------------------------
def _dist_rank(rank: int, world: int, iteration_dir: str, tokens: list) -> dict:
    """TP1 (each rank a replica) logits, then TP2 logits (each rank its vocabulary shard), then PP2
    (each stage's parameters), every model loaded strictly from the same torch_dist folder."""
    from megatron.core import parallel_state as ps

    tokens = torch.tensor(tokens)
    out = {}
    with megatron_cpu():
        for tp, pp in ((1, 1), (2, 1), (1, 2)):
            ps.initialize_model_parallel(tp, pp)
            try:
                model = build_model(spec(128 * tp), tp, pp, pre_process=ps.is_pipeline_first_stage(),
                                    post_process=ps.is_pipeline_last_stage())
                load_model_strictly([model], iteration_dir, allow_missing=NON_MODEL_KEYS + TE_ONLY)
                if pp == 1:
                    out[f"tp{tp}"] = forward_logits(model, tokens)
                else:
                    out["pp_state"] = {k: v.clone() for k, v in model.state_dict().items() if v is not None}
            finally:
                ps.destroy_model_parallel()
    return out


def test_torch_dist_loads_strictly_and_reshards_to_our_logits(ours, tmp_path):
    root = export(ours, "dist", "--tensor-model-parallel-size", "1")
    assert (Path(root) / "latest_checkpointed_iteration.txt").read_text() == "0"
    iteration_dir = os.path.join(root, "iter_0000000")
    assert sorted(os.listdir(iteration_dir))[:3] == [".metadata", "__0_0.distcp", "__0_1.distcp"]
    common = torch.load(os.path.join(iteration_dir, "common.pt"), weights_only=False)
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0
    assert common["content_metadata"] == {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    assert common["args"].padded_vocab_size == 128 and common["args"].num_query_groups == 2
    whole_metadata = dcp.FileSystemReader(iteration_dir).read_metadata()
    # the final folder, as a str (as megatron-core records it), not the staging folder
    assert whole_metadata.storage_meta.checkpoint_id == os.path.abspath(iteration_dir)
    metadata = whole_metadata.state_dict_metadata
    qkv = metadata["decoder.layers.self_attention.linear_qkv.weight"]
    assert list(qkv.size) == [LAYERS, 128, 64] and len(qkv.chunks) == LAYERS  # one chunk per layer
    assert list(metadata["embedding.word_embeddings.weight"].size) == [128, 64]

    ranks = spawn_gloo(_dist_rank, 2, (os.path.abspath(iteration_dir), ours["tokens"].tolist()), str(tmp_path))
    assert_logits(ranks[0]["tp1"], ours)
    # TP2: each rank computes its half of the (256-row) padded vocabulary
    assert_logits(torch.cat([r["tp2"] for r in ranks], dim=-1), ours)
    # PP2: stage p holds layer p as its layer 0; the TP1 PP1 model's tensors, exactly
    whole = _tp1_state(iteration_dir)
    for stage, r in enumerate(ranks):
        for key, value in r["pp_state"].items():
            global_key = key.replace("decoder.layers.0.", f"decoder.layers.{stage}.")
            assert torch.equal(value, whole[global_key]), (stage, key)
        assert ("embedding.word_embeddings.weight" in r["pp_state"]) == (stage == 0)
        assert ("output_layer.weight" in r["pp_state"]) == (stage == 1)


def _tp1_state(iteration_dir: str) -> dict:
    """The TP1 PP1 model's tensors, in megatron-core's state-dict names, straight from the DCP files."""
    metadata = dcp.FileSystemReader(iteration_dir).read_metadata().state_dict_metadata
    stored = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
              for k, v in metadata.items() if hasattr(v, "size")}
    dcp.load(stored, checkpoint_id=iteration_dir, no_dist=True)
    local = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
    out = {}
    for key, value in stored.items():
        if key.startswith("decoder.layers."):
            rest = key[len("decoder.layers."):]
            for layer in range(LAYERS):
                out[f"decoder.layers.{layer}.{local.get(rest, rest)}"] = value[layer]
        else:
            out[key] = value
    return out


def _missing_extra_state_rank(rank: int, world: int, iteration_dir: str) -> str:
    from megatron.core import parallel_state as ps

    with megatron_cpu():
        ps.initialize_model_parallel(1, 1)
        try:
            load_model_strictly([build_model(spec(128))], iteration_dir, allow_missing=NON_MODEL_KEYS + TE_ONLY)
        except BaseException as exc:  # DCP's CheckpointException is a BaseException only
            return f"{type(exc).__name__}: {exc}"
        finally:
            ps.destroy_model_parallel()
    return "loaded"


def test_a_missing_extra_state_is_caught(ours, tmp_path):
    """The check above would notice an `_extra_state` megatron-core asks for that the export lacks."""
    import pickle

    root = export(ours, "dist-missing", "--tensor-model-parallel-size", "1")
    iteration_dir = os.path.join(root, "iter_0000000")
    path = os.path.join(iteration_dir, ".metadata")
    with open(path, "rb") as fh:
        metadata = pickle.load(fh)
    gone = "decoder.layers.mlp.linear_fc2._extra_state/shard_1_2"
    del metadata.state_dict_metadata[gone]
    with open(path, "wb") as fh:
        pickle.dump(metadata, fh)
    result = spawn_gloo(_missing_extra_state_rank, 1, (os.path.abspath(iteration_dir),), str(tmp_path))[0]
    assert result != "loaded" and gone in result


def test_extra_state_items_are_megatron_cores_empty_ones(ours):
    root = export(ours, "dist-extra", "--tensor-model-parallel-size", "2", "--transformer-impl", "local")
    iteration_dir = os.path.join(root, "iter_0000000")
    metadata = dcp.FileSystemReader(iteration_dir).read_metadata()
    byte_items = sorted(k for k, v in metadata.state_dict_metadata.items() if not hasattr(v, "size"))
    assert byte_items == sorted(extra_state_keys(LAYERS))
    assert len(byte_items) == LAYERS * 5 + 1  # linear_qkv, linear_proj, core_attention, fc1, fc2; the final norm
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == byte_items[0])
    with open(os.path.join(iteration_dir, info.relative_path), "rb") as fh:
        fh.seek(info.offset)
        assert torch.load(io.BytesIO(fh.read(info.length)), weights_only=True) == [None]
    assert torch.load(os.path.join(iteration_dir, "common.pt"), weights_only=False)["args"].padded_vocab_size == 256


# -- torch format ----------------------------------------------------------------------------------
def _torch_rank(rank: int, world: int, iteration_dir: str, tokens: list) -> dict:
    """Rank (tp, pp) of TP2 PP2: its own rank file, loaded strictly."""
    from megatron.core import parallel_state as ps

    out = {}
    with megatron_cpu():
        ps.initialize_model_parallel(2, 2)
        try:
            t, p = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
            model = build_model(spec(256), 2, 2, pre_process=p == 0, post_process=p == 1)
            state = torch.load(os.path.join(iteration_dir, f"mp_rank_{t:02d}_{p:03d}", "model_optim_rng.pt"),
                               weights_only=False)
            model.load_state_dict(state["model"], strict=True)
            out["loaded"] = (t, p)
        finally:
            ps.destroy_model_parallel()
    return out


def _assemble_tp1(iteration_dir: str) -> dict:
    """TP1 PP1 megatron-core state dict (local names) from the four TP2 PP2 rank files."""
    files = {(t, p): torch.load(os.path.join(iteration_dir, f"mp_rank_{t:02d}_{p:03d}", "model_optim_rng.pt"),
                                weights_only=False)["model"] for t in range(2) for p in range(2)}
    out = {}
    for p in range(2):
        for key in files[(0, p)]:
            if key.endswith("_extra_state"):
                out[key.replace("decoder.layers.0.", f"decoder.layers.{p}.")] = None
                continue
            layer, name = canonical(key)
            merged = merge_tp(name, [files[(t, p)][key] for t in range(2)])
            out[key.replace("decoder.layers.0.", f"decoder.layers.{p}.")] = merged
    return out


def _tp1_logits_rank(rank: int, world: int, state: dict, tokens: list) -> dict:
    from megatron.core import parallel_state as ps

    with megatron_cpu():
        ps.initialize_model_parallel(1, 1)
        try:
            model = build_model(spec(256))
            model.load_state_dict(state, strict=True)
            return {"logits": forward_logits(model, torch.tensor(tokens))}
        finally:
            ps.destroy_model_parallel()


@pytest.mark.slow
def test_torch_format_tp2_pp2_rank_files_load_strictly_and_give_our_logits(ours, tmp_path):
    root = export(ours, "torch", "--format", "torch", "--tensor-model-parallel-size", "2",
                  "--pipeline-model-parallel-size", "2", "--transformer-impl", "local")
    iteration_dir = os.path.join(root, "iter_0000000")
    assert sorted(os.listdir(iteration_dir)) == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000",
                                                 "mp_rank_01_001"]
    saved = torch.load(os.path.join(iteration_dir, "mp_rank_01_001", "model_optim_rng.pt"), weights_only=False)
    assert saved["checkpoint_version"] == 3.0 and saved["iteration"] == 0 and saved["args"].padded_vocab_size == 256
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ranks = spawn_gloo(_torch_rank, 4, (os.path.abspath(iteration_dir), ours["tokens"].tolist()), str(tmp_path / "a"))
    assert sorted(r["loaded"] for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    state = _assemble_tp1(iteration_dir)
    logits = spawn_gloo(_tp1_logits_rank, 1, (state, ours["tokens"].tolist()), str(tmp_path / "b"))[0]["logits"]
    assert_logits(logits, ours)


class _Marker:
    """A stand-in for a Transformer Engine module class in megatron-core's TE spec."""

    def __init__(self, te_class: str, state: tuple):
        self.te_class, self.state = te_class, state


def te_spec_layer_keys() -> set:
    """The state-dict keys of one layer under megatron-core's TE spec, derived without Transformer
    Engine: megatron-core's own spec function builds the module tree with a stand-in backend whose
    classes carry the state-dict entries of the TE classes they stand for (LayerNormLinear:
    layer_norm_weight, weight, _extra_state; Linear: weight, _extra_state; DotProductAttention:
    _extra_state); IdentityOp slots (the separate norms, which TE fuses) hold nothing."""
    import megatron.core.models.gpt.gpt_layer_specs as specs
    from megatron.core.transformer.spec_utils import ModuleSpec

    class Backend:
        def fuse_layernorm_and_linear(self):
            return True

        def column_parallel_layer_norm_linear(self):
            return _Marker("LayerNormLinear", ("layer_norm_weight", "weight", "_extra_state"))

        def column_parallel_linear(self):
            return _Marker("Linear", ("weight", "_extra_state"))

        row_parallel_linear = linear = column_parallel_linear

        def core_attention(self):
            return _Marker("DotProductAttention", ("_extra_state",))

        def layer_norm(self, rms_norm=False, for_qk=False):
            return _Marker("RMSNorm", ("weight", "_extra_state"))

        def activation_func(self):
            return None

    saved = getattr(specs, "TESpecProvider", None)
    specs.TESpecProvider = Backend
    try:
        layer = specs.get_gpt_layer_with_transformer_engine_spec()
    finally:
        if saved is None:
            del specs.TESpecProvider
        else:
            specs.TESpecProvider = saved

    def walk(node, prefix):
        if isinstance(node, _Marker):
            return {prefix + s for s in node.state}
        if isinstance(node, ModuleSpec):
            return walk(node.submodules, prefix) if node.submodules is not None else set()
        if node is None or isinstance(node, type):
            return set()
        keys = set()
        for field in getattr(node, "__dataclass_fields__", {}):
            keys |= walk(getattr(node, field), f"{prefix}{field}.")
        return keys

    return walk(layer, "")


def test_transformer_engine_names_are_megatron_cores_te_spec(ours):
    te_layer = te_spec_layer_keys()
    assert "self_attention.linear_qkv.layer_norm_weight" in te_layer  # the derivation sees the fused norms
    names = [key for key, _, _ in rank_names(LAYERS, 0, 1, "transformer_engine")]
    exported = {k[len("decoder.layers.0."):] for k in names if k.startswith("decoder.layers.0.")}
    assert exported == te_layer
    assert not any(k.startswith("decoder.layers.2.") for k in names)
    root = export(ours, "torch-te", "--format", "torch", "--tensor-model-parallel-size", "2")
    rank_file = os.path.join(root, "iter_0000000", "mp_rank_01", "model_optim_rng.pt")
    model = torch.load(rank_file, weights_only=False)["model"]
    assert {k[len("decoder.layers.1."):] for k in model if k.startswith("decoder.layers.1.")} == te_layer
    assert model["decoder.layers.0.self_attention.linear_qkv._extra_state"].dtype == torch.uint8
    assert model["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (64, 64)  # one query group of two
    assert model["output_layer._extra_state"] is None
    # torch_dist holds every key a TE spec model asks for: its layers' tensors stacked, an extra state
    # per layer, and the final norm's (TE's RMSNorm) weight and extra state
    iteration_dir = os.path.join(export(ours, "dist-te", "--tensor-model-parallel-size", "1"), "iter_0000000")
    stored = dcp.FileSystemReader(iteration_dir).read_metadata().state_dict_metadata
    for key in te_layer:
        if key.endswith("._extra_state"):
            assert all(f"decoder.layers.{key}/shard_{layer}_{LAYERS}" in stored for layer in range(LAYERS)), key
        else:
            assert list(stored[f"decoder.layers.{key}"].size)[0] == LAYERS, key
    assert "decoder.final_layernorm.weight" in stored and "decoder.final_layernorm._extra_state/shard_0_1" in stored


def _our_tensors(root: str) -> dict:
    iteration_dir = os.path.join(root, "iter_0000000")
    metadata = dcp.FileSystemReader(iteration_dir).read_metadata().state_dict_metadata
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in metadata.items() if hasattr(v, "size")}
    dcp.load(state, checkpoint_id=iteration_dir, no_dist=True)
    return state


ROUND_TRIPS = [["--tensor-model-parallel-size", "2"],
               ["--format", "torch", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
               ["--format", "torch", "--tensor-model-parallel-size", "2", "--transformer-impl", "local"]]


@pytest.mark.parametrize("flags", ROUND_TRIPS, ids=["torch_dist", "torch-te-pp2", "torch-local"])
def test_import_of_the_export_gives_our_tensors_back(ours, tmp_path, flags):
    from megatron_mellama.tools.megatron_to_mellama import main as megatron_to_mellama

    root = export(ours, f"round-{'-'.join(flags)}", *flags)
    assert megatron_to_mellama(["--load", root, "--save", str(tmp_path / "back"), "--no-progress"]) == 0
    want, got = _our_tensors(ours["root"]), _our_tensors(str(tmp_path / "back"))
    assert set(got) == set(want)
    for name, tensor in want.items():
        if name in ("embed_tokens.weight", "lm_head.weight"):  # without a tokenizer the padded rows stay
            assert got[name].shape[0] == 256 and not got[name][VOCAB:].any(), name
            tensor, got[name] = tensor[:VOCAB], got[name][:VOCAB]
        assert torch.equal(got[name], tensor), name


# -- refusals and the command ----------------------------------------------------------------------
def test_refusals_are_one_line(ours, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    cases = [
        (["--load", ours["root"], "--save", str(full), "--tensor-model-parallel-size", "1"], "--overwrite"),
        (["--load", ours["root"], "--save", str(tmp_path / "a"), "--tensor-model-parallel-size", "1",
          "--pipeline-model-parallel-size", "3", "--format", "torch"], "--pipeline-model-parallel-size 3"),
        (["--load", str(tmp_path / "nothing"), "--save", str(tmp_path / "b"), "--tensor-model-parallel-size", "1"],
         "no such directory"),
        (["--load", ours["root"], "--save", str(tmp_path / "c"), "--tensor-model-parallel-size", "4"],
         "num_query_groups 2"),
    ]
    for argv, says in cases:
        capsys.readouterr()
        assert mellama_to_megatron(argv + ["--no-progress"]) != 0
        err = capsys.readouterr().err.strip()
        assert says in err and "\n" not in err and "Traceback" not in err, err
    assert os.listdir(full) == ["something"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staged folder left behind


def test_help_and_the_runnable_script(ours, tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "checkpoints_convert" / "mellama_to_megatron.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--tensor-model-parallel-size" in out and "virtual pipeline" in out


def test_overwrite_replaces_and_prints_one_line(ours, tmp_path, capsys):
    target = tmp_path / "m"
    target.mkdir()
    (target / "old").write_text("x")
    capsys.readouterr()
    assert mellama_to_megatron(["--load", ours["root"], "--save", str(target), "--tensor-model-parallel-size", "1",
                                "--overwrite", "--no-progress", "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and str(target) in printed[0]
    assert not (target / "old").exists()
    metadata = dcp.FileSystemReader(str(target / "iter_0000000")).read_metadata().state_dict_metadata
    assert metadata["output_layer.weight"].properties.dtype == torch.bfloat16
