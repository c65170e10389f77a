#!/usr/bin/env bash
# One-shot model-repository preparation for docker compose (services `prepare`, `prepare-cpu`).
#
# Runs in the image built from serving/Dockerfile with the repository checkout mounted read-only
# at /workspace (so NECO_SOURCE may be e.g. outputs/<run>/artefact) and ./model_repository
# mounted read-write at /models. Exits 0 without work when /models already holds the requested
# model for the requested backend and device kind (set NECO_FORCE_EXPORT=1 to rebuild), so
# `docker compose up` is cheap after the first run. Triton starts only if this exits 0.
#
# What is served (docs/serving.md): NECO_SOURCE if set; else the newest training artefact
# under outputs/ (outputs/<run>/artefact/metadata.json) as model `neco_dinov2`; else the stock
# DINOv2 weights NECO_STOCK_SOURCE as model `dinov2_stock`, so stock weights never pass for NeCo.
# NECO_MODEL_NAME overrides the name. The chosen name is written to <repository>/.neco_model,
# which the triton services read to load exactly that model.
set -euo pipefail

NECO_STOCK_SOURCE="${NECO_STOCK_SOURCE:-vit_small_patch14_reg4_dinov2.lvd142m}"
NECO_OUTPUTS="${NECO_OUTPUTS:-outputs}"

say() { echo "prepare: $*" >&2; }

if [[ -z "${NECO_SOURCE:-}" ]]; then
  newest_metadata="$(ls -1t "${NECO_OUTPUTS}"/*/artefact/metadata.json 2>/dev/null | head -n 1 || true)"
  if [[ -n "${newest_metadata}" ]]; then
    NECO_SOURCE="$(dirname "${newest_metadata}")"
    default_name=neco_dinov2
    say "serving the newest training artefact ${NECO_SOURCE} (set NECO_SOURCE to choose another)"
  else
    NECO_SOURCE="${NECO_STOCK_SOURCE}"
    default_name=dinov2_stock
    say "no training artefact under ${NECO_OUTPUTS}/*/artefact: serving the stock weights ${NECO_SOURCE} as ${default_name}"
  fi
elif [[ -e "${NECO_SOURCE}" ]]; then
  default_name=neco_dinov2
else
  default_name=dinov2_stock  # a timm id: stock weights
fi
NECO_MODEL_NAME="${NECO_MODEL_NAME:-${default_name}}"
NECO_BACKEND="${NECO_BACKEND:-tensorrt}"
NECO_INSTANCE_KIND="${NECO_INSTANCE_KIND:-KIND_GPU}"
NECO_FORCE_EXPORT="${NECO_FORCE_EXPORT:-0}"
REPOSITORY="${NECO_REPOSITORY:-/models}"
model_dir="${REPOSITORY}/${NECO_MODEL_NAME}"
served_name_file="${REPOSITORY}/.neco_model"

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
  echo "${NECO_MODEL_NAME}" > "${served_name_file}"
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
echo "${NECO_MODEL_NAME}" > "${served_name_file}"
say "done: $(neco export inspect "${model_dir}" | tr -d '\n' | cut -c1-200)"
