#!/usr/bin/env bash
# Influence of every training image as a SLURM job array, then round 2 of the classifier.
# Curvature statistics are sums over images: each task writes its shard's sums to
# influence/<split>/stats-*-r<i>-of-<n>.pt and waits (--wait) until every task has written its
# own, then all tasks fit the same preconditioner from the total and score their images.
# A task that dies is rerun with the same command: finished statistics and images are kept.
# --wait needs every task of the array running at once; when there are fewer GPUs than tasks,
# drop --wait and submit the array three times, each afterok the previous one (factors,
# EK-FAC eigenvalues, scores): a task without its partners' statistics stops after its own.
#   sbatch --array=0-7 examples/slurm_influence.sh ws-voc train_aug
#SBATCH --job-name=igcam-influence
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
set -euo pipefail
WS=${1:?workspace}
SPLIT=${2:-train}
SHARD="$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT"

igcam compute-influence -w "$WS" --split "$SPLIT" --shard "$SHARD" --workers 6 --wait
# After all tasks finish (sbatch --dependency=afterok:<array job id>), on one GPU or under torchrun:
#   igcam influence-report -w "$WS" --split "$SPLIT"          # eval/influence-<split>.md/.json/.png
#   igcam train-cls -w "$WS" --round 2 --sample-weights influence
#   igcam make-cams -w "$WS" --split "$SPLIT"                  # uses the latest round (cls/round2/model.pt)
