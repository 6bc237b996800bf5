#!/usr/bin/env bash
# Fetch, here (a package registry reachable), the wheels bench/gpu/run.sh installs on a GPU machine
# that has torch but no network: bash bench/gpu/build_wheels.sh [--full]
#
# Default (~6 MB): DeepSpeed built as a wheel (pure Python: its ops are JIT-built, none is needed
# with torch AdamW) plus its requirements a torch image may lack (hjson, pydantic and its parts,
# py-cpuinfo, msgpack, ninja, einops) and pytest for tests/gpu. --full adds what raylm's loop imports besides torch,
# except pyarrow (transformers, tokenizers, safetensors, huggingface-hub, ...): ~32 MB in all.
# pyarrow (the parquet reader) is 55 MB on its own: with it the set is ~82 MB, over the 64 MiB a
# GPU machine here can receive, so an image without pyarrow cannot run this benchmark as is. The
# H200 image here has pyarrow, transformers, tokenizers and safetensors: the default set suffices.
# Wheels go to bench/gpu/wheels/ (git-ignored; WHEELS=DIR elsewhere). Binary wheels are for
# CPython $PYVER (default 3.12, the GPU image's) on manylinux x86_64. Versions follow this venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=${PIP:-.venv/bin/pip}
PYVER=${PYVER:-3.12}
OUT=${WHEELS:-bench/gpu/wheels}
mkdir -p "$OUT"

version() { "$PIP" show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
pins() { for name in "$@"; do v=$(version "$name"); echo "$name${v:+==$v}"; done; }

"$PIP" wheel -q --no-deps -w "$OUT" "deepspeed==$(version deepspeed)"
small=(hjson pydantic pydantic-core annotated-types typing-inspection py-cpuinfo msgpack ninja einops
       pytest pluggy iniconfig)
full=(transformers tokenizers safetensors huggingface-hub hf-xet regex pyyaml filelock typer-slim)
names=("${small[@]}")
[[ "${1:-}" == "--full" ]] && names+=("${full[@]}")
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux_2_5_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
"$PIP" download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" -d "$OUT" $(pins "${names[@]}")
ls -l "$OUT"
du -sh "$OUT"
