#!/usr/bin/env bash
# A self-check for a new GPU node (one GPU), to run before a long job. About 7 minutes at most on one
# H100/H200, start-up included:
#
#   bash benchmarks/gpu_check.sh          # on the GPU node
#   bash benchmarks/gpu_check.sh --cpu    # the same steps on the CPU at tiny shapes (a smoke test)
#
# Steps, each under its own time limit; a failing step is reported and the next one still runs:
#   triton_tests  the Triton kernel tests on the GPU, without the interpreter, and what only CUDA can
#                 show (tests/test_gpu_paths.py: compiled flex attention under a context-parallel
#                 rank's BlockMask against dense attention in bf16, the mask built without a host
#                 sync; the fused loss's per-row sums bit for bit; every private torch name resolving)
#   kernels       benchmarks/kernel_speed.py --check at the ~1B shape in bf16: every backend against the
#                 torch reference, the fused loss's memory, the engine with each backend
#   engine        benchmarks/engine.py: the engine beside transformers at sequence 4096, with MFU
#   resume        a 1-GPU bf16 pretrain of 20 iterations, against one stopped at 10 and resumed from
#                 its checkpoint: iterations 11-20 must log the same lm_loss and grad_norm; all three
#                 runs use one fixed kernel backend (the kernels step checks the backends)
# The table of results is printed last; the exit status is non-zero when any step failed.
#
# Environment:
#   GPU_CHECK_DEVICE=cpu         same as --cpu
#   GPU_CHECK_STEPS=a,b          run only these steps (names above)
#   GPU_CHECK_TIMEOUT_<STEP>=s   a step's time limit in seconds (e.g. GPU_CHECK_TIMEOUT_ENGINE=200)
#   GPU_CHECK_PEAK_TFLOPS=989    dense bf16 peak for MFU (H100/H200 SXM 989; H100 PCIe 756; A100 312)
#   GPU_CHECK_RESUME_KERNELS=torch  the --kernel-backend of the resume step's runs: torch, triton, te
#                                or apex, not auto (which times kernels at each start and may pick
#                                differently after the restart)
#   GPU_CHECK_RESUME_RTOL=1e-3   allowed relative difference after the resume, used only when two
#                                identical runs already differ before the save (not bitwise
#                                reproducible on this device)
#   GPU_CHECK_LOG_DIR=dir        where each step's full log goes (default $OUT/gpu_check when OUT is
#                                set, else a new temporary folder)
#   GPU_CHECK_PYTHON=python3     the interpreter to use
#   GPU_CHECK_BREAK=<step>       replace that step's command by a failing one (tests the reporting)
set -u

usage() { sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
MODE=${GPU_CHECK_DEVICE:-gpu}
for arg in "$@"; do
  case $arg in
    --cpu) MODE=cpu ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
case $MODE in gpu|cuda) MODE=gpu ;; cpu) ;; *) echo "GPU_CHECK_DEVICE must be gpu or cpu, not $MODE" >&2; exit 2 ;; esac
RESUME_KERNELS=${GPU_CHECK_RESUME_KERNELS:-torch}
case $RESUME_KERNELS in torch|triton|te|apex) ;;
  *) echo "GPU_CHECK_RESUME_KERNELS must be torch, triton, te or apex, not $RESUME_KERNELS" >&2; exit 2 ;; esac

