#!/usr/bin/env bash
# Build the C core with AddressSanitizer + UndefinedBehaviorSanitizer into a
# scratch copy of the tree and run the test suite against it.  Any ASan or
# UBSan report fails the run (halt_on_error).  CI runs this after the tests.
#
#   scripts/sanitize.sh [pytest args...]     (default: the whole suite, -x)
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/fastlive-asan.XXXXXX)
trap 'rm -rf "$work"' EXIT

# A copy of the tracked (and new, unignored) files: the real tree keeps its
# normal build.
(cd "$top" && git ls-files -co --exclude-standard -z) |
    (cd "$top" && xargs -0 cp --parents -t "$work")

export FASTLIVE_CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g -O1"
(cd "$work" && python3 build_ffi.py >/dev/null)

asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
if [ ! -e "$asan" ] || [ ! -e "$ubsan" ]; then
    echo "SKIP: gcc has no libasan/libubsan here" >&2
    exit 0
fi
# Python itself is not built with ASan: preload the runtime, skip leak
# checking of the interpreter, stop at the first report.
export LD_PRELOAD="$asan $ubsan"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:verify_asan_link_order=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export FASTLIVE_SANITIZED=1
cd "$work"
# the module really is instrumented
nm -D fastlive/_native*.so | grep -q __asan_report || { echo "not instrumented" >&2; exit 1; }
nm -D fastlive/_native*.so | grep -q __ubsan_handle || { echo "no UBSan" >&2; exit 1; }
python3 -c "import fastlive._native as n, sys; sys.exit(0 if n.__file__.startswith('$work') else 'wrong module')"
if [ $# -eq 0 ]; then set -- -x -q tests; fi
exec python3 -m pytest -p no:cacheprovider "$@"
