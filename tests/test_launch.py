"""Launch scripts and the Me-LLaMA recipes: syntax, dry runs, and the YAML files through the parser."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest
from port_helpers import reserved_port

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
    # as outside a job, and with the thread count the scripts derive themselves
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "OMP_NUM_THREADS"}
    env.update(extra)
    return env


def _run(script, *args, **env):
    return subprocess.run(["bash", str(REPO / script), *args], env=_env(**env), cwd=REPO,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_torchrun_dry_run_passes_flags_through():
    result = _run("launch/torchrun_single_node.sh", *PASS_THROUGH, DRY_RUN="1", GPUS_PER_NODE="4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    argv = shlex.split(lines[0])
    assert argv[:8] == ["torchrun", "--standalone", "--nproc-per-node", "4", "--max-restarts", "3", "-m",
                        "megatron_mellama.pretrain"]
    assert argv[8:] == PASS_THROUGH
    # arguments with spaces survive as one argument
    result = _run("launch/torchrun_single_node.sh", "--save", "my ckpt", DRY_RUN="1")
    assert shlex.split(result.stdout)[-2:] == ["--save", "my ckpt"]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["launch/torchrun_single_node.sh", "launch/slurm_multi_node.sbatch"])
def test_max_restarts_comes_from_the_environment(script):
    for setting, expected in ((None, "3"), ("0", "0"), ("7", "7")):
        env = dict(DRY_RUN="1", DRY_RUN_NODES="node1 node2")
        if setting is not None:
            env["MAX_RESTARTS"] = setting
        result = _run(script, "--mock-data", **env)
        assert result.returncode == 0, result.stderr
        for line in result.stdout.strip().splitlines():
            argv = shlex.split(line.split(" ", 1)[1] if line.startswith("[") else line)
            assert argv[argv.index("--max-restarts") + 1] == expected
            assert argv.index("--max-restarts") < argv.index("-m")


@pytest.mark.slow
def test_torchrun_defaults_to_one_process_without_gpus(tmp_path):
    # no nvidia-smi on PATH: one process
    result = _run("launch/torchrun_single_node.sh", "--mock-data", DRY_RUN="1",
                  PATH=f"{tmp_path}:/usr/bin:/bin")
    argv = shlex.split(result.stdout)
    assert argv[argv.index("--nproc-per-node") + 1] == "1"


@pytest.mark.slow
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


@pytest.mark.slow
def test_sbatch_outside_slurm_without_nodes_says_how():
    result = _run("launch/slurm_multi_node.sbatch", "--bf16", DRY_RUN="1")
    assert result.returncode == 2 and "DRY_RUN_NODES" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("size,world", [("13b", 64), ("70b", 128), ("13b_long", 64)])
def test_run_script_starts_from_the_import_then_resumes_with_one_command_line(tmp_path, size, world):
    """Every launch of the job (the first, a resubmission, `scontrol requeue`) carries the same
    flags; --pretrained-checkpoint makes the first start from the imported weights as --finetune
    does and every later one resume --save."""
    from megatron_mellama.checkpoint.pretrained_start import resolve_start

    script = f"examples/me_llama/run_{size}.sh"
    save, imported = tmp_path / "save", tmp_path / "imp"
    imported.mkdir()
    (imported / "latest").write_text("0")
    first = _run(script, "train", DRY_RUN="1", SAVE=str(save), IMPORTED=str(imported))
    assert first.returncode == 0, first.stderr
    submit = shlex.split(first.stdout.strip().splitlines()[-1])
    assert submit[0] == "sbatch" and "launch/slurm_multi_node.sbatch" in submit
    assert f"examples/me_llama/me_llama_{size}.yaml" in submit
    assert submit[submit.index("--pretrained-checkpoint") + 1] == str(imported)
    assert "--finetune" not in submit and "--load" not in submit
    assert ("--extend-context" in submit) == size.endswith("long")
    flags = submit[submit.index("launch/slurm_multi_node.sbatch") + 1:]
    cfg = parse_config(flags, world_size=world)
    resolve_start(cfg)
    assert (cfg.checkpoint.load, cfg.checkpoint.finetune) == (str(imported), True)
    assert cfg.checkpoint.extend_context == size.endswith("long")
    save.mkdir()
    (save / "latest").write_text("500")
    again = shlex.split(_run(script, "train", DRY_RUN="1", SAVE=str(save), IMPORTED=str(imported)).stdout.splitlines()[-1])
    assert again == submit
    cfg = parse_config(flags, world_size=world)
    resolve_start(cfg)
    assert (cfg.checkpoint.load, cfg.checkpoint.finetune, cfg.checkpoint.extend_context) == (str(save), False, False)
    for step in ("prepare", "export"):
        assert _run(script, step, DRY_RUN="1").returncode == 0


def test_the_long_context_recipe_is_the_planned_layout():
    cfg = parse_config(["--config", str(REPO / "examples/me_llama/me_llama_13b_long.yaml")], world_size=64)
    p, d, m = cfg.parallel, cfg.data, cfg.model
    assert (p.tensor_model_parallel_size, p.context_parallel_size, p.data_parallel_size) == (4, 2, 8)
    assert d.seq_length == m.max_position_embeddings == 32768 and m.rotary_base == 500000
    assert cfg.train.global_batch_size * d.seq_length == 1024 * 4096  # the 4k recipe's tokens per step
    assert not cfg.checkpoint.extend_context  # given on the command line by run.sh


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


# --- signals and exit codes, with stand-ins for SLURM's commands --------------------------------
# The real thing runs in tests/test_slurm.py where SLURM is installed; these run everywhere.

SIGUSR1, SIGTERM = 10, 15


def _ignored(status_line: str) -> set[int]:
    """The signals a `SigIgn:` line of /proc/<pid>/status marks as ignored."""
    mask = int(status_line.split()[1], 16)
    return {sig for sig in range(1, 65) if mask >> (sig - 1) & 1}


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")


@pytest.mark.slow
@needs_proc
def test_torchrun_single_node_ignores_usr1_and_keeps_sigterm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # a torchrun that reports what it inherited
    _stub(bin_dir, "torchrun", 'grep SigIgn /proc/$$/status\necho "args $*"\n')
    result = _run("launch/torchrun_single_node.sh", "--mock-data", GPUS_PER_NODE="1",
                  PATH=f"{bin_dir}:/usr/bin:/bin")
    assert result.returncode == 0, result.stderr
    ignored = _ignored(result.stdout.splitlines()[0])
    assert SIGUSR1 in ignored and SIGTERM not in ignored
    assert "-m megatron_mellama.pretrain --mock-data" in result.stdout


def _fake_slurm(tmp_path, nodes=("n1", "n2")):
    """scontrol, srun and python stand-ins: srun runs its command once per node, in parallel, and
    like `srun --kill-on-bad-exit` reports 143 when any task failed; the per-node `python` records
    its arguments and inherited ignored signals, waits FAKE_DELAY_<node> s and exits FAKE_EXIT_<node>."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    _stub(bin_dir, "scontrol", 'echo "$FAKE_NODES" | tr " " "\\n"\n')
    _stub(bin_dir, "srun", f'''printf '%s\\n' "$@" > {log}/srun_args
env > {log}/srun_env
while [[ "$1" != bash ]]; do shift; done
pids=()
for node in $FAKE_NODES; do SLURMD_NODENAME=$node "$@" & pids+=($!); done
code=0
for pid in "${{pids[@]}}"; do wait "$pid" || code=143; done
exit $code
''')
    _stub(bin_dir, "python", f'''node=$SLURMD_NODENAME
grep SigIgn /proc/$$/status > {log}/sigign_$node
printf '%s\\0' "$@" > {log}/argv_$node
delay=FAKE_DELAY_$node; sleep "${{!delay:-0}}"
code=FAKE_EXIT_$node; exit "${{!code:-0}}"
''')
    env = dict(PATH=f"{bin_dir}:/usr/bin:/bin", FAKE_NODES=" ".join(nodes), SLURM_JOB_NODELIST="n[1-2]",
               SLURM_JOB_ID="77", SLURM_NNODES=str(len(nodes)), SLURM_CPUS_PER_TASK="16", GPUS_PER_NODE="2",
               REPO_DIR=str(REPO), EXIT_CODE_DIR=str(tmp_path / "exit-codes"))
    return log, env


