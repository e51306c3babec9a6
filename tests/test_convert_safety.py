"""The converters never give a silently wrong result: an export or import owns its output folder (refused
when it holds anything, replaced whole with --overwrite, never half-written), config.json fields the model
cannot represent are refused by name, --dtype fp16 refuses values beyond its range, and a truncated shard
is one line naming the file."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from test_convert import MHA, hf_tensors, make_hf  # noqa: E402

from megatron_mellama.checkpoint.convert import export_checkpoint, import_checkpoint  # noqa: E402
from megatron_mellama.model.hf_format import model_config_from_hf  # noqa: E402
from megatron_mellama.checkpoint.sources import ConvertError, HFSource  # noqa: E402
from megatron_mellama.tools.hf_to_mellama import main as hf_to_mellama  # noqa: E402
from megatron_mellama.tools.mellama_to_hf import main as mellama_to_hf  # noqa: E402


def _error(main, argv, capsys):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def _snapshot(path):
    """Every file under `path` with its bytes."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


def _no_leftovers(parent):
    assert [e for e in os.listdir(parent) if e.startswith(".")] == []


def _imported(tmp_path, seed=0, name="ours", **kwargs):
    src = tmp_path / f"hf{seed}"
    if not src.exists():
        make_hf(src, dict(MHA, **kwargs), seed=seed)
    save = str(tmp_path / name)
    assert hf_to_mellama(["--hf-dir", str(src), "--save", save, "--no-progress"]) == 0
    return src, save


# -- 1. the export owns its folder ------------------------------------------------------------------
def test_export_refuses_a_folder_holding_a_model_and_overwrite_replaces_it_whole(tmp_path, capsys):
    src, save = _imported(tmp_path, seed=1)
    out = tmp_path / "export"
    make_hf(out, MHA, seed=2)  # an older model: one model.safetensors, which from_pretrained would prefer
    (out / "tokenizer.json").write_text("{}")
    before = _snapshot(out)

    err = _error(mellama_to_hf, ["--load", save, "--hf-dir", str(out), "--no-progress"], capsys)
    assert "--hf-dir" in err and "--overwrite" in err and "not empty" in err
    assert _snapshot(out) == before

    assert mellama_to_hf(["--load", save, "--hf-dir", str(out), "--no-progress", "--max-shard-size", "40KB",
                          "--overwrite"]) == 0
    files = set(os.listdir(out))
    assert "model.safetensors" not in files and "tokenizer.json" not in files
    assert files >= {"config.json", "model.safetensors.index.json"}
    want, got = hf_tensors(src), hf_tensors(out)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    tokens = torch.randint(0, MHA["vocab_size"], (1, 7))
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(back(tokens).logits, transformers.AutoModelForCausalLM.from_pretrained(src)(tokens).logits)
    _no_leftovers(tmp_path)


def test_export_into_an_empty_or_new_folder_needs_no_flag(tmp_path):
    _, save = _imported(tmp_path)
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        assert mellama_to_hf(["--load", save, "--hf-dir", str(out), "--no-progress"]) == 0
        assert (out / "config.json").is_file()
    _no_leftovers(tmp_path)


def test_overwrite_never_replaces_the_folder_holding_the_input(tmp_path, capsys):
    _, save = _imported(tmp_path)
    before = _snapshot(save)
    err = _error(mellama_to_hf, ["--load", save, "--hf-dir", save, "--overwrite", "--no-progress"], capsys)
    assert "holds the input" in err
    err = _error(mellama_to_hf, ["--load", os.path.join(save, "iter_0000000"), "--hf-dir", save, "--overwrite",
                                 "--no-progress"], capsys)
    assert "holds the input" in err
    assert _snapshot(save) == before


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    _, save = _imported(tmp_path)
    out = tmp_path / "export"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")
    real = os.rename

    def rename(a, b):
        if str(a).endswith(".partial"):
            raise OSError("disk gone")
        return real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="disk gone"):
        export_checkpoint(save, str(out), progress=False, overwrite=True)
    monkeypatch.undo()
    assert _snapshot(out) == {"model.safetensors": b"old"}
    _no_leftovers(tmp_path)


