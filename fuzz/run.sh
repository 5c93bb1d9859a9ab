#!/usr/bin/env bash
# Builds the libFuzzer targets and runs each for SECONDS seconds, one after
# the other (one process at a time). Exits 1 when any target finds a crash,
# a sanitizer report, an uncaught exception, a leak or a timeout.
#
#   fuzz/run.sh SECONDS [TARGET...]
#
# Fuzz for an hour per target:  fuzz/run.sh 3600
#
# Environment: CKI_FUZZ_BUILD_DIR (default build-fuzz beside fuzz/),
# CKI_FUZZ_SKIP_BUILD=1 to reuse an existing build.
# The corpus each run grows is kept in BUILD_DIR/corpus/TARGET and reused by
# the next run; crashing inputs land in BUILD_DIR/artifacts/TARGET/. Copy a
# crashing input into tests/data/fuzz_regressions/ once it is fixed.
set -uo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: fuzz/run.sh SECONDS [TARGET...]  (targets: fuzz_safetensors fuzz_shard_index)" >&2
  exit 2
fi
seconds="$1"
shift
targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=(fuzz_safetensors fuzz_shard_index)

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${CKI_FUZZ_BUILD_DIR:-$root/build-fuzz}"
if [[ "${CKI_FUZZ_SKIP_BUILD:-0}" != 1 ]]; then
  bash "$root/fuzz/build.sh" "$build" || exit 1
fi

declare -A seeds=([fuzz_safetensors]=safetensors [fuzz_shard_index]=shard_index)
failed=()
for target in "${targets[@]}"; do
  if [[ -z "${seeds[$target]:-}" ]]; then
    echo "fuzz/run.sh: unknown target '$target'; expected fuzz_safetensors or fuzz_shard_index" >&2
    exit 2
  fi
  corpus="$build/corpus/$target"
  artifacts="$build/artifacts/$target"
  mkdir -p "$corpus" "$artifacts"
  echo "fuzzing $target for $seconds s (corpus $corpus)" >&2
  # -max_len 16384 admits headers with dozens of tensors. -timeout 10 and
  # -rss_limit_mb 2048 turn hangs and runaway allocations into findings.
  # New inputs go into the first folder; the seeds and the kept regressions
  # are read only.
  "$build/$target" "$corpus" "$build/seeds/${seeds[$target]}" \
      "$root/tests/data/fuzz_regressions/${seeds[$target]}" \
      -dict="$root/fuzz/safetensors.dict" \
      -max_total_time="$seconds" -max_len=16384 -timeout=10 -rss_limit_mb=2048 \
      -artifact_prefix="$artifacts/" -print_final_stats=1
  status=$?
  if [[ $status -ne 0 ]]; then
    echo "fuzz/run.sh: $target failed with status $status; inputs in $artifacts" >&2
    failed+=("$target")
  fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "fuzz/run.sh: findings in: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz/run.sh: no findings in ${targets[*]} after $seconds s each" >&2
