#!/usr/bin/env bash
# GPU check of the Triton kernels: every kernel test compiled on CUDA (no interpreter), then
# the kernel benchmark. Writes to $OUT: kernel_tests.{log,xml}, bench_kernels.{log,json,md}
# and summary.{json,md}. Run from anywhere: OUT=/path bash benchmarks/gpu.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'benchmarks/gpu.sh needs CUDA'" || exit 2

timeout "${TEST_TIMEOUT:-300}" "$PYTHON" -m pytest tests/kernels -q -p no:cacheprovider --confcutdir=tests/kernels \
    --junitxml="$OUT/kernel_tests.xml" >"$OUT/kernel_tests.log" 2>&1
tests_rc=$?
tail -n 15 "$OUT/kernel_tests.log"

timeout "${BENCH_TIMEOUT:-420}" "$PYTHON" benchmarks/bench_kernels.py \
    --json "$OUT/bench_kernels.json" --md "$OUT/bench_kernels.md" 2>&1 | tee "$OUT/bench_kernels.log"
bench_rc=${PIPESTATUS[0]}

"$PYTHON" - "$OUT" "$tests_rc" "$bench_rc" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, tests_rc, bench_rc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
tests = {"rc": tests_rc}
if (out / "kernel_tests.xml").exists():
    suite = ET.parse(out / "kernel_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests.update({key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")})
    tests["time_s"] = float(suite.get("time", 0))
    tests["failed"] = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                       if case.find("failure") is not None or case.find("error") is not None]
bench = {"rc": bench_rc}
if (out / "bench_kernels.json").exists():
    bench.update(json.loads((out / "bench_kernels.json").read_text()))
(out / "summary.json").write_text(json.dumps({"kernel_tests": tests, "bench": bench}, indent=1))
lines = ["# Kernel GPU check", "",
         f"Kernel tests: rc {tests_rc}, {tests.get('tests', '?')} run, {tests.get('failures', '?')} failed, "
         f"{tests.get('errors', '?')} errors, {tests.get('skipped', '?')} skipped in {tests.get('time_s', '?')} s."]
lines += [f"- FAILED {name}" for name in tests.get("failed", [])]
lines += ["", f"Benchmark: rc {bench_rc}.", ""]
if (out / "bench_kernels.md").exists():
    lines.append((out / "bench_kernels.md").read_text())
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines[:4 + len(tests.get("failed", []))]))
PY
exit $(( tests_rc != 0 || bench_rc != 0 ))
