#!/usr/bin/env bash
# One GPU session's checks, in one call: every kernel test compiled on CUDA (no interpreter),
# the kernel benchmark, then the AdaMerging step benchmark and a 500-step end-to-end run on
# 8 ViT-B/32 task vectors with AdaMerging's batches, in fp32, TF32 and bf16 autocast.
# FusionBench joins the AdaMerging benchmark when `fusion_bench` is importable: wheels found in
# .whl/ (ignored by git, carried to the device; see docs/benchmarks.md) are installed first into
# $PYTHON's environment. Then the real-zoo workflow's stages and evaluation throughput
# (benchmarks/bench_real_zoo.py), the per-matrix successor methods (TSV-M, Iso-C, Iso-CTS,
# WUDI) on 8 ViT-B/32 task vectors against FusionBench's functions when it is importable
# (benchmarks/bench_successors_svd.py), and Surgery and WEMoE (benchmarks/bench_test_time.py).
# Writes to $OUT: kernel_tests.log, bench_kernels.{json,md}, bench_adamerging.log,
# bench_adamerging_{fp32,tf32,bf16}.json, bench_real_zoo.{log,md},
# bench_successors_svd.{log,md,json}, bench_test_time.log and summary.md.
#     OUT=/path bash benchmarks/gpu.sh
# On a short device budget: PRECISIONS="bf16 fp32" KERNEL_BENCH=0 (skips the kernel benchmark).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
JUNIT="$(mktemp --suffix=.xml)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'benchmarks/gpu.sh needs CUDA'" || exit 2
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-deps --root-user-action=ignore .whl/*.whl || exit 2
fi
"$PYTHON" -c "import open_clip" || { echo "benchmarks/gpu.sh needs open_clip_torch in $PYTHON's environment (or its wheel in .whl/)"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

timeout "${TEST_TIMEOUT:-180}" "$PYTHON" -m pytest tests/kernels -q -p no:cacheprovider --confcutdir=tests/kernels \
    --junitxml="$JUNIT" >"$OUT/kernel_tests.log" 2>&1
tests_rc=$?
tail -n 8 "$OUT/kernel_tests.log"

bench_rc=0
if [ "${KERNEL_BENCH:-1}" != 0 ]; then
    timeout "${BENCH_TIMEOUT:-180}" "$PYTHON" benchmarks/bench_kernels.py \
        --json "$OUT/bench_kernels.json" --md "$OUT/bench_kernels.md" 2>&1
    bench_rc=$?
fi

ada_rc=0
for precision in ${PRECISIONS:-fp32 tf32 bf16}; do
    timeout "${ADA_TIMEOUT:-210}" "$PYTHON" benchmarks/bench_adamerging.py --configs vit-b-32-official \
        --device cuda --rounds 10 --timed-steps 2 --e2e-steps 500 --precision "$precision" \
        --json "$OUT/bench_adamerging_$precision.json" 2>&1 | grep -v "No pretrained weights" | tee -a "$OUT/bench_adamerging.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && ada_rc=$rc
done

# The real-zoo path on the GPU: workflow stage times (FusionBench's ViT-B/32 layout, random
# weights, EuroSAT and DTD at their real test sizes, 500 AdaMerging steps) and evaluation
# throughput over the decoded image cache against decoding every time. REAL_ZOO=0 skips it.
zoo_rc=0
if [ "${REAL_ZOO:-1}" != 0 ]; then
    timeout "${ZOO_TIMEOUT:-300}" "$PYTHON" benchmarks/bench_real_zoo.py --device cuda --steps 500 \
        --cores "$(nproc)" --only stages --only throughput --md "$OUT/bench_real_zoo.md" >"$OUT/bench_real_zoo.log" 2>&1
    zoo_rc=$?
    tail -n 30 "$OUT/bench_real_zoo.log"
fi

# TSV-M, Iso-C, Iso-CTS and WUDI (300 Adam steps) on the whole ViT-B/32 encoder x 8 tasks, on
# CUDA, ours streamed from the store against FusionBench's functions. SUCCESSORS=0 skips it.
svd_rc=0
if [ "${SUCCESSORS:-1}" != 0 ]; then
    timeout "${SVD_TIMEOUT:-480}" "$PYTHON" benchmarks/bench_successors_svd.py --device cuda --blocks 12 --tasks 8 \
        --threads 0 --md "$OUT/bench_successors_svd.md" --json "$OUT/bench_successors_svd.json" \
        >"$OUT/bench_successors_svd.log" 2>&1
    svd_rc=$?
    tail -n 8 "$OUT/bench_successors_svd.log"
fi

# Surgery and WEMoE against FusionBench at the official batches (16 images per task) on 8
# ViT-B/32 tasks, with WEMoE's 1000 steps end to end (goal: under 2 minutes). TEST_TIME=0 skips.
if [ "${TEST_TIME:-1}" != 0 ]; then
    for precision in ${TT_PRECISIONS:-tf32 fp32}; do
        timeout "${TT_TIMEOUT:-240}" "$PYTHON" benchmarks/bench_test_time.py --configs vit-b-32 --batch 16 \
            --device cuda --rounds 3 --timed-steps 3 --e2e-steps 1000 --precision "$precision" 2>&1 \
            | grep -v "No pretrained weights" | tee -a "$OUT/bench_test_time.log"
    done
fi

"$PYTHON" - "$OUT" "$JUNIT" "$tests_rc" "$bench_rc" "$ada_rc" <<'PY'
import sys, xml.etree.ElementTree as ET
from pathlib import Path

out, junit = Path(sys.argv[1]), Path(sys.argv[2])
tests_rc, bench_rc, ada_rc = map(int, sys.argv[3:])
lines = ["# GPU check", ""]
if junit.stat().st_size:
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: suite.get(key, "?") for key in ("tests", "failures", "errors", "skipped", "time")}
    lines.append(f"Kernel tests: rc {tests_rc}, {counts['tests']} run, {counts['failures']} failed, "
                 f"{counts['errors']} errors, {counts['skipped']} skipped in {counts['time']} s.")
    lines += [f"- FAILED {case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
else:
    lines.append(f"Kernel tests: rc {tests_rc}, no junit file.")
lines += ["", f"Kernel benchmark: rc {bench_rc}; AdaMerging benchmark: rc {ada_rc}.", ""]
if (out / "bench_kernels.md").exists():
    lines.append((out / "bench_kernels.md").read_text())
if (out / "bench_adamerging.log").exists():
    lines += ["", "## AdaMerging", "", "```", (out / "bench_adamerging.log").read_text(), "```"]
if (out / "bench_real_zoo.md").exists():
    lines += ["", "# Real-zoo workflow", "", (out / "bench_real_zoo.md").read_text()]
if (out / "bench_successors_svd.md").exists():
    lines += ["", "# Per-matrix successor methods", "", (out / "bench_successors_svd.md").read_text()]
if (out / "bench_test_time.log").exists():
    lines += ["", "## Surgery and WEMoE", "", "```", (out / "bench_test_time.log").read_text(), "```"]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines[:3]))
PY
exit $(( tests_rc != 0 || bench_rc != 0 || ada_rc != 0 || zoo_rc != 0 || svd_rc != 0 ))
