#!/usr/bin/env bash
# One GPU check, at most ~8 minutes on an H100, no network:
#   1. what is here: GPU, driver, torch, onnxruntime and its execution providers;
#   2. if onnxruntime has CUDAExecutionProvider: `recipec build` of a mid-size synthetic llama
#      (baseline fp32, fp16, int4), profiled on CUDA at concurrency 1 and 8, and its numbers printed;
#   3. always: PyTorch eager fp16 on CUDA on the same config and workload, as the reference.
# Results go to $OUT (or bench/results/gpu-<time>/): recipe, report.json/md, torch_eager.json, logs.
# Usage: bash bench/gpu_check.sh [--cpu]   (from the repository root, with the venv active or at .venv)
#   --cpu: the same script end to end on the CPU at a tiny size (fp32 eager), so that it is tested where no GPU
#          is lent (tests/test_gpu_check.py); its numbers mean nothing for a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && [ -z "${VIRTUAL_ENV:-}" ] && . .venv/bin/activate
DEVICE=cuda
[ "${1:-}" = "--cpu" ] && DEVICE=cpu
OUT="${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # nothing may reach the network
BUILD_BUDGET_S=330  # leaves ~2.5 min for the eager reference and start-up inside 8 minutes

if [ "$DEVICE" = cuda ]; then
  # A ~0.4B llama: big enough that decode is bandwidth-bound on an H100, small enough to export in ~1 min.
  HIDDEN=1536 LAYERS=12 HEADS=12 KV_HEADS=4 FFN=4096 VOCAB=32000
  PROMPT=256 OUTPUT=64 REQUESTS=16 EAGER_DTYPE=float16
else
  HIDDEN=64 LAYERS=2 HEADS=4 KV_HEADS=2 FFN=128 VOCAB=256
  PROMPT=16 OUTPUT=8 REQUESTS=4 EAGER_DTYPE=float32
fi

