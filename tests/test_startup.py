"""Start-up from a checkpoint: no random initialisation when a load provides every weight, an
imported checkpoint keeps its dtype and loads exactly into the fp32 master weights, and each
tensor-parallel rank reads about its share of the checkpoint's bytes."""

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from checkpoint_harness import poison
from engine_harness import TINY, global_batches, micro_batches_of, spawn_gloo
from megatron_mellama.checkpoint.convert import expected_shapes, import_checkpoint
from megatron_mellama.model.hf_format import model_config_from_hf
from megatron_mellama.checkpoint.layout import CheckpointError, write_latest, write_train_state
from megatron_mellama.checkpoint.manager import CheckpointManager
from megatron_mellama.checkpoint.resume import checkpoint_to_load
from megatron_mellama.checkpoint.reader import CountingFileSystem, ShardReader, _stored_tensor
from megatron_mellama.config import parse_config
from megatron_mellama.training.engine import Engine

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

# a few MB of bf16 weights, most of them in the embedding and output layer (as in LLaMA2-7B, a
# fifth of the weights at this scale rather than 3%)
HF = dict(model_type="llama", num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=4,
          intermediate_size=352, vocab_size=4096, max_position_embeddings=64, rms_norm_eps=1e-5,
          tie_word_embeddings=False)


class RandomSource:
    """An import source (as sources.HFSource) of seeded random weights in `dtype`."""

    def __init__(self, hf_config: dict, dtype=torch.bfloat16):
        self.hf_config = hf_config
        self.shapes = expected_shapes(model_config_from_hf(hf_config))
        self.names = list(self.shapes)
        self.dtypes = {n: dtype for n in self.names}

    def load(self, name: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.names.index(name))
        return (torch.randn(self.shapes[name], generator=g) * 0.05 + 0.01).to(self.dtypes[name])


