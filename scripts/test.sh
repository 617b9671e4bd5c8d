#!/usr/bin/env bash
# Installs the package with its test dependencies and runs every test: the Rust core's own tests,
# then pytest (GPU-marked tests skip without CUDA). Extra arguments go to pytest.
# Exit status: pytest's own (0 only when every collected test passed or skipped), so a failure is
# never green; "no tests collected" (pytest's 5) is a failure too, said in one line, because an
# empty run proves nothing (a broken test tree, or arguments that select nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[test]"
cargo test --release -q
status=0
python3 -m pytest tests -q -p no:cacheprovider "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests (exit status 5): nothing was tested" >&2
fi
exit "$status"
