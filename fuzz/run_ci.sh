#!/usr/bin/env bash
# Bounded fuzz run for CI (issue 8): fuzz torch_dtdr.api.load and torch_dtdr.open
# for FUZZ_SECONDS (default 60) seconds, seeded with the golden files, the hostile
# corpus, fuzz regressions and small files saved on the spot.
#
#   fuzz/run_ci.sh                 # 60 s
#   FUZZ_SECONDS=3600 fuzz/run_ci.sh
#
# Uses atheris (coverage-guided libFuzzer) when it is importable, else the
# pure-Python mutation loop of fuzz/fuzz_load.py over the same seeds and mutators.
# Exit status 0: no finding. Otherwise the crashing input is in fuzz/crashes/
# (move it to tests/data/hostile/fuzz-<what>.bin, see fuzz/README.md).
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
SECS="${FUZZ_SECONDS:-60}"
CRASHES="fuzz/crashes"
mkdir -p "$CRASHES"
CORPUS="$(mktemp -d "${TMPDIR:-/tmp}/dtdr-fuzz-corpus.XXXXXX")"
trap 'rm -rf "$CORPUS"' EXIT

"$PY" fuzz/fuzz_load.py --make-seeds "$CORPUS"

# The codec decoders: the compiled core against the reference (differential), a third of the budget.
CSECS=$(( SECS / 3 > 5 ? SECS / 3 : 5 ))
CCORPUS="$CORPUS/codec"
"$PY" fuzz/fuzz_codec.py --make-seeds "$CCORPUS"
if "$PY" -c "import atheris" 2>/dev/null; then
    echo "fuzz: codec decoders, atheris, ${CSECS} s"
    "$PY" fuzz/fuzz_codec.py -max_total_time="$CSECS" -timeout=10 -rss_limit_mb=2560 \
        -artifact_prefix="$CRASHES/" "$CCORPUS" 2>&1 | grep -v "^INFO: Instrumenting" | tail -3
    test "${PIPESTATUS[0]}" -eq 0
else
    echo "fuzz: codec decoders, pure-Python loop, ${CSECS} s"
    "$PY" fuzz/fuzz_codec.py --pure --seconds "$CSECS"
fi

if "$PY" -c "import atheris" 2>/dev/null; then
    echo "fuzz: atheris, ${SECS} s"
    # -timeout: one input may not take 10 s (a hang); -rss_limit_mb: nor push the
    # process past 2.5 GB (torch alone takes ~0.4 GB).
    "$PY" fuzz/fuzz_load.py -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2560 \
        -print_final_stats=1 -artifact_prefix="$CRASHES/" "$CORPUS" 2>&1 \
        | grep -v "^INFO: Instrumenting"
    exit "${PIPESTATUS[0]}"
else
    echo "fuzz: atheris not importable, pure-Python mutation loop, ${SECS} s"
    exec "$PY" fuzz/fuzz_load.py --pure --seconds "$SECS" --crash-dir "$CRASHES" "$CORPUS"
fi
