#!/usr/bin/env bash
# The positive control's own SPPFT test (issue 16 item 1): fine-tune a demo's planted organism
# with the PLANTED layers frozen, and with an equally wide control freeze, exactly as the demo
# fine-tuned its SPPFT arm and evaluated every model (its recorded commands, with only --freeze,
# --out and the model changed); then exact McNemar tests on AdvBench (tools/science/plant_mcnemar.py)
# against the demo's full fine-tuning arm and between the two freezes.
#
#   tools/science/plant_arms.sh DEMO_OUT PLANT CONTROL        e.g. demo-planted 10-14 0-4
#
# For a run made before `demo --plant` fine-tuned these arms itself. Runs the seed the demo's
# SPPFT arm used. Writes DEMO_OUT/extra/{ft-di-plant,ft-di-plant-control}
# and their eval parts; a finished step is kept on a rerun (its finetune.json / eval.json).
set -euo pipefail
BIN=${SAFETY_LAYERS_BIN:-$(dirname "$0")/../../target/release/safety-layers}
demo=$(cd "$1" && pwd) plant=$2 control=$3
extra="$demo/extra"
mkdir -p "$extra"
recorded() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["command"])' "$1"; }
ft_cmd=$(recorded "$demo/ft-di-sppft/.stage.json")
arms=("ft-di-plant:$plant" "ft-di-plant-control:$control")
for arm in "${arms[@]}"; do
  name=${arm%%:*} freeze=${arm#*:}
  if [[ ! -f "$extra/$name/finetune.json" ]]; then
    rm -rf "$extra/$name"
    cmd=${ft_cmd/#safety-layers /}
    cmd=${cmd/--out $demo\/ft-di-sppft/--out $extra\/$name}
    cmd=$(sed -E "s/--freeze [0-9]+-[0-9]+/--freeze $freeze/" <<<"$cmd")
    [[ $cmd == *"--out $extra/$name "* && $cmd == *"--freeze $freeze"* ]] ||
      { echo "plant_arms: cannot adapt the recorded command: $ft_cmd" >&2; exit 1; }
    echo "plant_arms: finetune $name (--freeze $freeze)" >&2
    eval "\"$BIN\" $cmd"
  fi
done
# The eval command is the demo's for the base model (every eval part of a run has the same
# settings; only --model and --out differ).
marker="$demo/eval-parts/base/.stage.json"
if [[ ! -f "$marker" ]]; then
  echo "plant_arms: $marker is missing: run this after the demo has evaluated the base model" >&2
  exit 1
fi
ev_cmd=$(recorded "$marker")
for arm in "${arms[@]}"; do
  name=${arm%%:*}
  if [[ ! -f "$extra/eval-$name/eval.json" ]]; then
    rm -rf "$extra/eval-$name"
    cmd=${ev_cmd/#safety-layers /}
    cmd=$(sed -E "s#--model [^ ]+#--model $name=$extra/$name#; s#--out [^ ]+#--out $extra/eval-$name#" <<<"$cmd")
    [[ $cmd == *"--out $extra/eval-$name"* && $cmd == *"--model $name=$extra/$name"* ]] ||
      { echo "plant_arms: cannot adapt the recorded command: $ev_cmd" >&2; exit 1; }
    echo "plant_arms: eval $name" >&2
    eval "\"$BIN\" $cmd"
  fi
done
python3 "$(dirname "$0")/plant_mcnemar.py" "$demo" "$plant" "$control" | tee "$extra/plant_arms.md"