echo "== environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi not found"
python - <<'EOF'
import importlib.metadata as md
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
for dist in ("onnxruntime-gpu", "onnxruntime"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
try:
    import onnxruntime as ort
    print("onnxruntime providers", ort.get_available_providers())
except ImportError as exc:
    print("onnxruntime import failed:", exc)
EOF

HAS_ORT_CUDA=$(python -c "import onnxruntime as o; print(int('CUDAExecutionProvider' in o.get_available_providers()))" 2>/dev/null || echo 0)
[ "$DEVICE" = cpu ] && HAS_ORT_CUDA=1  # the dry run takes the ONNX path on the CPU provider

cat > "$WORK/gpu-check.yaml" <<EOF
recipe: 1
name: gpu-check
description: bench/gpu_check.sh — synthetic llama, fp16 and int4 on $DEVICE
model:
  source: synthetic
  family: llama
  config: {hidden_size: $HIDDEN, num_hidden_layers: $LAYERS, num_attention_heads: $HEADS,
           num_key_value_heads: $KV_HEADS, intermediate_size: $FFN, vocab_size: $VOCAB}
  seed: 0
data:
  eval: {source: synthetic, samples: 4, seq_len: 128, seed: 1}
# Random weights give near-tied logits: top-1 agreement is noise there (int4 scores about 0.3), so only the
# schemes' KL bounds apply.
passes:
  - {id: fp16, op: quantize, with: {scheme: fp16, min_top1: 0}}
  - {id: int4, op: quantize, after: source, with: {scheme: int4, block_size: 32, min_top1: 0}}
serving:
  device: $DEVICE
  batching: {policy: continuous, max_batch_size: 8}
  workload: {prompt_tokens: $PROMPT, output_tokens: $OUTPUT, requests: $REQUESTS, warmup_requests: 2,
             concurrency: [1, 8], arrival: closed}
EOF
cp "$WORK/gpu-check.yaml" "$OUT/"

echo
if [ "$HAS_ORT_CUDA" != "1" ]; then
  echo "== ONNX path NOT MEASURED: onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu, docs/gpu.md)."
elif ! recipec build --help >/dev/null 2>&1; then
  echo "== ONNX path NOT MEASURED: the recipec CLI (recipec build) is not available in this checkout."
elif ! recipec validate "$WORK/gpu-check.yaml" >"$OUT/validate.log" 2>&1; then
  echo "== ONNX path NOT MEASURED: this checkout rejects the check's recipe:"
  cat "$OUT/validate.log"
else
  echo "== recipec build on $DEVICE (budget ${BUILD_BUDGET_S}s)"
  timeout "$BUILD_BUDGET_S" recipec build "$WORK/gpu-check.yaml" --out "$WORK/out" --device "$DEVICE" --cache-dir "$WORK/cache" \
      >"$OUT/build.log" 2>&1
  rc=$?
  tail -n 20 "$OUT/build.log"
  cp -r "$WORK/out/gpu-check/report.json" "$WORK/out/gpu-check/report.md" "$WORK/out/gpu-check/plots" "$OUT/" 2>/dev/null
  if [ -f "$OUT/report.json" ]; then
    python - "$OUT/report.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
h = r["hardware"]
print(f"peaks: {h['peak_bandwidth_gb_s']} GB/s ({h['peak_bandwidth_source']}), {h['peak_tflops']} TFLOP/s")
print(f"{'variant':<10}{'conc':>5}{'TTFT p50':>10}{'TPOT p50':>10}{'out tok/s':>11}{'MBU':>8}{'MFU':>8}{'peak MiB':>9}")
pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
for name, v in r["variants"].items():
    for run in v["serving"]:
        print(f"{name:<10}{run.get('concurrency') or '-':>5}{run['ttft_ms']['p50']:>10.2f}{run['tpot_ms']['p50']:>10.2f}"
              f"{run['output_throughput_tok_s']:>11.1f}{pct(run['mbu']):>8}{pct(run['mfu']):>8}{run['peak_memory_mb'] or 0:>9.0f}")
EOF
  else
    echo "recipec build left no report (exit $rc); see $OUT/build.log"
  fi
fi

echo
echo "== PyTorch eager $EAGER_DTYPE on $DEVICE (reference; same config, prompt $PROMPT, output $OUTPUT)"
# The same measurement bench/run.py makes on the CPU (bench/common.py torch-eager: transformers generate,
# a streamer timestamps each token; batch B = B requests together), here in fp16 on the GPU.
CONFIG_JSON="{\"model_type\": \"llama\", \"seed\": 0, \"hidden_size\": $HIDDEN, \"num_hidden_layers\": $LAYERS,
  \"num_attention_heads\": $HEADS, \"num_key_value_heads\": $KV_HEADS, \"intermediate_size\": $FFN, \"vocab_size\": $VOCAB}"
if [ "$DEVICE" = cuda ] && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "torch has no CUDA (torch $(python -c 'import torch; print(torch.__version__)' 2>/dev/null)): PyTorch path not measured either"
elif timeout 150 python bench/common.py torch-eager --config-json "$CONFIG_JSON" --device "$DEVICE" --dtype "$EAGER_DTYPE" \
       --batches 1,8 --prompt "$PROMPT" --output "$OUTPUT" --requests 8 --out "$OUT/torch_eager.json" 2>"$OUT/torch_eager.log"; then
  python - "$OUT/torch_eager.json" <<'EOF'
import json, sys
import torch
sys.path.insert(0, "bench")
from common import decode_step_bytes, mbu
from recipec.profile.hardware import known_gpu
from recipec.profile.metrics import ModelCost, decode_flops, prefill_flops

r = json.load(open(sys.argv[1]))
c, P, O = r["cost"], r["prompt_tokens"], r["output_tokens"]
spec = known_gpu(torch.cuda.get_device_name(0)) if r["device"] == "cuda" else None
print("peaks:", spec["source"] if spec else f"no GPU peaks for {r['device']}: MBU/MFU not computed")
kv_elem = c["kv_bytes_per_token"] // (2 * c["num_layers"] * c["num_kv_heads"] * c["head_dim"])
cost = ModelCost(weight_bytes_per_step=c["weight_bytes_per_decode_step"], active_params=c["active_parameters"],
                 num_layers=c["num_layers"], num_heads=c["num_heads"], num_kv_heads=c["num_kv_heads"],
                 head_dim=c["head_dim"], kv_bytes_per_elem=kv_elem)
print(f"parameters {c['parameters'] / 1e6:.0f}M")
p50 = lambda v: sorted(v)[len(v) // 2]
for run in r["runs"]:
    b, s = run["batch"], run["samples"]
    ttft, tpot, e2e = p50(s["ttft_ms"]), p50(s["tpot_ms"]), p50(s["e2e_latency_ms"])
    extra = ""
    if spec:
        u = mbu(decode_step_bytes(c["weight_bytes_per_decode_step"], c["kv_bytes_per_token"], b, P, O), tpot, spec["bw"])
        flops = b * (prefill_flops(cost, P) + sum(decode_flops(cost, P + i + 1) for i in range(O - 1)))
        extra = f"  MBU {100 * u:.1f}%  MFU {100 * flops / (e2e / 1e3) / (spec['tflops']['float16'] * 1e12):.1f}%"
    print(f"batch {b}: TTFT {ttft:.2f} ms  TPOT {tpot:.2f} ms  {p50(s['output_throughput_tok_s']):.0f} tok/s  "
          f"peak {run['peak_memory_mb']:.0f} MiB{extra}")
EOF
else
  echo "PyTorch eager run failed:"; tail -n 20 "$OUT/torch_eager.log"
fi
echo
echo "results in $OUT"
