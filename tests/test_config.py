"""Configuration: presets, precedence (defaults < preset < YAML < flags), validation messages."""

import copy
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from megatron_mellama.config import ConfigError, parse_config, read_given, resolve, validate
from megatron_mellama.config.sections import TOKENIZER_TYPES
from megatron_mellama.data import tokenizer as tokenizer_module
from megatron_mellama.pretrain import main as pretrain_main


def test_llama2_presets_have_the_published_shapes():
    m7 = parse_config(["--model", "llama2-7b"]).model
    assert (m7.num_layers, m7.hidden_size, m7.num_attention_heads, m7.kv_heads, m7.ffn_size) == (32, 4096, 32, 32, 11008)
    m13 = parse_config(["--model", "llama2-13b"]).model
    assert (m13.num_layers, m13.hidden_size, m13.num_attention_heads, m13.kv_heads, m13.ffn_size) == (40, 5120, 40, 40, 13824)
    m70 = parse_config(["--model", "llama2-70b"]).model
    assert (m70.num_layers, m70.hidden_size, m70.num_attention_heads, m70.kv_heads, m70.ffn_size) == (80, 8192, 64, 8, 28672)
    for m in (m7, m13, m70):
        assert (m.norm_epsilon, m.vocab_size, m.max_position_embeddings, m.rotary_base) == (1e-5, 32000, 4096, 10000.0)


def test_default_ffn_follows_llama_rule():
    # 8/3 x hidden rounded up to 256 reproduces 7B's and 13B's published widths
    for hidden, ffn in ((4096, 11008), (5120, 13824)):
        cfg = parse_config(["--num-layers", "2", "--hidden-size", str(hidden), "--num-attention-heads", "32" if hidden == 4096 else "40",
                            "--seq-length", "16", "--vocab-size", "100"])
        assert cfg.model.ffn_size == ffn


def test_megatron_flags_reach_their_fields():
    cfg = parse_config([
        "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "8", "--group-query-attention",
        "--num-query-groups", "2", "--ffn-hidden-size", "96", "--seq-length", "32", "--max-position-embeddings", "64",
        "--norm-epsilon", "1e-6", "--rotary-base", "500000", "--vocab-size", "1000",
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
        "--num-layers-per-virtual-pipeline-stage", "1", "--sequence-parallel",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "8e-6", "--min-lr", "8e-7",
        "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.05", "--weight-decay", "1e-5",
        "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--clip-grad", "1.0", "--bf16", "--train-iters", "10",
        "--data-path", "15", "bio", "1", "clin", "4", "gen", "--split", "949,50,1",
        "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", "tok.model",
        "--save", "ckpt", "--load", "ckpt", "--save-interval", "5", "--eval-interval", "5", "--eval-iters", "2",
        "--log-interval", "1", "--tensorboard-dir", "tb", "--seed", "7",
        # Megatron-LM LLaMA2 script flags that describe what is always done here
        "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
        "--position-embedding-type", "rope", "--attention-dropout", "0", "--hidden-dropout", "0.0",
        "--use-flash-attn", "--no-masked-softmax-fusion",
    ], world_size=8)
    m, p, d, o, t = cfg.model, cfg.parallel, cfg.data, cfg.optim, cfg.train
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.kv_heads, m.ffn_size) == (4, 64, 8, 2, 96)
    assert (m.norm_epsilon, m.rotary_base, m.vocab_size, m.max_position_embeddings) == (1e-6, 500000.0, 1000, 64)
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.data_parallel_size) == (2, 2, 2)
    assert p.sequence_parallel and p.pipeline_schedule == "interleaved-1f1b"
    assert (t.micro_batch_size, t.global_batch_size, cfg.num_microbatches) == (2, 8, 2)
    assert (o.lr, o.min_lr, o.lr_warmup_fraction, o.weight_decay, o.adam_beta2) == (8e-6, 8e-7, 0.05, 1e-5, 0.95)
    assert d.data_path == ["15", "bio", "1", "clin", "4", "gen"] and d.seq_length == 32
    assert t.bf16 and t.train_iters == 10 and t.seed == 7
    assert cfg.checkpoint.save == "ckpt" and cfg.logging.tensorboard_dir == "tb"


