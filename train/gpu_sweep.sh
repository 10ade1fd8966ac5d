#!/usr/bin/env bash
# The model sweep of issue #13 on one lent GPU machine (Keras 3 on JAX; no TensorFlow there).
#
# Runs every line of RUNS at once on the one GPU under the same time budget (MINUTES) and writes
# each run's model, card, history and log to $OUT/<name>.tar the moment it ends, so a command cut
# short by the machine's limit still returns the runs that finished; progress.txt says where each
# one was. Selection happens back here on the validation split; the test split never travels.
#
# Needs in the repository root: .gpu/trainval.zip (`malaria-edge data pack data/prepared --out
# .gpu/trainval.zip`, 53 MiB) and .whl/ with the keras, namex and optree wheels for Python 3.12.
# RUNS_FILE=PATH replaces RUNS by that file's lines (train/sweeps/); FOLDS=N makes patient folds (below); ONLY='name name' runs just those lines; EXTRA is added to every run's arguments
# (EXTRA='--max-train 256 --max-val 128 --epochs 1 --finetune-epochs 1' is a smoke test).
# Budget: a run's first epoch under JAX compiles and autotunes for about two minutes when six
# share the machine; later epochs take 9-14 s (batch 64, six runs) or 4 s (alone).
set -u
OUT=${OUT:-runs/gpu}
MINUTES=${MINUTES:-6.5}
mkdir -p "$OUT" /tmp/runs
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
{ date -u; nvidia-smi -L; nproc; python3 -c "import keras, jax; print('keras', keras.__version__, 'jax', jax.__version__, jax.devices())"; } >"$OUT/machine.txt" 2>&1
python3 -m malaria_edge data unpack .gpu/trainval.zip --out /tmp/prepared >>"$OUT/machine.txt" 2>&1 || exit 1
# FOLDS=N: /tmp/fold0 .. /tmp/fold<N-1>, each with one patient fold of the train and val patients as val
# (`data fold`), for sweep lines that name them with --data; each fold's split.json comes back to check
for ((k = 0; k < ${FOLDS:-0}; k++)); do
  python3 -m malaria_edge data fold /tmp/prepared --fold $k --folds $FOLDS --out /tmp/fold$k >>"$OUT/machine.txt" 2>&1 || exit 1
  cp /tmp/fold$k/split.json "$OUT/fold$k.split.json"
done

COMMON="--data /tmp/prepared --epochs 60 --finetune-epochs 10 --patience 10 --batch 64 --workers 2 --max-minutes $MINUTES ${EXTRA:-}"
MNV2="--recipe mobilenetv2-finetune --weights none"
RUNS=(
  "mnv2_a075 $MNV2 --alpha 0.75"
  "mnv2_a075_stain $MNV2 --alpha 0.75 --augment stain"
  "mnv2_a075_stain_s1 $MNV2 --alpha 0.75 --augment stain --seed 1"
  "mnv2_a075_stain_clean $MNV2 --alpha 0.75 --augment stain --exclude benchmarks/results/candidates/label_issues/issues.csv"
  "mnv2_a100_stain $MNV2 --alpha 1.0 --augment stain"
  "mnv2_a050_stain $MNV2 --alpha 0.5 --augment stain"
)
[ -n "${RUNS_FILE:-}" ] && mapfile -t RUNS < <(grep -v -e '^#' -e '^$' "$RUNS_FILE" | sed "s|\$MNV2|$MNV2|")
PIDS=()
for line in "${RUNS[@]}"; do
  set -- $line
  name=$1; shift
  [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]] && continue
  (
    python3 -m malaria_edge train $COMMON --out "/tmp/runs/$name" "$@" >"/tmp/runs/$name.log" 2>&1
    echo "exit $?" >>"/tmp/runs/$name.log"
    mkdir -p "/tmp/runs/$name" && cp "/tmp/runs/$name.log" "/tmp/runs/$name/train.log"
    tar -C /tmp/runs -cf "/tmp/$name.tar" "$name" && mv "/tmp/$name.tar" "$OUT/$name.tar"
  ) &
  PIDS+=($!)
done
# what each run is doing, in case the machine's limit cuts the command short
( while sleep 20; do tail -n 2 /tmp/runs/*.log >"$OUT/progress.txt" 2>&1; done ) &
LOOP=$!
wait "${PIDS[@]}"
kill $LOOP
tail -n 3 /tmp/runs/*.log >"$OUT/progress.txt" 2>&1
date -u >>"$OUT/machine.txt"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >>"$OUT/machine.txt" 2>&1
