#!/usr/bin/env bash
# The GPU benchmark as one prepared command, for a GPU machine that has PyTorch and can fetch
# nothing: the accelerator image (Python 3.12, PyTorch 2.11, transformers 5, sentencepiece,
# safetensors, numpy, prometheus-client, httpx; no fairseq2, FastAPI, pydantic, uvicorn or nltk).
#
# What it lacks travels as wheels in the git-ignored .whl/ folder (18 wheels, 6.4 MiB in all, the
# lock's versions; tests/test_bench_gpu.py checks they are the lock's), fetched beforehand with
# the command below. sentencepiece is carried too: the image's 0.2.2 segments some near-tied
# long strings unlike fairseq2's (pyproject.toml pins it below 0.2.2).
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl \
#     annotated-doc==0.0.7 annotated-types==0.8.0 anyio==4.16.0 click==8.5.1 defusedxml==0.7.1 \
#     fastapi==0.165.0 h11==0.16.0 nltk==3.10.4 opentelemetry-api==1.45.2 pydantic==2.14.3 \
#     pydantic-core==2.50.4 pydantic-settings==2.16.3 python-dotenv==1.2.4 sentencepiece==0.2.1 \
#     sse-starlette==3.7.0 starlette==1.10.0 typing-inspection==0.4.5 uvicorn==0.54.0
#
# Steps, each timed; everything lands under $OUT (else bench/results/device): device.log,
# bundle.log, quick/gpu.json, full/gpu.json. 1. the wheels into /tmp/site, on PYTHONPATH with
# this tree, every module the run needs imported once; 2. the full-size bundle (`sonar-llm tiny
# DIR --preset full --llm 100m`) built in the background while 3. `bench/gpu.py --quick` runs
# (at most 3 minutes); 4. `bench/gpu.py` on the full bundle, cut off so that the whole command
# ends within $DEVICE_SH_SECONDS (570). Exits with the first failed run's status.
#
#   bash bench/device.sh          # on the GPU machine (about 9.5 minutes)
#   bash bench/device.sh --cpu    # every step on a CPU with the tiny bundle (a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
cpu=false
[ "${1:-}" = --cpu ] && cpu=true
out=${OUT:-bench/results/device}
mkdir -p "$out"
out=$(cd "$out" && pwd)
exec > >(tee "$out/device.log") 2>&1
start=$SECONDS
limit=${DEVICE_SH_SECONDS:-570}
python=${PYTHON:-python3}
work=${DEVICE_SH_WORK:-${TMPDIR:-/tmp}/sonar-llm-device}
step() { echo; echo "### $1 ($((SECONDS - start)) s in)"; }

step "1. packages"
site=$work/site
if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl
fi
export PYTHONPATH=$site:$root${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
"$python" - <<'EOF'
import importlib, platform, sys
needed = ["torch", "numpy", "sentencepiece", "safetensors", "yaml", "transformers", "fastapi",
          "pydantic", "pydantic_settings", "uvicorn", "sse_starlette", "nltk", "prometheus_client",
          "httpx", "models.pipeline", "server.engine", "server.cli"]
missing = []
for name in needed:
    try:
        importlib.import_module(name)
    except ImportError as e:
        missing.append(f"{name} ({e})")
if missing:
    sys.exit("cannot import: " + "; ".join(missing) + " (carry .whl/: see bench/device.sh)")
import sentencepiece, torch, transformers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
      f"{transformers.__version__}, sentencepiece {sentencepiece.__version__}; CUDA: {gpu}")
EOF

step "2. bundle"
if $cpu; then
    device=cpu
    bundle=$work/tiny-bundle
    preset=(--preset tiny)
else
    device=cuda
    bundle=$work/full-bundle
    preset=(--preset full --llm 100m)
fi
if [ -f "$bundle/bundle.json" ]; then
    echo "already built: $bundle"
    builder=""
else
    rm -rf "$bundle"
    (
        t0=$SECONDS
        "$python" -m server.cli tiny "$bundle" "${preset[@]}"
        echo "bundle built in $((SECONDS - t0)) s"
    ) >"$out/bundle.log" 2>&1 &
    builder=$!
    $cpu && { wait "$builder" || { cat "$out/bundle.log"; exit 1; }; builder=""; }
fi

step "3. bench/gpu.py --quick"
quick=(--quick --out "$out/quick" --cache-dir "$work")
$cpu && quick+=(--bundle "$bundle")
status=0  # the first failing run's exit status, this script's own (the next run still goes)
timeout 180 "$python" bench/gpu.py --device "$device" "${quick[@]}" || status=$?
[ "$status" = 0 ] || echo "quick run: exit $status"

if [ -n "$builder" ]; then
    wait "$builder" || { cat "$out/bundle.log"; exit 1; }
fi
cat "$out/bundle.log" 2>/dev/null | tail -1

step "4. bench/gpu.py on the $(basename "$bundle")"
left=$((limit - (SECONDS - start)))
full=(--bundle "$bundle" --out "$out/full" --budget-s $((left - 120)))
$cpu && full+=(--quick)
rc=0
timeout "$left" "$python" bench/gpu.py --device "$device" "${full[@]}" || rc=$?
[ "$rc" = 0 ] || { echo "full run: exit $rc"; [ "$status" != 0 ] || status=$rc; }
echo
echo "device.sh done in $((SECONDS - start)) s (exit $status); results in $out"
exit "$status"
