#!/usr/bin/env bash
# All GPUs of one machine: torchrun starts one process per GPU. train-cls runs as DDP
# (the batch size is per process); make-cams shards the images by rank automatically.
#   WS=ws-voc GPUS=4 bash examples/torchrun_chain.sh
set -euo pipefail
WS=${WS:?workspace made by igcam init}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
RUN="torchrun --standalone --nproc_per_node $GPUS -m igcam_cli"

$RUN train-cls -w "$WS"
$RUN make-cams -w "$WS" --split train
igcam crf -w "$WS" --split train --workers "$(nproc)"
igcam evaluate -w "$WS" --artifact crf --split train
