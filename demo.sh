#!/usr/bin/env bash
# The whole two-stage EgoHMR pipeline on a synthetic EgoBody-format world, with the project's own scripts and
# flags as a user types them. Everything is written under $OUT (default outputs/demo).
#   DEMO_SIZE=small (default, about 6.5 min on a 2-core CPU) | full (larger world, longer training) | tiny (CI)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/demo}
DEMO_SIZE=${DEMO_SIZE:-small}
export PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-egl}

# WORLD_SEED: tiny uses a world whose test person sits, so that the guidance check has collisions to remove.
case "$DEMO_SIZE" in
  tiny)  RECS=4;  FRAMES=4;  S1_ITERS=8;    S2_ITERS=8;    VAL=4;   BS=4; COAP_ITERS=150;  COAP_BODIES=64;  SAMPLES=2; SDR=20; WSEED=9 ;;
  small) RECS=10; FRAMES=4;  S1_ITERS=60;   S2_ITERS=60;   VAL=30;  BS=4; COAP_ITERS=1200; COAP_BODIES=128; SAMPLES=5; SDR=10; WSEED=0 ;;
  full)  RECS=24; FRAMES=20; S1_ITERS=3000; S2_ITERS=3000; VAL=500; BS=8; COAP_ITERS=2000; COAP_BODIES=128; SAMPLES=5; SDR=4;  WSEED=0 ;;
  *) echo "DEMO_SIZE must be tiny, small or full, got '$DEMO_SIZE'" >&2; exit 2 ;;
esac

WORLD=$OUT/world
DATA=$WORLD/data
ROOT=$WORLD/egobody
step() { echo; echo "=== [$(date +%H:%M:%S)] $*"; }
start=$(date +%s)

step "1/9 synthetic world ($DEMO_SIZE: $RECS recordings x $FRAMES frames)"
$PY make_synthetic_data.py --out "$WORLD" --num_recordings $RECS --frames_per_recording $FRAMES --seed "${WORLD_SEED:-$WSEED}"

step "2/9 stage-1 scene preprocessing (train/val/test)"
for split in train val test; do
  $PY preprocess_scene_s1.py --split $split --data_root "$ROOT"
done

step "3/9 train stage 1 (ProHMR-scene)"
$PY train_prohmr_scene.py --dataset_root "$ROOT" --data_dir "$DATA" --load_pretrained False \
  --save_dir "$OUT/runs_stage1" --run_id demo --batch_size $BS --num_workers 0 \
  --max_iters $S1_ITERS --log_step 10 --val_step $VAL --save_step $VAL --seed 0 \
  --scene_downsample_rate $SDR --val_at_start True --overwrite True

step "4/9 test stage 1 (+ stage-1 translations, renders)"
$PY test_prohmr_scene.py --dataset_root "$ROOT" --data_dir "$DATA" --checkpoint "$OUT/runs_stage1/demo/best_model.pt" \
  --save_root "$OUT/results" --num_workers 0 --scene_downsample_rate $SDR \
  --render True --output_render_root "$OUT/render" --render_step 2
S1_RESULTS=$OUT/results/output_prohmr_scene_demo/results.pkl

step "5/9 stage-2 scene cubes (around GT for train/val/test, around stage-1 translations for test)"
for split in train val test; do
  $PY preprocess_scene_s2_for_train.py --split $split --data_root "$ROOT" --data_dir "$DATA" --seed 0
done
$PY preprocess_scene_s2_for_test.py --split test --data_root "$ROOT" --data_dir "$DATA" --seed 0 \
  --stage1_result_path "$S1_RESULTS"

step "6/9 COAP occupancy weights for the synthetic body"
$PY train_coap.py --data_dir "$DATA" --gender neutral --iters $COAP_ITERS --pool_bodies $COAP_BODIES \
  --out "$OUT/coap/coap_smpl_neutral.ckpt"

step "7/9 train stage 2 (EgoHMR)"
$PY train_egohmr.py --dataset_root "$ROOT" --data_dir "$DATA" --load_pretrained_img_enc False \
  --coap_checkpoint "$OUT/coap/coap_smpl_neutral.ckpt" --save_dir "$OUT/runs_stage2" --run_id demo \
  --batch_size $BS --num_workers 0 --max_iters $S2_ITERS --log_step 10 --val_step $VAL --save_step $VAL \
  --eval_spacing 1 --start_coap_epoch 1 --seed 0 --scene_downsample_rate $SDR --val_at_start True --overwrite True

S2_COMMON=(--dataset_root "$ROOT" --data_dir "$DATA" --checkpoint "$OUT/runs_stage2/demo/best_model_vis.pt"
           --stage1_result_path "$S1_RESULTS" --num_samples $SAMPLES --num_workers 0 --seed 0
           --scene_downsample_rate $SDR)
step "8/9 test stage 2 on stage-1 translations (two-stage): ddim5, and ddpm + COAP guidance with renders"
$PY test_egohmr.py "${S2_COMMON[@]}" --timestep_respacing_eval ddim5 --with_coap_grad False \
  --save_root "$OUT/results/stage2_ddim5"
$PY test_egohmr.py "${S2_COMMON[@]}" --timestep_respacing_eval ddpm --with_coap_grad True \
  --save_root "$OUT/results/stage2_ddpm_coap" --render True --output_render_root "$OUT/render" --render_step 1
step "8/9 (cont.) collision guidance check on GT translations: ddpm with and without COAP guidance, same seeds"
# A denoiser trained this briefly ignores its noisy input, so the guided mean shifts of the chain cannot reach its
# output; --guide_final_step applies the last guided update (w*0.01*g) to the prediction itself (the original
# discards it). That one step must carry what a trained denoiser accumulates over the 11 guided steps (about 0.25*g
# at w = 2), hence w = 10 here. All 20000 scene points (downsample rate 1, as the original tests).
for guidance in False True; do
  $PY test_egohmr.py "${S2_COMMON[@]}" --two_stage False --scene_crop_by_stage1_transl False \
    --timestep_respacing_eval ddpm --with_coap_grad $guidance --guide_final_step True --cond_grad_weight 10 \
    --num_samples 2 --eval_spacing 2 --scene_downsample_rate 1 --save_root "$OUT/results/stage2_gt_ddpm_coap_$guidance"
done

step "9/9 metrics table"
$PY -m utils.demo_report --out "$OUT/metrics" \
  --run "stage 1 (mode)=$OUT/results/output_prohmr_scene_demo/metrics.json" \
  --run "stage 2 ddim5=$OUT/results/stage2_ddim5/output_egohmr_demo/metrics.json" \
  --run "stage 2 ddpm+COAP=$OUT/results/stage2_ddpm_coap/output_egohmr_demo/metrics.json" \
  --run "GT transl: ddpm=$OUT/results/stage2_gt_ddpm_coap_False/output_egohmr_demo/metrics.json" \
  --run "GT transl: ddpm+COAP=$OUT/results/stage2_gt_ddpm_coap_True/output_egohmr_demo/metrics.json"
step "9/9 (cont.) viewer recording of the frames with unseen joints, results page"
if $PY -c 'import viser' 2>/dev/null; then
  $PY visualize_results.py --results "$OUT/results/stage2_ddpm_coap/output_egohmr_demo" --dataset_root "$ROOT" \
    --frames invisible --save_recording "$OUT/viewer_recording.html"
else
  echo "note: viser is not installed (pip install -r requirements.txt): no viewer recording"
fi
$PY -m utils.demo_page --demo "$OUT"
echo "demo finished in $(( $(date +%s) - start )) s; open $OUT/index.html (metrics, plots, renders, 3D playback)"