def test_precedence_defaults_preset_yaml_flags(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("model: llama2-7b\nnum-layers: 4\nlr: 1e-5\nmicro_batch_size: 2\n"
                         "data-path: 15 bio 1 clin 4 gen\ntokenizer-model: tok.model\nbf16: true\n")
    cfg = parse_config(["--config", str(yaml_file), "--lr", "3e-5"])
    assert cfg.model.hidden_size == 4096  # preset
    assert cfg.model.num_layers == 4  # YAML over preset
    assert cfg.optim.lr == 3e-5  # flag over YAML
    assert cfg.train.micro_batch_size == 2 and cfg.train.bf16
    assert cfg.data.data_path == ["15", "bio", "1", "clin", "4", "gen"]
    assert cfg.optim.weight_decay == 0.01  # untouched default
    # a preset on the command line beats the one in the file
    assert parse_config(["--config", str(yaml_file), "--model", "llama2-13b"]).model.hidden_size == 5120


def test_vocab_size_from_tokenizer_unless_given(sentencepiece_model):
    def vocab_of(data):
        return tokenizer_module.build_tokenizer(data.tokenizer_type, data.tokenizer_model).vocab_size

    base = ["--model", "tiny", "--tokenizer-model", sentencepiece_model]
    assert parse_config(base, vocab_size_of=vocab_of).model.vocab_size == 400
    assert parse_config(base + ["--vocab-size", "512"], vocab_size_of=vocab_of).model.vocab_size == 512
    assert parse_config(["--model", "tiny"], vocab_size_of=vocab_of).model.vocab_size == 32000


def test_tokenizer_types_agree_with_the_tokenizer_module():
    assert set(TOKENIZER_TYPES) == set(tokenizer_module.TOKENIZER_TYPES)


INVALID = [
    (["--model", "tiny", "--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size"),
    (["--model", "llama2-70b", "--tensor-model-parallel-size", "16"], "--tensor-model-parallel-size"),
    (["--model", "tiny", "--tensor-model-parallel-size", "4"], "--num-query-groups"),  # 4 heads, 2 KV heads
    (["--model", "tiny", "--pipeline-model-parallel-size", "3"], "--pipeline-model-parallel-size"),
    (["--model", "tiny", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"],
     "--num-layers-per-virtual-pipeline-stage"),
    (["--model", "tiny", "--num-layers-per-virtual-pipeline-stage", "1"], "--pipeline-model-parallel-size"),
    (["--model", "tiny", "--micro-batch-size", "2", "--global-batch-size", "7"], "--global-batch-size"),
    (["--model", "tiny", "--seq-length", "1024"], "--seq-length"),
    (["--model", "tiny", "--num-attention-heads", "5"], "--num-attention-heads"),
    (["--model", "tiny", "--num-query-groups", "3"], "--num-query-groups"),
    (["--model", "tiny", "--num-layers", "0"], "--num-layers"),
    (["--model", "tiny", "--hidden-size", "-64"], "--hidden-size"),
    (["--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "8", "--vocab-size", "10"], "--num-layers"),
    (["--model", "tiny", "--bf16", "--fp16"], "--fp16"),
    (["--model", "tiny", "--train-iters", "10", "--train-samples", "100"], "--train-samples"),
    (["--model", "tiny", "--lr", "1e-4", "--min-lr", "1e-3"], "--min-lr"),
    (["--model", "tiny", "--lr-warmup-fraction", "1.5"], "--lr-warmup-fraction"),
    (["--model", "tiny", "--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "5"], "--lr-warmup-iters"),
    (["--model", "tiny", "--adam-beta2", "1.0"], "--adam-beta2"),
    (["--model", "tiny", "--weight-decay", "-1"], "--weight-decay"),
    (["--model", "tiny", "--lr-decay-style", "exponential"], "--lr-decay-style"),
    (["--model", "tiny", "--kernel-backend", "cudnn"], "--kernel-backend"),
    (["--model", "tiny", "--num-layers", "four"], "--num-layers"),
    (["--model", "llama2-8b"], "--model"),
    (["--model", "tiny", "--data-path", "15", "bio", "1"], "--data-path"),
    (["--model", "tiny", "--data-path", "heavy", "bio", "1", "clin"], "--data-path"),
    (["--model", "tiny", "--data-path", "-1", "bio", "1", "clin"], "--data-path"),
    (["--model", "tiny", "--split", "90,x,1"], "--split"),
    (["--model", "tiny", "--data-path", "bio"], "--tokenizer-model"),
    (["--model", "tiny", "--normalization", "LayerNorm"], "--normalization"),
    (["--model", "tiny", "--hidden-dropout", "0.1"], "--hidden-dropout"),
    (["--model", "tiny", "--position-embedding-type", "learned_absolute"], "--position-embedding-type"),
    (["--model", "tiny", "--vocab-size", "32001", "--tensor-model-parallel-size", "2"], "--make-vocab-size-divisible-by"),
    (["--model", "tiny", "--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "127"],
     "--sequence-parallel"),
    (["--model", "tiny", "--data-parallel-replicate-size", "2"], "--data-parallel-replicate-size"),
    (["--model", "tiny", "--config", "/nonexistent/run.yaml"], "--config"),
    (["--model", "tiny", "--lr-decay-style", "WSD"], "--lr-wsd-decay-iters"),
    (["--model", "tiny", "--train-iters", "5", "--lr-warmup-iters", "5"], "--lr-warmup-iters"),
    (["--model", "tiny", "--train-iters", "10", "--lr-warmup-samples", "5"], "--lr-warmup-samples"),
    (["--model", "tiny", "--train-samples", "100", "--lr-decay-iters", "5"], "--lr-decay-iters"),
    # non-finite numbers (issue 14): inf/nan parse as floats and used to pass or read as negative
    (["--model", "tiny", "--data-path", "inf", "bio", "1", "clin"], "--data-path"),
    (["--model", "tiny", "--data-path", "nan", "bio", "1", "clin"], "--data-path"),
    (["--model", "tiny", "--data-path", "1e400", "bio", "1", "clin"], "--data-path"),
    (["--model", "tiny", "--lr", "nan"], "--lr"),
    (["--model", "tiny", "--lr", "inf"], "--lr"),
    (["--model", "tiny", "--clip-grad", "inf"], "--clip-grad"),
    (["--model", "tiny", "--exit-duration-in-mins", "nan"], "--exit-duration-in-mins"),
    (["--model", "tiny", "--split", "inf,1,1"], "--split"),
    (["--model", "tiny", "--split", "nan"], "--split"),
    # degenerate splits: no training part
    (["--model", "tiny", "--split", "0,1,0"], "--split"),
    (["--model", "tiny", "--split", "0,0,1"], "--split"),
    (["--model", "tiny", "--split", "0"], "--split"),
    (["--model", "tiny", "--split", "1,2,3,4"], "--split"),
    # a run of zero iterations
    (["--model", "tiny", "--global-batch-size", "4", "--train-samples", "3"], "--train-samples"),
    (["--model", "tiny", "--max-skipped-steps", "-1"], "--max-skipped-steps"),
    (["--model", "tiny", "--attention-dropout", "nan"], "--attention-dropout"),
]


@pytest.mark.parametrize("argv,flag", INVALID, ids=[" ".join(a[2:]) or a[1] for a, _ in INVALID])
def test_invalid_configuration_is_one_line_naming_the_flag(argv, flag, capsys):
    with pytest.raises(ConfigError) as err:
        parse_config(argv)
    assert flag in str(err.value) and "\n" not in str(err.value)
    # and through the command-line entry point: exit code 2, one line on stderr, no traceback
    assert pretrain_main(argv) == 2
    err_text = capsys.readouterr().err
    assert err_text.count("\n") == 1 and flag in err_text and "Traceback" not in err_text


@pytest.mark.parametrize("argv,flag", [
    (["--pipeline-model-parallel-size", "2", "--global-batch-size", "1"], "--global-batch-size"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--global-batch-size", "3"], "--global-batch-size"),
    (["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "zero-bubble", "--global-batch-size", "2",
      "--compile"], "--compile"),
])
def test_pipeline_batch_checks(argv, flag):
    with pytest.raises(ConfigError) as err:
        parse_config(["--model", "tiny"] + argv, world_size=2)
    assert flag in str(err.value) and "\n" not in str(err.value)


def test_zero_bubble_is_refused_before_torch_2_13(monkeypatch):
    argv = ["--model", "tiny", "--pipeline-model-parallel-size", "2", "--pipeline-schedule", "zero-bubble",
            "--global-batch-size", "2"]
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.12.0+cu130"))
    with pytest.raises(ConfigError, match="zero-bubble needs torch 2.13 or newer, not 2.12.0"):
        parse_config(argv, world_size=2)
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.13.0"))
    assert parse_config(argv, world_size=2).parallel.pipeline_schedule == "zero-bubble"


def test_world_size_must_be_a_multiple_of_model_parallel_size():
    with pytest.raises(ConfigError, match="--tensor-model-parallel-size 2 x --pipeline-model-parallel-size 2"):
        parse_config(["--model", "tiny", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
                     world_size=6)
    with pytest.raises(ConfigError, match="data-parallel size 2"):
        parse_config(["--model", "tiny", "--micro-batch-size", "2", "--global-batch-size", "6"], world_size=2)


@pytest.mark.parametrize("content,needle", [
    ("num-layerz: 4\n", "did you mean 'num-layers'"),
    ("lr: fast\n", "key 'lr' expects a number"),
    ("num-layers: 4.5\n", "key 'num-layers' expects an integer"),
    ("bf16: 1\n", "key 'bf16' expects true or false"),
    ("lr: [1\n", "not valid YAML"),
    ("- lr\n- 1\n", "expected a mapping"),
    ("model: llama2-8b\n", "key 'model'"),
    ("lr-decay-style: exponential\n", "key 'lr-decay-style'"),
    # issue 14: a YAML value gets the refusal the same value gets on the command line
    ("lr: .inf\n", "key 'lr' expects a finite number"),
    ("lr: .nan\n", "key 'lr' expects a finite number"),
    ("swiglu: false\n", "key 'swiglu': --swiglu false: only true"),
    ("disable-bias-linear: false\n", "key 'disable-bias-linear': --disable-bias-linear false"),
    ("untie-embeddings-and-output-weights: false\n", "--untie-embeddings-and-output-weights false"),
    ("use-rotary-position-embeddings: no\n", "--use-rotary-position-embeddings false"),
    ("normalization: LayerNorm\n", "key 'normalization': --normalization LayerNorm: only RMSNorm"),
    ("position-embedding-type: learned_absolute\n", "'learned_absolute' is not one of rope, yarn"),
    ("position_embedding_type: [rope]\n", "key 'position_embedding_type' expects a string"),
    ("hidden-dropout: 0.1\n", "--hidden-dropout 0.1: only 0.0"),
    ("attention-dropout: lots\n", "--attention-dropout lots: only 0.0"),
    ("attention-dropout: true\n", "--attention-dropout True: only 0.0"),
    ("transformer-impl: fused\n", "--transformer-impl fused: expected one of"),
])
def test_yaml_errors_name_the_file_and_key(tmp_path, content, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        parse_config(["--model", "tiny", "--config", str(path)])
    assert str(path) in str(err.value) and needle in str(err.value)


def test_yaml_may_repeat_what_llama2_always_is(tmp_path):
    path = tmp_path / "llama2.yaml"
    path.write_text("swiglu: true\ndisable-bias-linear: true\nuntie-embeddings-and-output-weights: true\n"
                    "normalization: RMSNorm\nposition-embedding-type: rope\nattention-dropout: 0\n"
                    "hidden-dropout: 0.0\ntransformer-impl: local\n")
    assert parse_config(["--model", "tiny", "--config", str(path)]).preset == "tiny"


@pytest.mark.parametrize("kind", ["directory", "unreadable", "binary"])
def test_config_that_is_not_a_readable_yaml_file_is_one_line(tmp_path, kind, capsys, monkeypatch):
    path = tmp_path / "run.yaml"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"\xff\xfe\x00lr: 1\n")
    else:
        path.write_text("lr: 1e-4\n")
        path.chmod(0)
        if os.access(path, os.R_OK):  # root reads anything: refuse the way the system would
            def refused(file, *args, **kwargs):
                raise PermissionError(13, "Permission denied", str(file))

            from megatron_mellama.config import cli
            monkeypatch.setattr(cli, "open", refused, raising=False)
    with pytest.raises(ConfigError) as err:
        parse_config(["--model", "tiny", "--config", str(path)])
    message = str(err.value)
    assert message.startswith(f"--config {path}: ") and "\n" not in message
    assert pretrain_main(["--model", "tiny", "--mock-data", "--config", str(path)]) == 2
    err_text = capsys.readouterr().err
    assert err_text.count("\n") == 1 and "--config" in err_text and "Traceback" not in err_text


@pytest.mark.parametrize("weight", ["nan", "inf", "1e999"])
def test_non_finite_data_path_weight_is_named_as_such(weight):
    with pytest.raises(ConfigError, match=f"--data-path: weight {weight} of 'bio' is not a finite number"):
        parse_config(["--model", "tiny", "--data-path", weight, "bio", "1", "clin"])


def test_max_skipped_steps_has_a_finite_default_and_zero_disables():
    assert parse_config(["--model", "tiny"]).train.max_skipped_steps == 10
    assert parse_config(["--model", "tiny", "--max-skipped-steps", "0"]).train.max_skipped_steps == 0


def test_missing_tokenizer_model_names_the_flag(tmp_path, capsys):
    missing = str(tmp_path / "nope.model")
    assert pretrain_main(["--model", "tiny", "--mock-data", "--tokenizer-model", missing]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer-model" in err and missing in err and err.count("\n") == 1


@pytest.mark.slow
def test_command_line_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "megatron_mellama.pretrain", "--model", "tiny",
                           "--tensor-model-parallel-size", "3", "--mock-data"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--tensor-model-parallel-size 3" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("argv, once", [
    (["--data-parallel-sharding", "optimizer"], True),  # Megatron-LM's distributed optimizer
    (["--use-distributed-optimizer"], True),
    (["--data-parallel-sharding", "full"], False),  # ZeRO-3 shards to save memory
    (["--data-parallel-sharding", "none"], False),  # DDP reduces once per step by itself
    (["--data-parallel-sharding", "optimizer", "--no-reduce-grads-once-per-step"], False),
    (["--data-parallel-sharding", "full", "--reduce-grads-once-per-step"], True),
])
def test_reduce_grads_once_per_step_defaults_by_sharding_mode(argv, once, tmp_path):
    assert parse_config(["--model", "tiny"] + argv, world_size=2).parallel.reduce_grads_once_per_step is once
    recipe = tmp_path / "run.yaml"
    recipe.write_text("data-parallel-sharding: optimizer\nreduce-grads-once-per-step: false\n")
    assert parse_config(["--model", "tiny", "--config", str(recipe)], world_size=2).parallel.reduce_grads_once_per_step \
        is False
    with pytest.raises(ConfigError, match="--reduce-grads-once-per-step is for --data-parallel-sharding"):
        parse_config(["--model", "tiny", "--reduce-grads-once-per-step"], world_size=2)


# every derived value is set by resolve(); validate() only reads
DERIVED = [
    (["--model", "tiny"], 1),
    (["--model", "tiny", "--micro-batch-size", "2"], 4),  # the global batch: micro x DP
    (["--model", "tiny", "--use-distributed-optimizer"], 2),  # optimizer sharding, grads reduced once
    (["--model", "tiny", "--data-parallel-sharding", "full", "--tensor-model-parallel-size", "2",
      "--sequence-parallel"], 4),
    (["--model", "tiny", "--sequence-parallel"], 1),  # off at TP 1
    (["--model", "tiny", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--global-batch-size", "4"], 2),
    (["--model", "tiny", "--sft", "--data-path", "conv", "--tokenizer-model", "tok.model"], 1),
    (["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
      "--vocab-size", "100", "--make-vocab-size-divisible-by", "64"], 1),
]


@pytest.mark.parametrize("argv,world", DERIVED)
def test_validate_only_reads_what_resolve_derived(argv, world):
    cfg, taken = resolve(read_given(argv), world_size=world)
    assert taken == [] and cfg.parallel.world_size == world and cfg.train.global_batch_size is not None
    assert cfg.parallel.reduce_grads_once_per_step is not None
    resolved = copy.deepcopy(cfg)
    validate(cfg)
    assert cfg == resolved
    assert cfg == parse_config(argv, world_size=world)
    assert set(vars(cfg)) == {f.name for f in dataclasses.fields(cfg)}  # declared fields only


@pytest.mark.parametrize("argv,flag", INVALID, ids=[" ".join(a[2:]) or a[1] for a, _ in INVALID])
def test_validate_refuses_without_changing_the_config(argv, flag):
    try:
        cfg, _ = resolve(read_given(argv))
    except ConfigError:
        return  # refused while reading the flags or the file: nothing to validate
    resolved = copy.deepcopy(cfg)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert flag in str(err.value) and cfg == resolved


def test_resolve_takes_the_recorded_model_values_the_run_did_not_set():
    recorded = dict(rotary_base=500000.0, norm_epsilon=1e-6, num_layers=99)
    cfg, taken = resolve(read_given(["--model", "tiny"]), recorded_model=recorded)
    assert (cfg.model.rotary_base, cfg.model.norm_epsilon, cfg.model.num_layers) == (500000.0, 1e-6, 4)
    assert taken == ["--norm-epsilon 1e-06: the checkpoint's value (this run did not set --norm-epsilon; "
                     "it would have used 1e-05)",
                     "--rotary-base 500000.0: the checkpoint's value (this run did not set --rotary-base; "
                     "it would have used 10000.0)"]
    cfg, taken = resolve(read_given(["--model", "tiny", "--rotary-base", "10000"]), recorded_model=recorded)
    assert (cfg.model.rotary_base, cfg.model.norm_epsilon) == (10000.0, 1e-6) and len(taken) == 1