# -- 3. --dtype fp16 refuses what it cannot hold ----------------------------------------------------
def _with_big_value(tmp_path, value=1e5):
    src = tmp_path / "big"
    make_hf(src, MHA)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = -value
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    return src


def test_fp16_refuses_values_beyond_its_range(tmp_path, capsys):
    src = _with_big_value(tmp_path)
    err = _error(hf_to_mellama, ["--hf-dir", str(src), "--save", str(tmp_path / "fp16"), "--dtype", "fp16",
                                 "--no-progress"], capsys)
    assert "model.layers.1.mlp.down_proj.weight" in err and "100000" in err and "float16" in err
    assert not (tmp_path / "fp16").exists()
    _no_leftovers(tmp_path)

    save = str(tmp_path / "ours")
    assert hf_to_mellama(["--hf-dir", str(src), "--save", save, "--no-progress"]) == 0  # fp32 holds it
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text("{}")
    err = _error(mellama_to_hf, ["--load", save, "--hf-dir", str(out), "--dtype", "fp16", "--overwrite",
                                 "--no-progress"], capsys)
    assert "model.layers.1.mlp.down_proj.weight" in err and "100000" in err
    assert _snapshot(out) == {"config.json": b"{}"}  # what was there is still there, nothing half-written
    _no_leftovers(tmp_path)
    # bf16 holds the value; and values within fp16's range convert
    assert mellama_to_hf(["--load", save, "--hf-dir", str(out), "--dtype", "bf16", "--overwrite",
                          "--no-progress"]) == 0
    small = _with_big_value(tmp_path / "small", 6e4)
    assert hf_to_mellama(["--hf-dir", str(small), "--save", str(tmp_path / "small16"), "--dtype", "fp16",
                          "--no-progress"]) == 0


# -- 4. the import owns its checkpoint root ---------------------------------------------------------
def test_import_refuses_a_root_with_checkpoints_and_overwrite_replaces_it(tmp_path, capsys):
    src, save = _imported(tmp_path)
    os.makedirs(os.path.join(save, "iter_0000100"))
    open(os.path.join(save, "iter_0000100", "train_state.json"), "w").write("{}")
    open(os.path.join(save, "latest"), "w").write("100\n")
    before = _snapshot(save)

    err = _error(hf_to_mellama, ["--hf-dir", str(src), "--save", save, "--no-progress"], capsys)
    assert "holds checkpoints" in err and "--overwrite" in err and "latest 100" in err
    assert _snapshot(save) == before

    # an --overwrite that fails leaves the root as it was
    big = _with_big_value(tmp_path)
    err = _error(hf_to_mellama, ["--hf-dir", str(big), "--save", save, "--dtype", "fp16", "--overwrite",
                                 "--no-progress"], capsys)
    assert _snapshot(save) == before
    _no_leftovers(tmp_path)

    assert hf_to_mellama(["--hf-dir", str(src), "--save", save, "--overwrite", "--no-progress"]) == 0
    assert sorted(os.listdir(save)) == ["iter_0000000", "latest"]
    assert open(os.path.join(save, "latest")).read().strip() == "0"
    _no_leftovers(tmp_path)


def test_import_refuses_a_root_holding_other_files(tmp_path, capsys):
    make_hf(tmp_path / "hf", MHA)
    save = tmp_path / "ours"
    save.mkdir()
    (save / "notes.txt").write_text("mine")
    err = _error(hf_to_mellama, ["--hf-dir", str(tmp_path / "hf"), "--save", str(save), "--no-progress"], capsys)
    assert "not empty" in err and "notes.txt" in err
    assert _snapshot(save) == {"notes.txt": b"mine"}
    err = _error(hf_to_mellama, ["--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path), "--overwrite",
                                 "--no-progress"], capsys)
    assert "holds the input" in err