STEPS="triton_tests kernels engine resume"
for name in ${GPU_CHECK_STEPS:+${GPU_CHECK_STEPS//,/ }} ${GPU_CHECK_BREAK:-}; do
  [[ " $STEPS " == *" $name "* ]] || { echo "gpu_check.sh: no step named $name (steps: $STEPS)" >&2; exit 2; }
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${GPU_CHECK_PYTHON:-python3}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ -n "${GPU_CHECK_LOG_DIR:-}" ]; then LOGDIR=$GPU_CHECK_LOG_DIR
elif [ -n "${OUT:-}" ]; then LOGDIR=$OUT/gpu_check
else LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX"); fi
mkdir -p "$LOGDIR" || exit 2
: > "$LOGDIR/steps.tsv"
# checkpoints stay out of LOGDIR: it may be shipped back from the node, and they are not logs
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_work.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT

if [ "$MODE" = gpu ]; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device is visible to torch; run with --cpu for the CPU smoke test" >&2
    exit 2
  fi
  # a user's shell may have the interpreter on; on a GPU the compiled kernels are what is checked
  export TRITON_INTERPRET=0
  PEAK=${GPU_CHECK_PEAK_TFLOPS:-989}
  # the limits add up to about 390 s, leaving the rest of the 7 minutes to start-up and the table
  DEFAULT_LIMITS="triton_tests=100 kernels=110 engine=100 resume=80"
  TRITON_TESTS=(-m pytest -q -p no:cacheprovider tests/test_kernels_triton.py tests/test_gpu_paths.py)
  # fewer timed steps than the benchmark's defaults: its training part builds the 1B model once per
  # backend and once for transformers, which at the defaults alone would take most of the budget
  KERNELS=(benchmarks/kernel_speed.py --shape 1b --bf16 --check --peak-tflops "$PEAK"
           --global-batch-size 4 --steps 3 --warmup 1 --repeats 1)
  ENGINE=(benchmarks/engine.py --shape 1b --bf16 --seq-length 4096 --micro-batch-size 1
          --global-batch-size 4 --peak-tflops "$PEAK")
  # one after the other: two runs on one GPU at once would share its memory and compute
  RESUME_OVERLAP=0
  # a tiny preset widened so that the GPU does real work, still seconds per run; a smaller vocabulary
  # than LLaMA2's keeps each of the four checkpoints (with Adam's state) small to write
  PRETRAIN=(--model tiny --mock-data --bf16 --hidden-size 256 --num-attention-heads 8 --num-query-groups 4
            --ffn-hidden-size 688 --vocab-size 8192 --seq-length 512 --max-position-embeddings 512
            --micro-batch-size 4 --global-batch-size 16)
else
  # one thread per process: on a small shared machine oversubscribed threads slow bf16 many times over
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TRITON_INTERPRET=1
  DEFAULT_LIMITS="triton_tests=120 kernels=240 engine=180 resume=240"
  # a third of the file's time under the interpreter: each kernel family, on odd layouts and strides
  TRITON_TESTS=(-m pytest -q -p no:cacheprovider tests/test_kernels_triton.py
                -k "exactly or gradient_of_q_alone or non_contiguous or column_slice")
  # the memory part starts two processes and the training part repeats the engine step's work:
  # on the CPU only the comparison with the reference is worth its time
  KERNELS=(benchmarks/kernel_speed.py --shape small --seq-length 16 --micro-batch-size 1 --global-batch-size 1
           --check --include-interpreter --skip memory training)
  ENGINE=(benchmarks/engine.py --shape small --seq-length 16 --micro-batch-size 1 --global-batch-size 1
          --steps 1 --warmup 1 --repeats 1)
  # run A beside run B's first half: start-up is most of their time, and the CPU has no kernel timing
  RESUME_OVERLAP=1
  PRETRAIN=(--model tiny --mock-data --bf16 --num-layers 2 --vocab-size 256 --seq-length 32
            --micro-batch-size 2 --global-batch-size 4 --num-workers 0)
fi
# a fixed backend: `auto` would time the kernels in a child process at each of the three starts
# (inside the step's limit), and a different pick after the restart would make the resumed
# iterations differ for a reason that is not the checkpoint's
PRETRAIN+=(--lr 3e-4 --train-iters 20 --save-interval 10 --log-interval 1 --eval-iters 0
           --kernel-backend "$RESUME_KERNELS")

limit_of() {  # limit_of STEP: GPU_CHECK_TIMEOUT_<STEP>, else the mode's default
  local var=GPU_CHECK_TIMEOUT_${1^^} pair
  if [ -n "${!var:-}" ]; then echo "${!var}"; return; fi
  for pair in $DEFAULT_LIMITS; do [ "${pair%%=*}" = "$1" ] && echo "${pair#*=}"; done
}

wanted() { [ -z "${GPU_CHECK_STEPS:-}" ] || [[ ",${GPU_CHECK_STEPS// /}," == *",$1,"* ]]; }

FAILED=0
run_step() {  # run_step NAME COMMAND...: under its limit, output to LOGDIR/NAME.log
  local name=$1 limit rc start; shift
  wanted "$name" || return 0
  limit=$(limit_of "$name")
  if [ "${GPU_CHECK_BREAK:-}" = "$name" ]; then
    set -- bash -c 'echo "deliberately broken by GPU_CHECK_BREAK"; exit 3'
  fi
  echo "== $name (limit ${limit} s): $LOGDIR/$name.log"
  start=$SECONDS
  # timeout signals the step's whole process group; -k ends what ignores SIGTERM
  { printf '$ %s\n' "$*"; timeout -k 10 "$limit" "$@"; } > "$LOGDIR/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >> "$LOGDIR/steps.tsv"
  echo "   rc $rc in $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || FAILED=1
}

# run A uninterrupted; run B stopped at 10, then resumed from its checkpoint; then the two logs
# compared. Each run's output is kept: its "kernels:" line shows the table each run used (a backend
# that cannot run here falls back to the reference the same way at every start).
resume_step() {
  set -o pipefail
  local d=$1 a_pid=
  local torchrun=("$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m megatron_mellama.pretrain)
  rm -rf "$d" && mkdir -p "$d" || return 1
  echo "pretrain flags: ${PRETRAIN[*]}"
  run_a() { "${torchrun[@]}" "${PRETRAIN[@]}" --save "$d/D1" --log-file "$d/A.jsonl" > "$LOGDIR/resume_A.log" 2>&1; }
  echo "-- run A: 20 iterations (its output: resume_A.log)"
  if [ "$RESUME_OVERLAP" = 1 ]; then run_a & a_pid=$!; else run_a || { tail -n 30 "$LOGDIR/resume_A.log"; return 1; }; fi
  echo "-- run B: stops at iteration 10"
  "${torchrun[@]}" "${PRETRAIN[@]}" --save "$d/D2" --exit-interval 10 --log-file "$d/B.jsonl" 2>&1 | tee "$d/B1.out" || return 1
  if [ -n "$a_pid" ]; then wait "$a_pid" || { echo "run A failed:"; tail -n 30 "$LOGDIR/resume_A.log"; return 1; }; fi
  echo "-- run B: resumes from iteration 10"
  "${torchrun[@]}" "${PRETRAIN[@]}" --save "$d/D2" --load "$d/D2" --log-file "$d/B.jsonl" 2>&1 | tee "$d/B2.out" || return 1
  cp "$d/A.jsonl" "$d/B.jsonl" "$LOGDIR/"
  "$PY" benchmarks/gpu_check_table.py resume "$d/A.jsonl" "$d/B.jsonl" --save-iteration 10 --last 20 \
    --rtol "${GPU_CHECK_RESUME_RTOL:-1e-3}" --outputs "$LOGDIR/resume_A.log" "$d/B1.out" "$d/B2.out"
}
export -f resume_step
export PY LOGDIR RESUME_OVERLAP GPU_CHECK_RESUME_RTOL=${GPU_CHECK_RESUME_RTOL:-1e-3}
# arrays do not cross into the child bash that timeout starts; a string of quoted words does
PRETRAIN_WORDS=$(printf '%q ' "${PRETRAIN[@]}")
export PRETRAIN_WORDS

echo "gpu_check ($MODE mode): logs in $LOGDIR"
run_step triton_tests "$PY" "${TRITON_TESTS[@]}"
run_step kernels "$PY" "${KERNELS[@]}"
run_step engine "$PY" "${ENGINE[@]}"
run_step resume bash -c 'eval "PRETRAIN=($PRETRAIN_WORDS)"; resume_step "$1"' resume_step "$WORK/resume"

"$PY" benchmarks/gpu_check_table.py table "$LOGDIR" --mode "$MODE" > "$LOGDIR/table.txt" 2>&1
table_rc=$?
if grep -q "full logs in" "$LOGDIR/table.txt"; then
  cat "$LOGDIR/table.txt"
  # a step can exit 0 and still fail in the table: a kernel above tolerance, a skipped test file
  [ "$table_rc" -eq 0 ] || FAILED=1
else
  # the table could not be made (python broken?): the bare exit statuses still say what failed
  cat "$LOGDIR/table.txt"
  echo
  echo "step	rc	seconds	limit"
  cat "$LOGDIR/steps.tsv"
  echo "the table failed (above); full logs in $LOGDIR"
  FAILED=1
fi
exit "$FAILED"
