#!/usr/bin/env bash
# End-to-end benchmark: cki-splice on N synthetic 1 GiB checkpoints (largest
# tensor 64 MiB) against reading the same files with cat, with peak memory
# from /usr/bin/time -v.
#
# Usage: benchmarks/end_to_end.sh BUILD_DIR [WORK_DIR] [N] [THREADS] [METHOD]
#   BUILD_DIR  a build with CKI_BUILD_BENCHMARKS=ON and the examples
#              (cki_make_checkpoints and cki-splice)
#   WORK_DIR   where the checkpoints go (default: a new directory under
#              /tmp); needs (N + 1) GiB free and is deleted at the end
#   N          number of models (default 4)
#   THREADS    threads for cki-splice (default 1)
#   METHOD     cki-splice --method (default cki-soft)
#
# Both timed runs read the files from the page cache: cat runs once before
# the timed runs to load them. The memory bound checked is the one of
# streamed merges: (N + 1) x 64 MiB + 100 MiB.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 BUILD_DIR [WORK_DIR] [N] [THREADS] [METHOD]" >&2
  exit 2
fi
build_dir=$1
work_dir=${2:-$(mktemp -d /tmp/cki-end-to-end.XXXXXX)}
models=${3:-4}
threads=${4:-1}
method=${5:-cki-soft}

make_checkpoints=$build_dir/benchmarks/cki_make_checkpoints
splice=$build_dir/examples/cki-splice
for program in "$make_checkpoints" "$splice"; do
  if [[ ! -x $program ]]; then
    echo "$program not found: build the targets cki_make_checkpoints and cki-splice first" >&2
    exit 1
  fi
done

mkdir -p "$work_dir"
trap 'rm -rf "$work_dir"' EXIT

"$make_checkpoints" "$work_dir" "$models"
inputs=()
for ((k = 1; k <= models; ++k)); do inputs+=("$work_dir/model_$k.safetensors"); done
input_bytes=$(du -cb "${inputs[@]}" | tail -1 | cut -f1)

# Prints "seconds peak_kib" from a /usr/bin/time -v log.
summarise() {
  awk -F': ' '
    /Elapsed \(wall clock\) time/ {
      n = split($2, part, ":"); seconds = 0
      for (i = 1; i <= n; ++i) seconds = seconds * 60 + part[i]
    }
    /Maximum resident set size/ { rss = $2 }
    END { printf "%.2f %d\n", seconds, rss }' "$1"
}

cat "${inputs[@]}" > /dev/null
/usr/bin/time -v -o "$work_dir/cat.time" cat "${inputs[@]}" > /dev/null
/usr/bin/time -v -o "$work_dir/splice.time" "$splice" "${inputs[@]}" -o "$work_dir/merged.safetensors" \
  --method "$method" --threads "$threads" --quiet --force

read -r cat_seconds cat_rss < <(summarise "$work_dir/cat.time")
read -r splice_seconds splice_rss < <(summarise "$work_dir/splice.time")
limit_kib=$(((models + 1) * 64 * 1024 + 100 * 1024))

echo "models: $models, input: $((input_bytes / 1048576)) MiB, method: $method, threads: $threads"
echo "cat:        ${cat_seconds} s, peak RSS $((cat_rss / 1024)) MiB"
echo "cki-splice: ${splice_seconds} s, peak RSS $((splice_rss / 1024)) MiB (bound $((limit_kib / 1024)) MiB)"
awk -v c="$cat_seconds" -v s="$splice_seconds" 'BEGIN { if (s > 0) printf "t_cat / t_splice: %.3f\n", c / s }'
if ((splice_rss > limit_kib)); then
  echo "peak RSS exceeds the bound" >&2
  exit 1
fi
