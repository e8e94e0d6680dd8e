#!/usr/bin/env bash
# The GPU checks of issue 11 in one go, for the lent GPU machine (see ../shared/gpu/README.md): the CUDA-only
# tests, the device section of BENCHMARKS.md (plain / NFT / CEAG step times on ResNet-50 at 224 px, bf16,
# batch 128, FairGRAPE's selection against the reference loop), the same with --torch_compile, then the whole
# suite. Every step has its own time limit and writes into $OUT as it goes, so a slow step loses only itself.
#   run with:  source .whl/device_setup.sh; bash .ci/gpu_check.sh     (HF_CEAG_COMMIT=<sha> names the commit)
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "$(( $(date +%s) - T0 )) s: $*" | tee -a "$OUT/steps.txt"; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
stamp "start"
timeout 80 python3 -m pytest -q -rA -s -p no:cacheprovider tests/test_cuda.py \
    "tests/test_fairgrape.py::test_layers_selected_in_lockstep_equal_the_greedy_one_layer_at_a_time" \
    > "$OUT/tests_cuda.txt" 2>&1
stamp "cuda tests rc=$?"
BENCH=(python3 scripts/benchmark.py --device_section --quick --model resnet50 --image_size 224
       --per_device_train_batch_size 128 --bf16 true --dataloader_num_workers 4 --work_dir /tmp/gpu-bench)
timeout 160 "${BENCH[@]}" --output "$OUT/gpu_section.md" > "$OUT/bench.log" 2>&1
stamp "device section rc=$?"
timeout 140 "${BENCH[@]}" --torch_compile_kinds --repeats 1 --fairgrape_groups \
    --output "$OUT/gpu_section_compile.md" > "$OUT/bench_compile.log" 2>&1
stamp "compiled section rc=$?"
timeout 150 python3 -m pytest -v -rfE --tb=short -p no:cacheprovider tests/test_scale_out.py tests/test_trainer.py \
    tests/test_audit_publish.py tests/test_end_to_end.py > "$OUT/suite_part1.txt" 2>&1
stamp "suite part 1 rc=$?"
REST=$(ls tests/test_*.py | grep -v -e test_scale_out -e test_trainer -e test_audit_publish -e test_end_to_end -e test_cuda)
timeout $(( 560 - ($(date +%s) - T0) )) python3 -m pytest -v -rfE --tb=short -p no:cacheprovider $REST \
    > "$OUT/suite_part2.txt" 2>&1
stamp "suite part 2 rc=$?"
