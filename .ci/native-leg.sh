#!/usr/bin/env bash
# CI's second leg: the native SONAR path on PyTorch releases other than the lock's, with no
# fairseq2, fairseq2n or sonar-space installed.
#
#   bash .ci/native-leg.sh                 # the newest PyTorch on PyPI, then 2.11 (the GPU image's)
#   bash .ci/native-leg.sh 2.11            # one leg: "newest" or a version prefix
#
# First, in the lock's venv (the main leg's, with fairseq2): a tiny bundle and the sentences
# fairseq2 gives for a few prompts (`.ci/native_check.py reference`). Then each leg makes a fresh
# venv with that PyTorch (Python 3.13 for the newest where this machine has it and the project
# allows it), installs the project from this tree as a user would plus the test tools the tests
# below need, and runs:
#   - the tests of the code that runs without fairseq2 (NATIVE_TESTS; their fairseq2
#     comparisons skip there);
#   - `sonar-llm generate` and `sonar-llm serve` + `POST /generate` on the bundle, whose sentences
#     must equal fairseq2's from the first step (`.ci/native_check.py check`).
# PyPI's Linux PyTorch is the CUDA build: its nvidia-* libraries are linked at import, so they
# are installed even for the CPU; Triton and the CUDA Python bindings are not used by a CPU run
# (nor loaded by `import torch`) and are left out (about 200-300 MB of downloads).
set -euo pipefail
cd "$(dirname "$0")/.."

uv=(python3 -m uv)
export UV_PYTHON_DOWNLOADS=never # only PyPI is reachable: use the interpreters on the machine
legs=("$@")
[ ${#legs[@]} -gt 0 ] || legs=(newest 2.11)
work=$(mktemp -d "${TMPDIR:-/tmp}/native-leg.XXXXXX")
trap 'rm -rf "$work"' EXIT
printf '%s\n' triton cuda-bindings cuda-pathfinder >"$work/excludes.txt"
# The tests that need no fairseq2 (each skips its fairseq2 comparisons where it is absent).
NATIVE_TESTS=(tests/models/sonar tests/models/test_sonar_llm.py tests/models/test_sentences.py)
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

# An interpreter for version $1 (e.g. 3.13) that runs, or nothing: on PATH, else pyenv's.
find_python() {
    local p
    for p in "python$1" "$(pyenv root 2>/dev/null || echo /nonexistent)/versions/$1"*/bin/"python$1"; do
        if "$p" -c "" 2>/dev/null; then
            command -v "$p"
            return
        fi
    done
}

# The interpreter a leg uses: 3.13 for the newest PyTorch if present and allowed by the
# project's requires-python, else the machine's python3.
leg_python() {
    local py
    py=$(find_python 3.13)
    if [ "$1" = newest ] && [ -n "$py" ] && "${uv[@]}" run --locked python - <<'EOF'; then
import sys, tomllib
from packaging.specifiers import SpecifierSet
spec = tomllib.load(open("pyproject.toml", "rb"))["project"]["requires-python"]
sys.exit(0 if "3.13" in SpecifierSet(spec) else 1)
EOF
        echo "$py"
    else
        command -v python3
    fi
}

# The test tools the native tests need, with the specifiers of the dev group (written once).
test_requirements() {
    "${uv[@]}" run --locked python - <<'EOF'
import re, tomllib
wanted = {"pytest", "pytest-timeout", "httpx", "httpx-sse", "psutil"}
for req in tomllib.load(open("pyproject.toml", "rb"))["dependency-groups"]["dev"]:
    if isinstance(req, str) and re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0] in wanted:
        print(req)
EOF
}

reference() {
    local t0
    t0=$(now)
    "${uv[@]}" run --locked sonar-llm tiny "$work/bundle"
    "${uv[@]}" run --locked python .ci/native_check.py reference "$work/bundle" "$work/expected.json"
    echo "native leg: bundle and fairseq2 reference in $(since "$t0") s"
}

leg() {
    local name=$1 venv="$work/venv-$1" torch_req py t0 t_install t_tests t_check
    case $name in
    newest) torch_req=torch ;;
    *) torch_req="torch==$name.*" ;;
    esac
    py=$(leg_python "$name")
    echo "== native leg: $torch_req on $("$py" --version) (${UV_CACHE_DIR:-default uv cache})"
    t0=$(now)
    "${uv[@]}" venv -q --python "$py" "$venv"
    mapfile -t tools < <(test_requirements)
    "${uv[@]}" pip install -q --python "$venv/bin/python" --excludes "$work/excludes.txt" \
        --upgrade "$torch_req" . "${tools[@]}"
    t_install=$(since "$t0")
    "$venv/bin/python" - "$name" <<'EOF'
import importlib.util, sys, torch
found = [m for m in ("fairseq2", "fairseq2n", "sonar") if importlib.util.find_spec(m)]
assert not found, f"installed without fairseq2, yet {found} import"
want = sys.argv[1]
assert want == "newest" or torch.__version__.startswith(want + "."), torch.__version__
print(f"torch {torch.__version__} on Python {sys.version.split()[0]}, no fairseq2")
EOF
    t0=$(now)
    "$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not slow and not full" "${NATIVE_TESTS[@]}"
    t_tests=$(since "$t0")
    t0=$(now)
    "$venv/bin/python" .ci/native_check.py check "$work/bundle" "$work/expected.json"
    t_check=$(since "$t0")
    echo "native leg $name: install ${t_install} s, tests ${t_tests} s, CLI+HTTP check ${t_check} s"
    rm -rf "$venv"
}

reference
for name in "${legs[@]}"; do
    leg "$name"
done