# -- 2. config.json fields the model cannot represent -----------------------------------------------
REFUSED = [
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("rope_scaling", {"type": "dynamic", "factor": 4.0}),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    ("hidden_act", "gelu"),
    ("sliding_window", 4096),
    ("attention_bias", True),
    ("mlp_bias", True),
    ("tie_word_embeddings", True),
    ("model_type", "mistral"),
    ("head_dim", 32),
    ("attention_dropout", 0.1),
    ("quantization_config", {"quant_method": "bitsandbytes"}),
    ("logit_scale", 0.5),
    ("num_key_value_heads", 3),
]


def test_import_refuses_every_config_field_the_model_cannot_represent(tmp_path, capsys):
    src = tmp_path / "hf"
    make_hf(src, MHA)
    good = json.loads((src / "config.json").read_text())
    for i, (field, value) in enumerate(REFUSED):
        (src / "config.json").write_text(json.dumps(dict(good, **{field: value})))
        save = tmp_path / f"out{i}"
        err = _error(hf_to_mellama, ["--hf-dir", str(src), "--save", str(save), "--no-progress"], capsys)
        assert field in err, (field, err)
        shown = json.dumps(value) if not isinstance(value, (dict, bool, str)) else None
        if shown:
            assert shown in err, (field, err)
        assert not save.exists()
    # no model_type and a field LLaMA does not have
    (src / "config.json").write_text(json.dumps(dict({k: v for k, v in good.items() if k != "model_type"},
                                                     use_sliding_window=True, sliding_window=128)))
    assert "sliding_window" in _error(hf_to_mellama, ["--hf-dir", str(src), "--save", str(tmp_path / "x"),
                                                      "--no-progress"], capsys)


