#!/usr/bin/env bash
# The GPU checks of issue 11 in one go, for the lent GPU machine (see ../shared/gpu/README.md), each step with
# its own time limit, so that a slow step loses only itself:
#   1. the device section of BENCHMARKS.md: plain / NFT / CEAG step times on ResNet-50 at 224 px, bf16, batch
#      128 (REPEATS interleaved rounds), torch.profiler's device time per op for each (--device_profile), and
#      FairGRAPE's selection at 10 and 100 groups against the reference;
#   2. the same overhead part with --torch_compile true (one round: each compiled run compiles again);
#   3. the CUDA-only tests (sync debug mode, a real fp16 skipped step, the SGD shortcut's foreach case, the
#      lockstep FairGRAPE selection) and the whole suite on CUDA in four shards, all side by side (the timed
#      parts are over by then; 3 CPU threads each).
# Logs go to $LOGS; after every step they are packed again into $OUT/gpu_check.tar.gz (the device tool brings
# back at most 8 files), and the two sections and the step times are also copied to $OUT as they are.
# Run with:  source .whl/device_setup.sh; bash .ci/gpu_check.sh     (BUDGET=<s> caps the whole run)
set -u
OUT=${OUT:-/tmp/gpu-check}
LOGS=${LOGS:-/tmp/gpu-check-logs}
BUDGET=${BUDGET:-540}
REPEATS=${REPEATS:-7}
mkdir -p "$OUT" "$LOGS"
T0=$(date +%s)
pack() { tar -czf "$OUT/gpu_check.tar.gz" -C "$LOGS" . 2>/dev/null; cp "$LOGS"/steps.txt "$LOGS"/*.md "$OUT"/ 2>/dev/null; }
stamp() { echo "$(( $(date +%s) - T0 )) s: $*" | tee -a "$LOGS/steps.txt"; pack; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
{ nvidia-smi; git rev-parse HEAD 2>/dev/null; echo "commit ${HF_CEAG_COMMIT:-unknown}"; } > "$LOGS/machine.txt" 2>&1
stamp "start"

MODEL=${MODEL_ARGS:---model resnet50 --image_size 224 --per_device_train_batch_size 128 --bf16 true --dataloader_num_workers 4}
BENCH=(python3 scripts/benchmark.py --device_section --quick $MODEL --work_dir /tmp/gpu-bench)
timeout 230 "${BENCH[@]}" --repeats "$REPEATS" --device_profile --output "$LOGS/gpu_section.md" > "$LOGS/bench.log" 2>&1
stamp "device section rc=$?"
timeout 160 "${BENCH[@]}" --torch_compile_kinds --repeats 1 --fairgrape_groups \
    --output "$LOGS/gpu_section_compile.md" > "$LOGS/bench_compile.log" 2>&1
stamp "compiled section rc=$?"

CUDA_TESTS=(tests/test_cuda.py
            "tests/test_fairgrape.py::test_layers_selected_in_lockstep_equal_the_greedy_one_layer_at_a_time"
            "tests/test_constraints.py::test_the_plain_sgd_ascent_equals_the_optimizers_step_bit_for_bit")
# balanced by what each took on the H200 (at a6e0628: 150 s, 37 s, over 190 s with test_trainer, 107 s; alone,
# test_trainer and test_benchmark less the quick benchmark took 110 s)
SHARDS=("tests/test_scale_out.py tests/test_end_to_end.py"
        "tests/test_bad_inputs.py tests/test_readme.py tests/test_audit_publish.py tests/test_trainer.py"
        "tests/test_benchmark.py")
REST=$(ls tests/test_*.py | grep -v -e test_scale_out -e test_end_to_end -e test_bad_inputs -e test_readme \
       -e test_benchmark.py -e test_trainer -e test_audit_publish | tr '\n' ' ')
SHARDS+=("$REST")
LEFT=$(left)
OMP_NUM_THREADS=3 timeout $LEFT python3 -m pytest -v -rA -s -p no:cacheprovider "${CUDA_TESTS[@]}" \
    > "$LOGS/tests_cuda.txt" 2>&1 &
for i in 0 1 2 3; do
    OMP_NUM_THREADS=3 timeout $LEFT python3 -m pytest -v -rfE --tb=short -p no:cacheprovider ${SHARDS[$i]} \
        > "$LOGS/suite_shard$i.txt" 2>&1 &
done
wait
for f in "$LOGS"/tests_cuda.txt "$LOGS"/suite_shard*.txt; do echo "== $f"; tail -n 4 "$f"; done \
    > "$LOGS/suite_summary.txt"
stamp "tests done"
cat "$LOGS/suite_summary.txt"
grep -h -e "FAILED" -e "ERROR" "$LOGS"/tests_cuda.txt "$LOGS"/suite_shard*.txt | head -40
grep -h -e "step time:" -e "speed-up" "$LOGS"/*.md
