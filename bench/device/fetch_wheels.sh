#!/bin/bash
# Wheels for a lent GPU machine that has torch / transformers' image but nothing of ours and no network:
# the versions this venv runs, for CPython 3.12 on x86-64, into .whl/ (git-ignored; carry it).
# bitsandbytes is cut down to its CPU and CUDA 13 libraries so the carried tree stays under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
names="bitsandbytes datasets dill multiprocess grpcio grpcio-health-checking grpcio-reflection grpcio-status
protobuf HyperPyYAML ruamel.yaml ruamel.yaml.clib pydantic pydantic_core annotated-types typing-inspection
soundfile soxr speechbrain trl transformers peft huggingface_hub httpx2 httpcore2 truststore tokenizers
jiwer RapidFuzz accelerate whisper_normalizer text2num more-itertools indic_numtowords cffi pycparser"
freeze=$(.venv/bin/pip freeze 2>/dev/null)
for name in $names; do
  pin=$(echo "$freeze" | grep -i "^${name}==" | head -1 || true)
  [ -n "$pin" ] || pin=$name
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$pin"
done
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl googleapis-common-protos
wheel=$(ls .whl/bitsandbytes-*.whl)
tmp=$(mktemp -d)
(cd "$tmp" && unzip -q "$OLDPWD/$wheel" && rm -f bitsandbytes/libbitsandbytes_cuda1{18,21,24,26,28}.so \
  bitsandbytes/libbitsandbytes_rocm*.so && rm "$OLDPWD/$wheel" && zip -qr "$OLDPWD/$wheel" .)
rm -rf "$tmp"
du -sh .whl
