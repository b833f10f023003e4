#!/usr/bin/env bash
# Merges variants of SEED_DIR's inputs into fuzz/corpus/TARGET, then variants of the
# inputs that this merge kept, and so on. Each generation starts from the inputs that the
# one before added, and the run stops when a generation adds nothing or after MAX
# generations. The corpus folder changes in place, and the seeds themselves are not added.
#
# Usage: fuzz/scripts/variant_generations.sh TARGET SEED_DIR [MAX]
#   TARGET is config, profile or influxql; MAX defaults to 50.
# Build the targets first: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build -s none
set -euo pipefail

usage="usage: variant_generations.sh TARGET SEED_DIR [MAX]"
if [[ $# -lt 2 || $# -gt 3 ]]; then
  echo "$usage" >&2
  exit 2
fi
target=$1
seeds=$2
max=${3-50}
case $target in
  config | profile | influxql) ;;
  *) echo "target $target has no variant script; use config, profile or influxql" >&2; exit 2 ;;
esac
[[ -d $seeds ]] || { echo "seed folder $seeds not found; name a folder of inputs" >&2; exit 2; }
[[ $max =~ ^[0-9]+$ && $max -ge 1 ]] || { echo "MAX '$max' is invalid; write a number of generations of at least 1, such as 50" >&2; exit 2; }

fuzz=$(cd "$(dirname "$0")/.." && pwd)
host=$(rustc -vV | sed -n 's/^host: //p')
binary=$fuzz/target/$host/release/$target
[[ -x $binary ]] || { echo "$binary not found; build it: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build -s none $target" >&2; exit 2; }
corpus=$fuzz/corpus/$target
work=$(mktemp -d)
merge_pid=""
trap 'rm -rf "$work"' EXIT
trap '[[ -n $merge_pid ]] && kill "$merge_pid" 2> /dev/null; exit 130' INT TERM

mkdir "$work/seeds" "$work/artifacts"
find "$seeds" -maxdepth 1 -type f -exec cp -t "$work/seeds" {} +
if [[ -z $(ls -A "$work/seeds") ]]; then
  echo "seed folder $seeds has no files; name a folder of inputs" >&2
  exit 2
fi

for ((generation = 1; generation <= max; generation++)); do
  rm -rf "$work/variants"
  if [[ $target == influxql ]]; then
    written=$(python3 "$fuzz/scripts/influxql_variants.py" "$work/seeds" "$fuzz/dicts/influxql.dict" "$work/variants" 150000)
  else
    written=$(python3 "$fuzz/scripts/toml_variants.py" "$work/seeds" "$work/variants")
  fi
  if [[ -z $(ls -A "$work/variants") ]]; then
    echo "generation $generation: no variants ($written)"
    break
  fi
  ls "$corpus" | sort > "$work/before"
  # libFuzzer resumes a merge from an existing control file, which lists the previous
  # generation's files.
  rm -f "$work/merge-control"
  # Run the merge in the background, so that Ctrl-C stops it rather than waiting for it.
  "$binary" -merge=1 -set_cover_merge=1 -use_counters=0 -rss_limit_mb=4096 \
    -merge_control_file="$work/merge-control" -artifact_prefix="$work/artifacts/" \
    "$corpus" "$work/variants" 2> "$work/merge.log" &
  merge_pid=$!
  status=0
  wait "$merge_pid" || status=$?
  merge_pid=""
  # libFuzzer restarts a merge whose inner process crashed and then reports success, so
  # a crash shows only in the log.
  if [[ $status -ne 0 ]] || grep -qE 'deadly signal|panicked|successful in ([2-9]|[0-9]{2,}) attempt' "$work/merge.log"; then
    kept_log=$(mktemp "/tmp/variant-merge-$target.XXXXXX.log")
    cp "$work/merge.log" "$kept_log"
    mkdir -p "$fuzz/artifacts/$target"
    cp "$work/artifacts/"* "$fuzz/artifacts/$target/" 2> /dev/null || true
    echo "the merge of generation $generation failed (exit status $status), or an input crashed the target." >&2
    echo "Read the merge log $kept_log; crashing inputs are in $fuzz/artifacts/$target/." >&2
    exit 1
  fi
  rm -rf "$work/seeds"
  mkdir "$work/seeds"
  # A kept variant is a new corpus file with a variant's name (both are SHA-1 names), so a
  # file that another process writes into the corpus meanwhile is not counted.
  ls "$corpus" | sort | comm -13 "$work/before" - > "$work/added"
  ls "$work/variants" | sort | comm -12 "$work/added" - | while read -r name; do
    cp "$work/variants/$name" "$work/seeds/"
  done
  kept=$(ls "$work/seeds" | wc -l)
  echo "generation $generation: $(ls "$work/variants" | wc -l) variants, $kept kept"
  if [[ $kept -eq 0 ]]; then
    break
  fi
  if [[ $generation -eq $max ]]; then
    echo "stopped after $max generations; the last one still kept inputs"
  fi
done
