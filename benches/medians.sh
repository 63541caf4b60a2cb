#!/usr/bin/env bash
# Prints criterion's median (ns) of every benchmark of the last `cargo bench --bench debit`,
# and the ratio creditd / baseline within each group (same run).
# Usage: benches/medians.sh [target-dir]   (default: ./target)
set -euo pipefail
dir="${1:-target}/criterion"
[ -d "$dir" ] || { echo "no $dir: run cargo bench --bench debit first" >&2; exit 1; }
find "$dir" -path '*/new/benchmark.json' | sort | while read -r b; do
  est="$(dirname "$b")/estimates.json"
  printf '%s\t%s\t%.1f\n' "$(jq -r .group_id "$b")" "$(jq -r .function_id "$b")" \
    "$(jq -r .median.point_estimate "$est")"
done | awk -F'\t' '
  { printf "%-28s %-40s %8.1f ns\n", $1, $2, $3; m[$1, $2] = $3; g[$1] = 1 }
  END {
    for (k in g) {
      if ((k, "creditd") in m && (k, "mutex-hashmap") in m)
        printf "ratio %-22s creditd/mutex-hashmap = %.2f\n", k, m[k, "creditd"] / m[k, "mutex-hashmap"]
      if ((k, "Lease::take") in m && (k, "mutex-u64") in m)
        printf "ratio %-22s Lease::take/mutex-u64 = %.2f\n", k, m[k, "Lease::take"] / m[k, "mutex-u64"]
    }
  }'
