#!/usr/bin/env bash
# Creates the Chatchat baseline's virtualenv (default .venv-chatchat/ at the repo root) from
# loadtest/chatchat/requirements.txt. Separate from ragline's venv: Chatchat pins langchain 0.1,
# numpy 1.24, pydantic 2.7 and a streamlit stack that ragline must not inherit.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-$repo/.venv-chatchat}"
python="${PYTHON:-python3.11}"
# llama-cpp-python has no binary wheel on PyPI: the first build compiles (minutes), then pip
# reuses the wheel it cached when ragline's venv was made.
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check --upgrade pip
"$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt"
# Chatchat writes its log under $CHATCHAT_ROOT (default: the cwd) as soon as it is imported.
check_root="$(mktemp -d)"
trap 'rm -rf "$check_root"' EXIT
if ! CHATCHAT_ROOT="$check_root" "$venv/bin/chatchat" --help >/dev/null 2>&1; then
    echo "chatchat is installed but does not start: run $venv/bin/chatchat --help" >&2
    exit 1
fi
touch "$venv/.stamp"
echo "Chatchat baseline venv ready: $venv"
