#!/usr/bin/env bash
# The classic chain on PASCAL VOC 2012 (or any dataset in VOC layout), one machine.
#   VOC=/data/VOC2012 WS=ws-voc bash examples/voc_chain.sh
# Custom classes: CLASSES=classes.txt (one name per line; a leading "background" line is ignored).
# Offline clusters: PRETRAINED=/path/resnet50-0676ba61.pth (torchvision's ImageNet weights file).
set -euo pipefail
VOC=${VOC:?set VOC to the VOC2012 folder}
WS=${WS:-ws-voc}
PRETRAINED=${PRETRAINED:-imagenet}

igcam init -w "$WS" --dataset voc --root "$VOC" ${CLASSES:+--classes "$CLASSES"}
igcam train-cls -w "$WS" --pretrained "$PRETRAINED"
igcam make-cams -w "$WS" --split train
igcam evaluate -w "$WS" --artifact cams --split train
igcam crf -w "$WS" --split train --source cams
igcam evaluate -w "$WS" --artifact crf --split train
igcam status -w "$WS"
