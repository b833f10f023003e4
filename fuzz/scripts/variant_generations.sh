#!/usr/bin/env bash
# Merges variants of SEED_DIR's inputs into fuzz/corpus/TARGET, then variants of the
# inputs that the merge kept, and so on: each generation starts from the inputs the one
# before added. It stops when a generation adds nothing, or after MAX generations.
#
# Usage: fuzz/scripts/variant_generations.sh TARGET SEED_DIR [MAX]
#   TARGET is config, profile or influxql; MAX defaults to 50.
# Build the targets first: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build -s none
set -euo pipefail

usage="usage: fuzz/scripts/variant_generations.sh TARGET SEED_DIR [MAX]"
target=${1:?$usage}
seeds=${2:?$usage}
max=${3:-50}
case $target in
  config | profile | influxql) ;;
  *) echo "target $target has no variant script; use config, profile or influxql" >&2; exit 2 ;;
esac
[[ -d $seeds ]] || { echo "seed folder $seeds not found; name a folder of inputs" >&2; exit 2; }
compgen -G "$seeds/*" > /dev/null || { echo "seed folder $seeds is empty; name a folder of inputs" >&2; exit 2; }
[[ $max =~ ^[0-9]+$ ]] || { echo "MAX $max is invalid; write a number of generations such as 50" >&2; exit 2; }

fuzz=$(cd "$(dirname "$0")/.." && pwd)
binary=$fuzz/target/x86_64-unknown-linux-gnu/release/$target
[[ -x $binary ]] || { echo "$binary not found; build it: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build -s none $target" >&2; exit 2; }
corpus=$fuzz/corpus/$target
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mkdir "$work/seeds"
cp "$seeds"/* "$work/seeds/"
for generation in $(seq 1 "$max"); do
  rm -rf "$work/variants"
  if [[ $target == influxql ]]; then
    python3 "$fuzz/scripts/influxql_variants.py" "$work/seeds" "$fuzz/dicts/influxql.dict" "$work/variants" 150000 > /dev/null
  else
    python3 "$fuzz/scripts/toml_variants.py" "$work/seeds" "$work/variants" > /dev/null
  fi
  ls "$corpus" | sort > "$work/before"
  if ! "$binary" -merge=1 -set_cover_merge=1 -use_counters=0 -rss_limit_mb=4096 \
    "$corpus" "$work/variants" 2> "$work/merge.log"; then
    tail -n 20 "$work/merge.log" >&2
    echo "the merge of generation $generation failed; its log ends above" >&2
    exit 1
  fi
  ls "$corpus" | sort > "$work/after"
  rm -rf "$work/seeds"
  mkdir "$work/seeds"
  comm -13 "$work/before" "$work/after" | while read -r name; do cp "$corpus/$name" "$work/seeds/"; done
  added=$(ls "$work/seeds" | wc -l)
  echo "generation $generation: $(ls "$work/variants" | wc -l) variants, $added kept"
  [[ $added -eq 0 ]] && break
done
