#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv, then train LKM-UNet through the stock nnU-Net
# commands on the synthetic demo dataset, predict the held-out cases, evaluate DSC/NSD, write overlays.
# Runs on the GPU when torch sees one, else on the CPU (about 10 minutes on 2 cores).
# Everything goes to $LKM_DEMO_DIR (default ./demo_work), which this script owns and recreates.
# Smaller runs (the test suite's): LKM_DEMO_NUM_TRAIN, LKM_DEMO_NUM_TEST, LKM_DEMO_TRAINER.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${LKM_DEMO_DIR:-$repo/demo_work}"
if [ -e "$work" ] && [ ! -f "$work/.lkm-unet-demo" ]; then  # refused before the set-up, not after it
  echo "error: $work exists and was not made by this script; set LKM_DEMO_DIR to another folder" >&2
  exit 2
fi
source "$repo/scripts/setup_env.sh"

rm -rf "$work"
mkdir -p "$work"
touch "$work/.lkm-unet-demo"
export nnUNet_raw="$work/nnUNet_raw" nnUNet_preprocessed="$work/nnUNet_preprocessed"
export nnUNet_results="$work/nnUNet_results" nnUNet_def_n_proc="${nnUNet_def_n_proc:-2}"
dataset=990
trainer="${LKM_DEMO_TRAINER:-LKMUNetTrainer_demo}"
raw="$nnUNet_raw/Dataset990_LKMUNetDemo"
if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  device=cuda; plan_args=(); train_env=()
else
  # small batches keep a CPU step short; augmentation in-process avoids worker start-up on 2 cores
  device=cpu; plan_args=(--batch-size 4); train_env=(nnUNet_n_proc_DA=0)
fi
# step "k/6 what": a header per step; each step's wall time is kept for the summary at the end
step_names=(); step_secs=()
end_step() {
  if [ -n "${step_name:-}" ]; then step_names+=("$step_name"); step_secs+=($(( $(date +%s) - step_start ))); fi
}
step() { end_step; step_name="${1%% *}"; step_start=$(date +%s); echo; echo "== $* =="; }
duration() { if (( $1 >= 60 )); then echo "$(( $1 / 60 )) min $(( $1 % 60 )) s"; else echo "$1 s"; fi; }
# nnU-Net prints every module it inspects while looking for a trainer; keep the rest (stderr, where the
# progress bars go, is not filtered). Exit status comes from the nnU-Net command (pipefail).
hide_lookup() { grep --line-buffered -v -E "^(Searching|  Inspecting|Trainer '|Using trainer|Found class)"; return 0; }
start=$(date +%s)

step "1/6 synthetic demo dataset"
lkm-unet demo-data --num-train "${LKM_DEMO_NUM_TRAIN:-24}" --num-test "${LKM_DEMO_NUM_TEST:-6}"
step "2/6 nnU-Net planning and preprocessing (2d)"
nnUNetv2_plan_and_preprocess -d "$dataset" -c 2d -np 2 --verify_dataset_integrity > "$work/plan_and_preprocess.log"
echo "log: $work/plan_and_preprocess.log"
step "3/6 LKM-UNet plans (window and pool sizes derived for the planned patch)"
lkm-unet plans "$dataset" -c 2d --preset auto "${plan_args[@]}"
step "4/6 training: nnUNetv2_train $dataset 2d 0 -tr $trainer -p nnUNetLKMUNetPlans -device $device"
env "${train_env[@]}" nnUNetv2_train "$dataset" 2d 0 -tr "$trainer" -p nnUNetLKMUNetPlans -device "$device" \
  | hide_lookup
step "5/6 prediction of the held-out cases"
nnUNetv2_predict -i "$raw/imagesTs" -o "$work/predictions" -d "$dataset" -c 2d -f 0 -tr "$trainer" \
  -p nnUNetLKMUNetPlans -device "$device" --disable_tta -npp 1 -nps 1 \
  | hide_lookup
step "6/6 evaluation (DSC, NSD) and overlays"
lkm-unet evaluate "$work/predictions" "$raw/labelsTs" --dataset-json "$raw/dataset.json" \
  --output-dir "$work/evaluation"
lkm-unet overlays "$raw/imagesTs" "$raw/labelsTs" "$work/predictions" "$work/overlays"
end_step
per_step=""
for i in "${!step_names[@]}"; do per_step+="${step_names[$i]} $(duration "${step_secs[$i]}"), "; done
echo
echo "time per step: ${per_step%, }"
python - "$work/evaluation/summary.csv" "$(( $(date +%s) - start ))" <<'PY'
import csv, sys
rows = {row["organ"]: row for row in csv.DictReader(open(sys.argv[1]))}
seconds = int(sys.argv[2])
print(f"\nmean DSC over organs and held-out cases: {float(rows['mean']['DSC_mean']):.3f} "
      f"(NSD {float(rows['mean']['NSD_mean']):.3f})")
print(f"quickstart finished in {seconds // 60} min {seconds % 60} s; results in {sys.argv[1].rsplit('/', 2)[0]}")
PY