@pytest.mark.slow
@needs_proc
def test_sbatch_node_command_signals_and_srun_options(tmp_path):
    log, env = _fake_slurm(tmp_path)
    result = _run("launch/slurm_multi_node.sbatch", *PASS_THROUGH, **env)
    assert result.returncode == 0, result.stderr
    srun_args = (log / "srun_args").read_text().splitlines()
    assert "--kill-on-bad-exit=1" in srun_args
    srun_env = dict(line.split("=", 1) for line in (log / "srun_env").read_text().splitlines() if "=" in line)
    assert srun_env["SRUN_CPUS_PER_TASK"] == "16" and srun_env["OMP_NUM_THREADS"] == "8"
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in srun_env
    for node in ("n1", "n2"):
        ignored = _ignored((log / f"sigign_{node}").read_text())
        assert SIGUSR1 in ignored and SIGTERM not in ignored
        # python -c <launcher> <torchrun's arguments>: the same arguments the dry run prints
        argv = (log / f"argv_{node}").read_text().split("\0")[:-1]
        assert argv[0] == "-c" and "torch.distributed.run" in argv[1]
        assert argv[2:4] == ["--nnodes", "2"] and argv[-len(PASS_THROUGH):] == PASS_THROUGH
        assert f"exit code 0 on {node}" in result.stdout
    assert not (tmp_path / "exit-codes").exists()


@pytest.mark.slow
@pytest.mark.parametrize("first,code", [("n1", 2), ("n2", 1)])
def test_sbatch_exits_with_the_first_failing_nodes_code(tmp_path, first, code):
    log, env = _fake_slurm(tmp_path)
    other = "n2" if first == "n1" else "n1"
    # the other node is then stopped by srun --kill-on-bad-exit: 143, and srun itself says 143
    env.update({f"FAKE_EXIT_{first}": str(code), f"FAKE_EXIT_{other}": "143", f"FAKE_DELAY_{other}": "0.5"})
    result = _run("launch/slurm_multi_node.sbatch", "--bf16", **env)
    assert result.returncode == code, result.stdout + result.stderr
    assert f"exit code {code} on {first}" in result.stdout and f"exit code 143 on {other}" in result.stdout
    assert f"job exit code {code}, from {first}" in result.stderr


@pytest.mark.slow
def test_sbatch_launcher_returns_the_trainers_exit_code(tmp_path):
    """The real launcher (torchrun's entry point) on one node: a configuration error exits 2, where
    torchrun itself would exit 1."""
    log, env = _fake_slurm(tmp_path, nodes=("n1",))
    (tmp_path / "bin" / "python").unlink()
    port = reserved_port()
    env.update(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", GPUS_PER_NODE="1", SLURM_JOB_NODELIST="n1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SLURM_CPUS_PER_TASK="1")
    result = subprocess.run(["bash", str(REPO / "launch/slurm_multi_node.sbatch"), "--model", "tiny", "--mock-data",
                             "--train-iters", "1", "--micro-batch-size", "3", "--global-batch-size", "4"],
                            env=_env(**env), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "exit code 2 on n1" in result.stdout