def argv_for(hf: dict, load: str) -> list:
    return ["--num-layers", str(hf["num_hidden_layers"]), "--hidden-size", str(hf["hidden_size"]),
            "--num-attention-heads", str(hf["num_attention_heads"]), "--ffn-hidden-size", str(hf["intermediate_size"]),
            "--vocab-size", str(hf["vocab_size"]), "--max-position-embeddings", str(hf["max_position_embeddings"]),
            "--norm-epsilon", str(hf["rms_norm_eps"]), "--seq-length", "16", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "2", "--lr-decay-style", "constant", "--lr", "1e-3",
            "--load", load, "--finetune"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A bf16 source imported with the default dtype: (checkpoint root, source)."""
    source = RandomSource(HF)
    root = str(tmp_path_factory.mktemp("imported"))
    import_checkpoint(source, root, progress=False)
    return root, source


def _tensor_dtypes(ckpt: str) -> dict:
    meta = dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata
    return {k: v.properties.dtype for k, v in meta.items() if hasattr(v, "properties")}


# -- the import keeps the source's dtype; bf16 loads exactly into fp32 ---------------------------------
def test_import_keeps_the_source_dtype_unless_told(imported, tmp_path):
    root, source = imported
    assert set(_tensor_dtypes(os.path.join(root, "iter_0000000")).values()) == {torch.bfloat16}
    import_checkpoint(source, str(tmp_path), dtype="fp32", progress=False)
    assert set(_tensor_dtypes(os.path.join(tmp_path, "iter_0000000")).values()) == {torch.float32}


def test_bf16_checkpoint_loads_into_fp32_master_weights_exactly_and_trains(imported, tmp_path):
    root, source = imported
    cfg = parse_config(argv_for(HF, root) + ["--save", str(tmp_path)])
    ckpt = checkpoint_to_load(cfg)
    assert ckpt == os.path.join(root, "iter_0000000")
    engine = Engine(cfg, initialise=False)
    poison(engine)
    manager = CheckpointManager(cfg, engine)
    assert manager.load(ckpt)["iteration"] == 0
    params = engine.full_state()
    assert set(params) == set(source.names)
    for name in source.names:
        assert params[name].dtype == torch.float32
        assert torch.equal(params[name], source.load(name).float()), name  # bf16 upcast: exact
    assert not engine.optimizer.state  # --finetune: a fresh optimizer
    result = engine.step(micro_batches_of(global_batches(cfg, 1)[0], cfg, 0, 1))
    assert not result.skipped and torch.isfinite(torch.tensor(result.loss))
    manager.save(1, 4)
    manager.close()
    # what training saves is fp32 master weights and fp32 optimizer moments, whatever was imported
    saved = _tensor_dtypes(os.path.join(tmp_path, "iter_0000001"))
    assert saved["layers.0.mlp.up_proj.weight"] == torch.float32
    assert saved["optimizer.state.layers.0.mlp.up_proj.weight.exp_avg"] == torch.float32
    assert saved["optimizer.state.layers.0.mlp.up_proj.weight.exp_avg_sq"] == torch.float32


# -- no initialisation when loading; a load that lacks a weight is an error ---------------------------
def test_checkpoint_lacking_a_weight_is_an_error_not_an_uninitialised_model(tmp_path):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    cfg = parse_config(TINY)
    state = get_model_state_dict(Engine(cfg).modules[0])
    del state["norm.weight"]
    ckpt = os.path.join(tmp_path, "iter_0000000")
    dcp.save(state, storage_writer=dcp.FileSystemWriter(ckpt), no_dist=True)
    write_train_state(ckpt, iteration=0, consumed_samples=0, config=cfg)
    write_latest(str(tmp_path), 0)
    cfg = parse_config(TINY + ["--load", str(tmp_path), "--finetune"])
    engine = Engine(cfg, initialise=checkpoint_to_load(cfg) is None)
    with pytest.raises(CheckpointError, match=r"iter_0000000: the checkpoint has no norm\.weight"):
        CheckpointManager(cfg, engine).load()


def test_checkpoint_whose_chunks_miss_part_of_a_tensor_is_an_error(tmp_path):
    import pickle

    cfg = parse_config(TINY + ["--save", str(tmp_path)])
    CheckpointManager(cfg, Engine(cfg)).save(1, 8)
    path = os.path.join(tmp_path, "iter_0000001", ".metadata")
    with open(path, "rb") as fh:
        meta = pickle.load(fh)
    meta.state_dict_metadata["layers.1.mlp.up_proj.weight"].chunks.clear()  # as if a rank's files were lost
    with open(path, "wb") as fh:
        pickle.dump(meta, fh)
    os.remove(os.path.join(tmp_path, "iter_0000001", "checksums.json"))  # the reader's check, not the checksums'
    cfg = parse_config(TINY + ["--load", str(tmp_path), "--finetune"])
    with pytest.raises(CheckpointError, match=r"corrupt checkpoint .*layers\.1\.mlp\.up_proj\.weight: its stored "
                                              r"chunks hold 0 of its \d+ elements"):
        CheckpointManager(cfg, Engine(cfg, initialise=False)).load()


def test_checkpoint_to_load_agrees_with_load(tmp_path):
    assert checkpoint_to_load(parse_config(TINY)) is None
    # empty and the same as --save: the first launch, from scratch; otherwise an error
    assert checkpoint_to_load(parse_config(TINY + ["--load", str(tmp_path), "--save", str(tmp_path)])) is None
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        checkpoint_to_load(parse_config(TINY + ["--load", str(tmp_path)]))
    with pytest.raises(CheckpointError, match="no such directory"):
        checkpoint_to_load(parse_config(TINY + ["--load", str(tmp_path / "nope")]))
    (tmp_path / "latest").write_text("3\n")
    with pytest.raises(CheckpointError, match="names iteration 3"):
        checkpoint_to_load(parse_config(TINY + ["--load", str(tmp_path)]))


@pytest.mark.slow
def test_training_loop_initialises_only_without_a_checkpoint(tmp_path, monkeypatch):
    from megatron_mellama.pretrain import load_run_config
    from megatron_mellama.training import loop

    made = []

    def engine(*args, **kwargs):
        made.append(kwargs.get("initialise", True))
        return Engine(*args, **kwargs)

    monkeypatch.setattr(loop, "Engine", engine)
    run = ["--model", "tiny", "--mock-data", "--vocab-size", "256", "--seq-length", "32", "--micro-batch-size", "2",
           "--global-batch-size", "4", "--lr", "3e-3", "--lr-decay-style", "constant", "--eval-iters", "0",
           "--log-interval", "1", "--num-workers", "0"]
    save = str(tmp_path / "ckpt")
    os.makedirs(save)  # --load of an empty directory: a fresh start
    first = loop.train(load_run_config(run + ["--train-iters", "4", "--save", save, "--load", save,
                                              "--exit-interval", "2"]))
    whole = loop.train(load_run_config(run + ["--train-iters", "4"]))
    resumed = loop.train(load_run_config(run + ["--train-iters", "4", "--load", save]))
    finetuned = loop.train(load_run_config(run + ["--train-iters", "1", "--load", save, "--finetune"]))
    assert made == [True, True, False, False]
    assert first["losses"] + resumed["losses"] == whole["losses"]  # bitwise, from the uninitialised engine
    assert finetuned["start_iteration"] == 0 and len(finetuned["losses"]) == 1


# -- each rank reads about its share ----------------------------------------------------------------
def _stored(tmp_path, tensor):
    path = str(tmp_path / "one")
    dcp.save({"t": tensor}, storage_writer=dcp.FileSystemWriter(path, single_file_per_rank=True), no_dist=True)
    reader = ShardReader(path)
    meta = reader.read_metadata()
    ((index, info),) = [(k, v) for k, v in meta.storage_data.items() if k.fqn == "t"]
    return reader, os.path.join(path, info.relative_path), info


@pytest.mark.parametrize("min_gap", [0, 1 << 20], ids=["runs", "span"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shard_reader_reads_exactly_the_requested_block(tmp_path, dtype, min_gap):
    full = torch.randn(12, 10, 6).to(dtype)
    reader, path, info = _stored(tmp_path, full)
    reader.min_gap = min_gap
    blocks = [((0, 0, 0), (12, 10, 6)), ((4, 0, 0), (5, 10, 6)), ((0, 5, 0), (12, 5, 6)), ((3, 2, 1), (4, 7, 3)),
              ((11, 9, 5), (1, 1, 1))]
    with open(path, "rb") as stream:
        stored = _stored_tensor(stream, info)
        assert stored is not None and stored.shape == (12, 10, 6) and stored.dtype == dtype
        for offsets, lengths in blocks:
            before = reader.bytes_read
            got = reader._read(stream, stored, offsets, lengths)
            want = full[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]
            assert torch.equal(got, want), (offsets, lengths)
            numel = want.numel()
            read = (reader.bytes_read - before) // full.element_size()
            # rows: exactly the block; columns read as runs: exactly the block; as one span: the
            # block's bounding rows
            assert read == numel if (min_gap == 0 or lengths[1:] == full.shape[1:]) else read >= numel


def test_shard_reader_hands_unusual_items_to_dcp(tmp_path):
    # a stored transposed view (not contiguous) and a 0-dim tensor still load exactly
    state = {"t": torch.randn(7, 5).t(), "s": torch.tensor(2.5), "n": torch.arange(6.0)}
    path = str(tmp_path / "ck")
    dcp.save(state, storage_writer=dcp.FileSystemWriter(path), no_dist=True)
    out = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
    dcp.load(out, storage_reader=ShardReader(path), no_dist=True)
    assert all(torch.equal(out[k], state[k]) for k in state)


def _tp2_load(rank, world, argv, stock):
    import megatron_mellama.checkpoint.manager as manager_module
    from megatron_mellama.parallel.mesh import ParallelDims

    readers = []

    class Counted(dcp.FileSystemReader if stock else ShardReader):
        def __init__(self, path):
            super().__init__(path)
            self.fs = CountingFileSystem()
            readers.append(self)

    manager_module.ShardReader = Counted
    cfg = parse_config(argv, world_size=world)
    dims = ParallelDims.from_config(cfg, world)
    engine = Engine(cfg, dims.build_mesh("cpu"), initialise=checkpoint_to_load(cfg) is None)
    poison(engine)
    CheckpointManager(cfg, engine).load()
    read = sum(r.fs.bytes_read + getattr(r, "bytes_read", 0) for r in readers)
    return dict(read=read, params=engine.full_state())


@pytest.mark.slow
@pytest.mark.parametrize("stock", [False, True], ids=["shard-reader", "dcp-reader"])
def test_tp2_rank_reads_about_its_share_of_an_imported_checkpoint(imported, tmp_path, stock):
    root, source = imported
    ckpt = os.path.join(root, "iter_0000000")
    size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
    argv = argv_for(HF, root) + ["--tensor-model-parallel-size", "2"]
    ranks = spawn_gloo(_tp2_load, 2, (argv, stock), str(tmp_path))
    shares = [r["read"] / size for r in ranks]
    print(f"bytes read per TP2 rank ({'DCP' if stock else 'ShardReader'}): "
          f"{[r['read'] for r in ranks]} of a {size}-byte checkpoint ({', '.join(f'{s:.2f}' for s in shares)})")
    if stock:
        assert all(s >= 0.9 for s in shares), shares  # the comparison: whole tensors on every rank
    else:
        assert all(s < 0.65 for s in shares), shares
    for r in ranks:
        for name in source.names:
            assert torch.equal(r["params"][name], source.load(name).float()), name
