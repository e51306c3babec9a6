"""Checkpoint conversion: HF -> ours -> HF is exact, an imported model computes transformers' logits
under any layout, Meta's original format imports to the same tensors, and bad inputs fail in one line."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from megatron_mellama.model.meta_format import half_to_interleaved, meta_to_ours  # noqa: E402
from megatron_mellama.tools.hf_to_mellama import main as hf_to_mellama  # noqa: E402
from megatron_mellama.tools.mellama_to_hf import main as mellama_to_hf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MHA = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
           intermediate_size=96, vocab_size=101)
GQA = dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
           intermediate_size=80, vocab_size=120, rope_theta=500000.0, rms_norm_eps=1e-6)


def make_hf(path, kwargs, dtype=torch.float32, seed=0, **save):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.1,
                                   attn_implementation="eager", **kwargs)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms start at 1: perturb, so a misplaced one would show
                p.add_(0.1 * torch.randn_like(p))
    model = model.to(dtype)
    model.save_pretrained(path, **save)
    return model


def hf_tensors(path):
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    if files:
        return {k: v for f in files for k, v in load_file(os.path.join(path, f)).items()}
    return {k: v for f in os.listdir(path) if f.endswith(".bin")
            for k, v in torch.load(os.path.join(path, f), weights_only=True).items()}


def round_trip(tmp_path, hf_dir, *extra):
    save, out = str(tmp_path / "ours"), str(tmp_path / "back")
    assert hf_to_mellama(["--hf-dir", str(hf_dir), "--save", save, "--no-progress", *extra]) == 0
    assert (tmp_path / "ours" / "latest").read_text().strip() == "0"
    assert mellama_to_hf(["--load", save, "--hf-dir", out, "--no-progress", "--max-shard-size", "40KB"]) == 0
    return save, out


CASES = [("mha-fp32-safetensors", MHA, torch.float32, dict()),
         ("gqa-bf16-sharded", GQA, torch.bfloat16, dict(max_shard_size="30KB")),
         ("gqa-fp32-bin", GQA, torch.float32, dict(safe_serialization=False))]


@pytest.mark.parametrize("name,kwargs,dtype,save", CASES, ids=[c[0] for c in CASES])
def test_hf_round_trip_is_exact(tmp_path, name, kwargs, dtype, save):
    src = tmp_path / "hf"
    make_hf(src, kwargs, dtype, **save)
    ours, out = round_trip(tmp_path, src)
    # the import keeps the source's dtype by default (a bf16 release is not doubled to fp32)
    import torch.distributed.checkpoint as dcp

    stored = dcp.FileSystemReader(os.path.join(ours, "iter_0000000")).read_metadata().state_dict_metadata
    assert {v.properties.dtype for v in stored.values() if hasattr(v, "properties")} == {dtype}
    want, got = hf_tensors(src), hf_tensors(out)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1  # the shard limit was honoured
    a = transformers.LlamaConfig.from_pretrained(src).to_dict()
    b = transformers.LlamaConfig.from_pretrained(out).to_dict()
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "rms_norm_eps", "max_position_embeddings", "rope_parameters",
                "tie_word_embeddings", "dtype"):
        assert a.get(key) == b.get(key), key
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokens = torch.randint(0, kwargs["vocab_size"], (1, 9))
    assert torch.equal(back(tokens).logits, transformers.AutoModelForCausalLM.from_pretrained(src)(tokens).logits)


def _cfg_argv(kwargs, save):
    argv = ["--num-layers", str(kwargs["num_hidden_layers"]), "--hidden-size", str(kwargs["hidden_size"]),
            "--num-attention-heads", str(kwargs["num_attention_heads"]),
            "--ffn-hidden-size", str(kwargs["intermediate_size"]), "--vocab-size", str(kwargs["vocab_size"]),
            "--max-position-embeddings", "64", "--seq-length", "16", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--load", save, "--finetune", "--train-iters", "1",
            "--lr-decay-style", "constant"]
    if kwargs["num_key_value_heads"] != kwargs["num_attention_heads"]:
        argv += ["--group-query-attention", "--num-query-groups", str(kwargs["num_key_value_heads"])]
    return argv + ["--norm-epsilon", str(kwargs.get("rms_norm_eps", 1e-6)),
                   "--rotary-base", str(kwargs.get("rope_theta", 10000.0))]


def _logits_through_manager(kwargs, save, tokens):
    from megatron_mellama.checkpoint.manager import CheckpointManager
    from megatron_mellama.config import parse_config
    from megatron_mellama.training.engine import Engine

    cfg = parse_config(_cfg_argv(kwargs, save))
    engine = Engine(cfg)
    state = CheckpointManager(cfg, engine).load()
    assert state["iteration"] == 0
    (model,) = engine.modules
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("kwargs", [MHA, GQA], ids=["mha", "gqa"])
def test_imported_model_computes_transformers_logits(tmp_path, kwargs):
    hf = make_hf(tmp_path / "hf", kwargs)
    save = str(tmp_path / "ours")
    assert hf_to_mellama(["--hf-dir", str(tmp_path / "hf"), "--save", save, "--no-progress"]) == 0
    tokens = torch.randint(0, kwargs["vocab_size"], (2, 13))
    ours = _logits_through_manager(kwargs, save, tokens)
    with torch.no_grad():
        want = hf(input_ids=tokens).logits
    assert (ours - want).abs().max().item() <= 1e-5


def write_meta(hf_model, path, shards=2):
    """Meta's release layout from a Hugging Face model: q/k rows interleaved, model-parallel shards."""
    os.makedirs(path)
    c = hf_model.config
    ours = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    meta_names = [f"layers.{i}.{n}" for i in range(c.num_hidden_layers) for n in (
        "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
        "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight", "attention_norm.weight",
        "ffn_norm.weight")] + ["tok_embeddings.weight", "norm.weight", "output.weight"]
    parts = [{} for _ in range(shards)]
    for meta_name in meta_names:
        name, dim = meta_to_ours(meta_name)
        w = ours[name]
        if name.endswith("q_proj.weight"):
            w = half_to_interleaved(w, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = half_to_interleaved(w, c.num_key_value_heads)
        for r in range(shards):
            parts[r][meta_name] = w.chunk(shards, dim)[r].clone() if dim is not None else w.clone()
    for r, part in enumerate(parts):
        torch.save(part, os.path.join(path, f"consolidated.{r:02d}.pth"))
    # Meta's FeedForward rule gives intermediate_size back: 2/3 * 4 * dim, rounded up to multiple_of
    params = dict(dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                  n_kv_heads=c.num_key_value_heads, multiple_of=16, norm_eps=c.rms_norm_eps, vocab_size=-1,
                  rope_theta=c.rope_parameters["rope_theta"], max_seq_len=c.max_position_embeddings)
    (Path(path) / "params.json").write_text(json.dumps(params))


def test_meta_import_equals_hf_import(tmp_path):
    kwargs = dict(GQA, intermediate_size=176)  # = 16 * ceil(2 * 4 * 64 / 3 / 16), Meta's rule for dim 64
    hf = make_hf(tmp_path / "hf", kwargs)
    write_meta(hf, tmp_path / "meta")
    assert hf_to_mellama(["--hf-dir", str(tmp_path / "meta"), "--save", str(tmp_path / "m"),
                          "--source-format", "meta", "--no-progress"]) == 0
    assert mellama_to_hf(["--load", str(tmp_path / "m"), "--hf-dir", str(tmp_path / "back"), "--no-progress"]) == 0
    want, got = hf_tensors(tmp_path / "hf"), hf_tensors(tmp_path / "back")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    tokens = torch.randint(0, kwargs["vocab_size"], (2, 11))
    ours = _logits_through_manager(kwargs, str(tmp_path / "m"), tokens)
    with torch.no_grad():
        assert (ours - hf(input_ids=tokens).logits).abs().max().item() <= 1e-5


def test_meta_rope_layout_is_what_the_permutation_assumes():
    """Meta's interleaved-pair RoPE on Meta's q/k rows = rotate-half RoPE on the permuted rows."""
    from megatron_mellama.model.meta_format import interleaved_to_half
    from megatron_mellama.kernels.reference import apply_rotary
    from megatron_mellama.config import ModelConfig
    from megatron_mellama.model.llama import rotary_tables

    heads, head_dim, dim, seq = 2, 8, 16, 5
    wq = torch.randn(heads * head_dim, dim)
    x = torch.randn(seq, dim)
    # Meta's llama/model.py: consecutive pairs are complex numbers rotated by position * freq
    q = (x @ wq.T).view(seq, heads, head_dim // 2, 2)
    freqs = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    rot = torch.polar(torch.ones(seq, head_dim // 2), torch.outer(torch.arange(seq).float(), freqs))
    meta = torch.view_as_real(torch.view_as_complex(q.contiguous()) * rot[:, None]).flatten(2)
    hf_q = (x @ interleaved_to_half(wq, heads).T).view(seq, heads, head_dim).transpose(0, 1)[None]
    cos, sin = rotary_tables(ModelConfig(hidden_size=head_dim, num_attention_heads=1, max_position_embeddings=seq))
    half = apply_rotary(hf_q, cos, sin)[0].transpose(0, 1)  # (seq, heads, head_dim)
    # same rotated vectors up to the order of each head's coordinates: dot products agree
    scores_meta = torch.einsum("shd,thd->hst", meta, meta)
    scores_half = torch.einsum("shd,thd->hst", half, half)
    assert torch.allclose(scores_meta, scores_half, atol=1e-4)
    # and the order is exactly rotate-half's: pair i sits at (i, i + head_dim / 2)
    assert torch.allclose(interleaved_to_half(meta.reshape(seq, -1).T.contiguous(), heads).T.reshape(seq, heads, -1),
                          half, atol=1e-5)


def _first_loss(argv, nproc):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    proc = subprocess.run([sys.executable, *launcher, "-m", "megatron_mellama.pretrain", *argv], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [float(m) for m in re.findall(r"lm loss: ([0-9.E+-]+)", proc.stdout)]


@pytest.mark.slow
def test_imported_checkpoint_trains_identically_under_tp2_pp2(tmp_path):
    kwargs = dict(GQA, num_hidden_layers=4, vocab_size=128)
    make_hf(tmp_path / "hf", kwargs)
    save = str(tmp_path / "ours")
    assert hf_to_mellama(["--hf-dir", str(tmp_path / "hf"), "--save", save, "--no-progress"]) == 0
    argv = _cfg_argv(kwargs, save) + ["--mock-data", "--train-iters", "1", "--lr", "1e-3", "--log-interval", "1",
                                      "--eval-iters", "0", "--num-workers", "0", "--global-batch-size", "8"]
    one = _first_loss(argv, 1)
    four = _first_loss(argv + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 4)
    assert len(one) == 1 and len(four) == 1
    assert abs(one[0] - four[0]) <= 1e-5 * abs(one[0])


def _error(main, argv, capsys):
    capsys.readouterr()  # what making the inputs printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_errors_are_one_line(tmp_path, capsys):
    src = tmp_path / "hf"
    make_hf(src, MHA, max_shard_size="30KB")
    save = str(tmp_path / "ours")
    assert "--hf-dir" in _error(hf_to_mellama, ["--save", save], capsys)
    assert "no such directory" in _error(hf_to_mellama, ["--hf-dir", str(tmp_path / "nope"), "--save", save], capsys)

    os.remove(src / "model-00002-of-00008.safetensors" if (src / "model-00002-of-00008.safetensors").exists()
              else sorted(src.glob("model-*.safetensors"))[1])
    assert "does not exist" in _error(hf_to_mellama, ["--hf-dir", str(src), "--save", save], capsys)

    def variant(name, **changes):
        d = tmp_path / name
        cfg = dict(MHA, **changes.pop("config", {}))
        make_hf(d, cfg)
        conf = json.loads((d / "config.json").read_text())
        conf.update(changes)
        (d / "config.json").write_text(json.dumps(conf))
        return ["--hf-dir", str(d), "--save", str(tmp_path / f"out-{name}")]

    assert "not 'llama'" in _error(hf_to_mellama, variant("mistral", model_type="mistral"), capsys)
    assert "tie_word_embeddings" in _error(hf_to_mellama, variant("tied", tie_word_embeddings=True), capsys)
    assert "shape" in _error(hf_to_mellama, variant("shape", intermediate_size=100), capsys)
    assert "missing tensor" in _error(hf_to_mellama, variant("fewer", num_hidden_layers=3), capsys)
    assert "unknown tensor layers.1" in _error(hf_to_mellama, variant("more", num_hidden_layers=1), capsys)

    odd = tmp_path / "odd"
    make_hf(odd, MHA)
    from safetensors.torch import save_file
    tensors = load_file(odd / "model.safetensors")
    tensors["vision.weight"] = torch.zeros(2)
    save_file(tensors, odd / "model.safetensors", metadata={"format": "pt"})
    assert "not a LLaMA parameter name" in _error(hf_to_mellama, ["--hf-dir", str(odd), "--save", save], capsys)

    assert "no such directory" in _error(mellama_to_hf, ["--load", str(tmp_path / "x"), "--hf-dir", "y"], capsys)
    assert "--hf-dir" in _error(mellama_to_hf, ["--load", save], capsys)
    assert "--max-shard-size" in _error(mellama_to_hf, ["--load", save, "--hf-dir", "y", "--max-shard-size", "lots"],
                                        capsys)


@pytest.mark.slow
def test_export_drops_vocab_padding_and_wrappers_run_from_a_clone(tmp_path):
    from megatron_mellama.checkpoint.manager import CheckpointManager
    from megatron_mellama.config import parse_config
    from megatron_mellama.training.engine import Engine

    save = str(tmp_path / "ours")
    cfg = parse_config(["--model", "tiny", "--vocab-size", "100", "--make-vocab-size-divisible-by", "64",
                        "--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size", "1", "--save", save,
                        "--train-iters", "1"])
    engine = Engine(cfg)
    CheckpointManager(cfg, engine).save(5, 5)
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, str(REPO / "checkpoints_convert" / "mellama_to_hf.py"), "--load", save,
                           "--hf-dir", str(out), "--dtype", "bf16", "--no-progress"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 100 and model.dtype == torch.bfloat16
    (ours,) = engine.modules
    assert torch.equal(model.model.embed_tokens.weight, ours.embed_tokens.weight[:100].detach().bfloat16())


def test_tokenizer_model_ships_with_the_export(tmp_path, sentencepiece_model):
    import sentencepiece as spm

    make_hf(tmp_path / "hf", MHA)
    save, out = str(tmp_path / "ours"), tmp_path / "back"
    assert hf_to_mellama(["--hf-dir", str(tmp_path / "hf"), "--save", save, "--no-progress"]) == 0
    assert mellama_to_hf(["--load", save, "--hf-dir", str(out), "--no-progress",
                          "--tokenizer-model", sentencepiece_model]) == 0
    assert (out / "tokenizer.model").read_bytes() == Path(sentencepiece_model).read_bytes()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(out)
    except Exception as exc:  # transformers 5 converts tokenizer.model through protobuf
        pytest.skip(f"AutoTokenizer cannot read a tokenizer.model here: {type(exc).__name__}")
    text = "The patient was given 25 mg of aspirin."
    assert tok(text)["input_ids"] == [1] + spm.SentencePieceProcessor(model_file=sentencepiece_model).encode(text)


def test_imported_checkpoint_without_finetune_says_so(tmp_path):
    from megatron_mellama.checkpoint.layout import CheckpointError
    from megatron_mellama.checkpoint.manager import CheckpointManager
    from megatron_mellama.config import parse_config
    from megatron_mellama.training.engine import Engine

    make_hf(tmp_path / "hf", MHA)
    save = str(tmp_path / "ours")
    assert hf_to_mellama(["--hf-dir", str(tmp_path / "hf"), "--save", save, "--no-progress"]) == 0
    cfg = parse_config([a for a in _cfg_argv(MHA, save) if a != "--finetune"])
    with pytest.raises(CheckpointError, match="--finetune"):
        CheckpointManager(cfg, Engine(cfg)).load()
