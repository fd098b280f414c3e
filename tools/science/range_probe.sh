#!/usr/bin/env bash
# Over-rejection when each of several fixed layer ranges is scaled alone (locate with --initial
# at that range and --span 0; the sweep still tries the bounds next to it, the table reads the
# range's own count), on one model: does scaling the planted layers move the count
# more than scaling other ranges of the same width? Used for the planted organism (issue 16).
#
#   tools/science/range_probe.sh MODEL OUT ALPHA LIMIT TOKENS RANGE...
#   tools/science/range_probe.sh demo-planted/aligned probe 1.3 128 10 0-4 5-9 10-14 15-19 20-24 25-29
#
# Writes OUT/<range>/locate.json per range (a finished range is kept on a rerun) and OUT/probe.csv.
set -euo pipefail
BIN=${SAFETY_LAYERS_BIN:-$(dirname "$0")/../../target/release/safety-layers}
model=$1 out=$2 alpha=$3 limit=$4 tokens=$5
shift 5
mkdir -p "$out"
for r in "$@"; do
  d="$out/$r"
  if [[ ! -f "$d/locate.json" ]]; then
    rm -rf "$d"
    "$BIN" locate --model "$model" --initial "$r" --span 0 --alpha "$alpha" --limit "$limit" \
      --max-new-tokens "$tokens" --out "$d" >/dev/null
  fi
done
tmp=$(mktemp "$out/probe.csv.XXXX")
python3 - "$out" "$@" >"$tmp" <<'PY'
import json, sys
out, ranges = sys.argv[1], sys.argv[2:]
print("range,alpha,queries,baseline,refusals_scaled,change")
for r in ranges:
    d = json.load(open(f"{out}/{r}/locate.json"))
    f, l = map(int, r.split("-"))
    count = next(c for (rg, c) in d["upper_sweep"]["tried"] if rg["first"] == f and rg["last"] == l)
    print(f"{r},{d['alpha']},{d['queries']},{d['baseline']},{count},{count - d['baseline']}")
PY
mv "$tmp" "$out/probe.csv"
cat "$out/probe.csv"
