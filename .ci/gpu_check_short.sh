set -u
OUT=${OUT:-/tmp/gpu-check2}; mkdir -p "$OUT"; T0=$(date +%s)
stamp() { echo "$(( $(date +%s) - T0 )) s: $*" | tee -a "$OUT/steps.txt"; }
timeout 75 python3 -m pytest -q -rA -s --tb=short -p no:cacheprovider -k "never_synchronise or gradient_accumulation or resume" tests/test_cuda.py tests/test_scale_out.py > "$OUT/tests.txt" 2>&1
stamp "tests rc=$?"
timeout 150 python3 scripts/benchmark.py --device_section --quick --model resnet50 --image_size 224 --per_device_train_batch_size 128 --bf16 true --dataloader_num_workers 4 --output "$OUT/gpu_section.md" > "$OUT/bench.log" 2>&1
stamp "device section rc=$?"
