"""Launch scripts and the Me-LLaMA recipes: syntax, dry runs, and the YAML files through the parser."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from megatron_mellama.config import parse_config

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["launch/torchrun_single_node.sh", "launch/slurm_multi_node.sbatch",
           "examples/me_llama/run.sh", "examples/me_llama/run_13b.sh", "examples/me_llama/run_70b.sh",
           "examples/quickstart.sh"]
PASS_THROUGH = ["--config", "examples/me_llama/me_llama_13b.yaml", "--data-path", "15", "data/bio_text_document",
                "1", "data/clin_text_document", "4", "data/gen_text_document", "--lr", "8e-6", "--bf16"]
# the GPU count each recipe's layout is written for
RECIPES = {"examples/me_llama/me_llama_13b.yaml": 64, "examples/me_llama/me_llama_70b.yaml": 128}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # as outside a job
    env.update(extra)
    return env


def _run(script, *args, **env):
    return subprocess.run(["bash", str(REPO / script), *args], env=_env(**env), cwd=REPO,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_torchrun_dry_run_passes_flags_through():
    result = _run("launch/torchrun_single_node.sh", *PASS_THROUGH, DRY_RUN="1", GPUS_PER_NODE="4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    argv = shlex.split(lines[0])
    assert argv[:6] == ["torchrun", "--standalone", "--nproc-per-node", "4", "-m", "megatron_mellama.pretrain"]
    assert argv[6:] == PASS_THROUGH
    # arguments with spaces survive as one argument
    result = _run("launch/torchrun_single_node.sh", "--save", "my ckpt", DRY_RUN="1")
    assert shlex.split(result.stdout)[-2:] == ["--save", "my ckpt"]


def test_torchrun_defaults_to_one_process_without_gpus(tmp_path):
    # no nvidia-smi on PATH: one process
    result = _run("launch/torchrun_single_node.sh", "--mock-data", DRY_RUN="1",
                  PATH=f"{tmp_path}:/usr/bin:/bin")
    argv = shlex.split(result.stdout)
    assert argv[argv.index("--nproc-per-node") + 1] == "1"


def test_sbatch_dry_run_prints_one_command_per_node():
    result = _run("launch/slurm_multi_node.sbatch", *PASS_THROUGH, DRY_RUN="1", DRY_RUN_NODES="node1 node2",
                  GPUS_PER_NODE="8", MASTER_PORT="29555")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["[node1]", "[node2]"]
    for line in lines:
        argv = shlex.split(line.split(" ", 1)[1])
        assert argv[0] == "torchrun"
        opt = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
        assert opt("--nnodes") == "2" and opt("--nproc-per-node") == "8"
        assert opt("--rdzv-backend") == "c10d" and opt("--rdzv-endpoint") == "node1:29555"
        assert argv.index("-m") < argv.index("megatron_mellama.pretrain")
        assert argv[argv.index("megatron_mellama.pretrain") + 1:] == PASS_THROUGH


def test_sbatch_outside_slurm_without_nodes_says_how():
    result = _run("launch/slurm_multi_node.sbatch", "--bf16", DRY_RUN="1")
    assert result.returncode == 2 and "DRY_RUN_NODES" in result.stderr


@pytest.mark.parametrize("size", ["13b", "70b"])
def test_run_script_finetunes_first_then_resumes(tmp_path, size):
    script = f"examples/me_llama/run_{size}.sh"
    save = tmp_path / "save"
    first = _run(script, "train", DRY_RUN="1", SAVE=str(save), IMPORTED="imp")
    assert first.returncode == 0, first.stderr
    submit = shlex.split(first.stdout.strip().splitlines()[-1])
    assert submit[0] == "sbatch" and "launch/slurm_multi_node.sbatch" in submit
    assert f"examples/me_llama/me_llama_{size}.yaml" in submit
    assert submit[submit.index("--load") + 1] == "imp" and "--finetune" in submit
    save.mkdir()
    (save / "latest").write_text("500")
    again = shlex.split(_run(script, "train", DRY_RUN="1", SAVE=str(save), IMPORTED="imp").stdout.splitlines()[-1])
    assert again[again.index("--load") + 1] == str(save) and "--finetune" not in again
    for step in ("prepare", "export"):
        assert _run(script, step, DRY_RUN="1").returncode == 0


@pytest.mark.parametrize("path", sorted(RECIPES))
def test_me_llama_recipes_load_and_match_the_paper(path):
    cfg = parse_config(["--config", str(REPO / path)], world_size=RECIPES[path])
    o, d, t, p = cfg.optim, cfg.data, cfg.train, cfg.parallel
    assert (o.lr, o.lr_decay_style, o.lr_warmup_fraction) == (8e-6, "cosine", 0.05)
    assert 0 < o.min_lr < o.lr
    assert (o.adam_beta1, o.adam_beta2, o.weight_decay, o.clip_grad) == (0.9, 0.95, 1e-5, 1.0)
    assert t.bf16 and not t.fp16 and d.seq_length == 4096 and d.tokenizer_type == "Llama2Tokenizer"
    assert d.data_path == ["15", "data/bio_text_document", "1", "data/clin_text_document",
                           "4", "data/gen_text_document"]
    assert t.global_batch_size * d.seq_length == 1024 * 4096
    assert p.sequence_parallel and p.data_parallel_sharding == "optimizer"
    assert cfg.preset == ("llama2-13b" if "13b" in path else "llama2-70b")
    if "13b" in path:
        assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.data_parallel_size) == (4, 1, 16)
    else:
        assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.data_parallel_size) == (8, 4, 4)
    for value in (cfg.checkpoint.save_interval, t.eval_interval, t.eval_iters, cfg.logging.log_interval):
        assert value and value > 0
    assert cfg.logging.tensorboard_dir and cfg.logging.log_file
