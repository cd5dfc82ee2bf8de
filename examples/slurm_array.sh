#!/usr/bin/env bash
# CAMs, refinement and CRF for a large split as a SLURM job array: each task takes one shard of the images.
# Every shard writes its own HDF5 parts, so no two tasks touch the same file; a task that dies
# is rerun with the same command and skips the images it already finished.
#   sbatch --array=0-7 examples/slurm_array.sh ws-voc train_aug
#SBATCH --job-name=igcam-maps
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
set -euo pipefail
WS=${1:?workspace}
SPLIT=${2:-train}
SHARD="$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT"

igcam make-cams -w "$WS" --split "$SPLIT" --shard "$SHARD" --workers 6
igcam refine -w "$WS" --split "$SPLIT" --shard "$SHARD" --workers 6
igcam crf -w "$WS" --split "$SPLIT" --shard "$SHARD" --workers "$SLURM_CPUS_PER_TASK"
# After all tasks finish (e.g. sbatch --dependency=afterok:<array job id>):
#   igcam evaluate -w "$WS" --artifact crf --split "$SPLIT"
