#!/usr/bin/env bash
# Installs the package with its test dependencies and runs every test: the Rust core's own tests,
# then pytest (GPU-marked tests skip without CUDA). Exit status: non-zero on any failure, and also
# when pytest collected no tests at all (exit 5), which would otherwise hide a broken test tree.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e ".[test]"
cargo test --release -q
python3 -m pytest tests -q -p no:cacheprovider "$@"
