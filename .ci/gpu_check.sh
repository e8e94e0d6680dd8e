#!/usr/bin/env bash
# The GPU checks of issue 11 in one go, for the lent GPU machine (see ../shared/gpu/README.md), each step with
# its own time limit, writing into $OUT as it goes so that a slow step loses only itself:
#   1. the CUDA-only tests and the lockstep FairGRAPE selection on CUDA;
#   2. the device section of BENCHMARKS.md: plain / NFT / CEAG step times on ResNet-50 at 224 px, bf16, batch
#      128, and FairGRAPE's selection at 10 and 100 groups against the reference loop;
#   3. the same overhead part with --torch_compile true (one round: each compiled run compiles again);
#   4. the whole suite on CUDA, in four shards run side by side (the GPU is shared, 4 CPU threads each).
# Run with:  source .whl/device_setup.sh; bash .ci/gpu_check.sh     (HF_CEAG_COMMIT=<sha> names the commit)
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "$(( $(date +%s) - T0 )) s: $*" | tee -a "$OUT/steps.txt"; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
stamp "start"
timeout 90 python3 -m pytest -q -rA -s -p no:cacheprovider tests/test_cuda.py \
    "tests/test_fairgrape.py::test_layers_selected_in_lockstep_equal_the_greedy_one_layer_at_a_time" \
    > "$OUT/tests_cuda.txt" 2>&1
stamp "cuda tests rc=$?"
BENCH=(python3 scripts/benchmark.py --device_section --quick --model resnet50 --image_size 224
       --per_device_train_batch_size 128 --bf16 true --dataloader_num_workers 4 --work_dir /tmp/gpu-bench)
timeout 170 "${BENCH[@]}" --output "$OUT/gpu_section.md" > "$OUT/bench.log" 2>&1
stamp "device section rc=$?"
timeout 150 "${BENCH[@]}" --torch_compile_kinds --repeats 1 --fairgrape_groups \
    --output "$OUT/gpu_section_compile.md" > "$OUT/bench_compile.log" 2>&1
stamp "compiled section rc=$?"
SHARDS=("tests/test_scale_out.py tests/test_end_to_end.py"
        "tests/test_bad_inputs.py tests/test_readme.py"
        "tests/test_benchmark.py tests/test_trainer.py tests/test_audit_publish.py")
REST=$(ls tests/test_*.py | grep -v -e test_scale_out -e test_end_to_end -e test_bad_inputs -e test_readme \
       -e test_benchmark -e test_trainer -e test_audit_publish | tr '\n' ' ')
SHARDS+=("$REST")
LEFT=$(( 570 - ($(date +%s) - T0) ))
for i in 0 1 2 3; do
    OMP_NUM_THREADS=4 timeout $LEFT python3 -m pytest -v -rfE --tb=short -p no:cacheprovider ${SHARDS[$i]} \
        > "$OUT/suite_shard$i.txt" 2>&1 &
done
wait
stamp "suite done"
tail -n 3 "$OUT"/suite_shard*.txt > "$OUT/suite_summary.txt"
