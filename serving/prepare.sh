#!/usr/bin/env bash
# One-shot model-repository preparation for docker compose (services `prepare`, `prepare-cpu`).
#
# Runs in the image built from serving/Dockerfile with the repository checkout mounted read-only
# at /workspace (so NECO_SOURCE may be e.g. outputs/<run>/artefact) and ./model_repository
# mounted read-write at /models. Exits 0 without work when /models already holds the requested
# model for the requested backend and device kind (set NECO_FORCE_EXPORT=1 to rebuild), so
# `docker compose up` is cheap after the first run. Triton starts only if this exits 0.
set -euo pipefail

: "${NECO_SOURCE:?set NECO_SOURCE to a training artefact dir under the repo or a timm DINOv2 id}"
NECO_MODEL_NAME="${NECO_MODEL_NAME:-neco_dinov2}"
NECO_BACKEND="${NECO_BACKEND:-tensorrt}"
NECO_INSTANCE_KIND="${NECO_INSTANCE_KIND:-KIND_GPU}"
NECO_FORCE_EXPORT="${NECO_FORCE_EXPORT:-0}"
REPOSITORY="${NECO_REPOSITORY:-/models}"
model_dir="${REPOSITORY}/${NECO_MODEL_NAME}"

say() { echo "prepare: $*" >&2; }

case "${NECO_BACKEND}" in
  onnxruntime) export_config=configs/export_onnx.yaml ;;
  tensorrt) export_config=configs/export_tensorrt.yaml ;;
  *) say "NECO_BACKEND must be onnxruntime or tensorrt, got '${NECO_BACKEND}'"; exit 2 ;;
esac
if [[ "${NECO_BACKEND}" == tensorrt && "${NECO_INSTANCE_KIND}" != KIND_GPU ]]; then
  say "the tensorrt backend needs NECO_INSTANCE_KIND=KIND_GPU"; exit 2
fi

if [[ "${NECO_FORCE_EXPORT}" != 1 && -f "${model_dir}/config.pbtxt" ]] \
  && grep -q "backend: \"${NECO_BACKEND}\"" "${model_dir}/config.pbtxt" \
  && grep -q "kind: ${NECO_INSTANCE_KIND}" "${model_dir}/config.pbtxt"; then
  say "${model_dir} already serves ${NECO_BACKEND} on ${NECO_INSTANCE_KIND}; nothing to do (NECO_FORCE_EXPORT=1 rebuilds)"
  exit 0
fi

if [[ ! -e "${NECO_SOURCE}" ]]; then
  # A timm id: neco's loader reads pretrained weights from the HF cache only (never downloads),
  # so fetch them into the cache volume first.
  say "fetching pretrained weights for ${NECO_SOURCE} into ${HF_HOME:-the HF cache}"
  python - "${NECO_SOURCE}" <<'PY'
import sys

import timm
from huggingface_hub import snapshot_download

cfg = timm.models.get_pretrained_cfg(sys.argv[1])
if cfg is None or not cfg.hf_hub_id:
    sys.exit(f"prepare: {sys.argv[1]!r} is neither a path under the repository nor a timm id with weights")
snapshot_download(cfg.hf_hub_id)
PY
fi

say "exporting ${NECO_SOURCE} -> ${model_dir} (${NECO_BACKEND}, ${NECO_INSTANCE_KIND})"
if [[ "${NECO_BACKEND}" == onnxruntime ]]; then
  neco export onnx --config "${export_config}" --source "${NECO_SOURCE}" --out "${REPOSITORY}" \
    --model-name "${NECO_MODEL_NAME}" --overwrite "triton.instance_kind=${NECO_INSTANCE_KIND}"
else
  # Engine build with this image's TensorRT (same release as Triton's backend), parity-checked
  # against the FP32 ONNX by neco export; caches live in the trt-cache volume.
  neco export tensorrt --config "${export_config}" --source "${NECO_SOURCE}" --out "${REPOSITORY}" \
    --model-name "${NECO_MODEL_NAME}" --overwrite \
    tensorrt.timing_cache=/cache/tensorrt/timing.cache tensorrt.engine_cache_dir=/cache/tensorrt/engines
  trtexec_bin="$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)"
  say "checking the engine deserialises and runs with ${trtexec_bin}"
  "${trtexec_bin}" --loadEngine="${model_dir}/1/model.plan" --shapes=images:1x224x224x3 --iterations=5 --avgRuns=5
fi
say "done: $(neco export inspect "${model_dir}" | tr -d '\n' | cut -c1-200)"
