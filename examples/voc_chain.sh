#!/usr/bin/env bash
# The whole chain on PASCAL VOC 2012 (or any dataset in VOC layout), one machine, stage by stage.
#   VOC=/data/VOC2012 WS=ws-voc bash examples/voc_chain.sh
# Custom classes: CLASSES=classes.txt (one name per line; a leading "background" line is ignored).
# Offline clusters: PRETRAINED=/path/resnet50-0676ba61.pth (torchvision's ImageNet weights file).
# `igcam run -w "$WS"` does the same in one command and skips whatever is already fresh.
set -euo pipefail
VOC=${VOC:?set VOC to the VOC2012 folder}
WS=${WS:-ws-voc}
PRETRAINED=${PRETRAINED:-imagenet}
SPLIT=${SPLIT:-train}   # train_aug for the full recipe when SegmentationClassAug is there

igcam init -w "$WS" --dataset voc --root "$VOC" ${CLASSES:+--classes "$CLASSES"}
igcam train-cls -w "$WS" --pretrained "$PRETRAINED"
igcam make-cams -w "$WS" --split "$SPLIT"
igcam evaluate -w "$WS" --artifact cams --split "$SPLIT"
igcam refine -w "$WS" --split "$SPLIT"
igcam evaluate -w "$WS" --artifact refined --split "$SPLIT"
igcam crf -w "$WS" --split "$SPLIT"                      # from refined maps
igcam evaluate -w "$WS" --artifact crf --split "$SPLIT"
igcam train-seg -w "$WS" --split "$SPLIT" --pretrained "$PRETRAINED"
igcam predict -w "$WS" --split val
igcam evaluate -w "$WS" --artifact seg --split val
igcam status -w "$WS"