def test_config_fields_that_do_not_change_the_function_are_accepted():
    base = json.loads(transformers.LlamaConfig(**MHA, max_position_embeddings=64).to_json_string())
    want = model_config_from_hf(base)
    # transformers 4's spelling: rope_theta at the top, rope_scaling null; Llama-2-7b-hf's own fields
    v4 = {k: v for k, v in base.items() if k != "rope_parameters"}
    v4.update(rope_theta=10000.0, rope_scaling=None, torch_dtype="float16", architectures=["LlamaForCausalLM"],
              pretraining_tp=1, _name_or_path="meta-llama/Llama-2-7b-hf", pad_token_id=0, use_cache=True)
    assert model_config_from_hf(v4) == want
    assert model_config_from_hf(dict(base, rope_scaling={"type": "default"}, head_dim=None, sliding_window=None,
                                     hidden_act="silu", attention_dropout=0.0)) == want
    theta = dict(base, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    assert model_config_from_hf(theta).rotary_base == 500000.0
    with pytest.raises(ValueError, match="rope_theta"):
        model_config_from_hf(dict(theta, rope_theta=10000.0))  # two different thetas: which one?


# -- 5. a truncated shard ---------------------------------------------------------------------------
def test_truncated_shard_is_one_line_naming_the_file(tmp_path, capsys):
    src = tmp_path / "hf"
    make_hf(src, MHA, max_shard_size="30KB")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    with open(shard, "r+b") as fh:
        fh.truncate(os.path.getsize(shard) - 100)
    err = _error(hf_to_mellama, ["--hf-dir", str(src), "--save", str(tmp_path / "out"), "--no-progress"], capsys)
    assert str(shard) in err and "truncated" in err
    assert not (tmp_path / "out").exists()
    with open(shard, "r+b") as fh:  # a header cut short
        fh.truncate(20)
    err = _error(hf_to_mellama, ["--hf-dir", str(src), "--save", str(tmp_path / "out"), "--no-progress"], capsys)
    assert str(shard) in err


def test_shard_truncated_during_the_import_is_a_convert_error(tmp_path):
    """The file shrinks after its header was read: the error comes through DCP's CheckpointException
    (a BaseException, not an Exception) as the ConvertError naming the file."""
    src = tmp_path / "hf"
    make_hf(src, MHA)
    source = HFSource(str(src))
    path = src / "model.safetensors"
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) - 100)
    with pytest.raises(ConvertError, match="model.safetensors: truncated"):
        import_checkpoint(source, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


def test_meta_params_the_model_cannot_represent_are_refused(tmp_path, capsys):
    from test_convert import GQA, write_meta

    hf = make_hf(tmp_path / "hf", dict(GQA, intermediate_size=176))
    meta = tmp_path / "meta"
    write_meta(hf, meta)
    good = json.loads((meta / "params.json").read_text())
    for field, value in (("use_scaled_rope", True), ("rope_scaling", {"factor": 8.0})):
        (meta / "params.json").write_text(json.dumps(dict(good, **{field: value})))
        err = _error(hf_to_mellama, ["--hf-dir", str(meta), "--save", str(tmp_path / "m"), "--source-format", "meta",
                                     "--no-progress"], capsys)
        assert "params.json" in err and field in err
    (meta / "params.json").write_text(json.dumps(dict(good, use_scaled_rope=False, max_batch_size=32)))
    err = _error(hf_to_mellama, ["--hf-dir", str(meta), "--save", str(meta), "--source-format", "meta",
                                 "--overwrite", "--no-progress"], capsys)
    assert "holds the input" in err
    assert hf_to_mellama(["--hf-dir", str(meta), "--save", str(tmp_path / "m"), "--source-format", "meta",
                          "--no-progress"]) == 0


def test_import_writes_checksums_that_verify(tmp_path):
    """An imported checkpoint is verified at load like a saved one: its checksums are written
    before `latest`."""
    from megatron_mellama.checkpoint import checksums
    from megatron_mellama.checkpoint.layout import checkpoint_dir

    _, save = _imported(tmp_path)
    ckpt = checkpoint_dir(save, 0)
    files = checksums.read_checksums(ckpt)
    assert files and checksums.verify(ckpt, files) == []


# -- issue 23: the tokenizer shipped with an export is the one the checkpoint was trained with -------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, sentencepiece_model):
    from evaluation_helpers import other_sentencepiece_model, train_tiny_checkpoint

    root = tmp_path_factory.mktemp("trained")
    return train_tiny_checkpoint(root / "ckpt", sentencepiece_model), other_sentencepiece_model(root)


@pytest.mark.slow
def test_export_refuses_a_tokenizer_other_than_the_trained_one(trained, sentencepiece_model, tmp_path, capsys):
    from megatron_mellama.data.identity import tokenizer_hash

    ckpt, other = trained
    out = tmp_path / "hf"
    err = _error(mellama_to_hf, ["--load", ckpt, "--hf-dir", str(out), "--tokenizer-model", other, "--no-progress"],
                 capsys)
    assert f"--tokenizer-model {other} (sha256 {tokenizer_hash(other)[:12]}) is not the tokenizer" in err
    assert f"{sentencepiece_model} (sha256 {tokenizer_hash(sentencepiece_model)[:12]})" in err
    assert "--allow-tokenizer-mismatch" in err and not out.exists()
    assert mellama_to_hf(["--load", ckpt, "--hf-dir", str(out), "--tokenizer-model", sentencepiece_model,
                          "--no-progress"]) == 0
    assert mellama_to_hf(["--load", ckpt, "--hf-dir", str(tmp_path / "forced"), "--tokenizer-model", other,
                          "--allow-tokenizer-mismatch", "--no-progress"]) == 0


def test_export_tokenizer_model_that_is_a_directory_says_so(trained, hf_tokenizer_dir, tmp_path, capsys):
    ckpt, other = trained
    folder = tmp_path / "tok"
    folder.mkdir()
    err = _error(mellama_to_hf, ["--load", ckpt, "--hf-dir", str(tmp_path / "hf"), "--tokenizer-model", str(folder),
                                 "--no-progress"], capsys)
    assert f"--tokenizer-model {folder}: is a directory; expected the SentencePiece tokenizer .model file" in err
    (folder / "tokenizer.model").write_bytes(open(other, "rb").read())
    err = _error(mellama_to_hf, ["--load", ckpt, "--hf-dir", str(tmp_path / "hf"), "--tokenizer-model", str(folder),
                                 "--no-progress"], capsys)
    assert f"(it holds {folder / 'tokenizer.model'})" in err
