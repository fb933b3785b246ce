#!/usr/bin/env bash
# Every fault test, RUNS times in a row, while other processes keep every core busy (issue 12, item 6).
#
#   tests/soak_faults.sh [RUNS] [GROUP ...]      RUNS defaults to 5; groups: prepare train nodes (default: all)
#
# One busy loop per core (`while 1: pass`, normal priority; SOAK_BUSY=N for N loops) runs for the whole soak. The groups run side by side,
# each its runs in a row, so every test also competes with the other groups' Ray clusters and servers: more load
# than the busy loops alone. Each pytest session gets its own --basetemp (concurrent sessions would otherwise
# prune each other's numbered temp dirs). Logs and a junit file per run go to $SOAK_DIR (default /tmp/soak); the
# last lines printed are one row per run and an exit status that is non-zero when any run failed.
set -u
cd "$(dirname "$0")/.."
RUNS=${1:-5}
shift || true
[ $# -gt 0 ] || set -- prepare train nodes
SOAK_DIR=${SOAK_DIR:-/tmp/soak}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$SOAK_DIR"

declare -A TESTS=(
  [prepare]="tests/integration/test_prepare_faults.py tests/integration/test_dataset.py
    tests/integration/test_stack_security.py tests/unit/test_stack_state.py
    tests/integration/test_prepare.py::test_actor_killed_mid_run_every_sample_once
    tests/integration/test_prepare.py::test_s3_store_restarted_mid_run_writes_retry
    tests/integration/test_prepare.py::test_overwrite_refuses_a_folder_holding_other_files_and_a_bucket_root
    tests/integration/test_prepare.py::test_two_runs_on_one_output_the_second_fails_fast_naming_the_holder"
  [train]="tests/integration/test_train_faults.py
    tests/integration/test_train.py::test_train_logs_everything_then_a_rerun_resumes_and_survives_a_killed_worker
    tests/integration/test_train.py::test_deterministic_data_error_is_not_retried"
  [nodes]="tests/integration/test_node_loss.py"
)

busy=()
for _ in $(seq "${SOAK_BUSY:-$(nproc)}"); do
  "$PY" -c 'while 1: pass' &
  busy+=($!)
done
trap '[ ${#busy[@]} -eq 0 ] || kill "${busy[@]}" 2>/dev/null' EXIT

soak_group() {
  local group=$1 run rc start
  for run in $(seq "$RUNS"); do
    start=$(date +%s)
    # shellcheck disable=SC2086  # the test list is word-split on purpose
    "$PY" -m pytest -q -p no:cacheprovider --basetemp="$SOAK_DIR/tmp-$group-$run" \
      --junitxml="$SOAK_DIR/$group-$run.xml" ${TESTS[$group]} >"$SOAK_DIR/$group-$run.log" 2>&1
    rc=$?
    echo "$group run $run/$RUNS: $( [ $rc -eq 0 ] && echo passed || echo "FAILED (rc $rc)" ) in $(( $(date +%s) - start )) s," \
      "load $(cut -d' ' -f1 /proc/loadavg); $(tail -n 1 "$SOAK_DIR/$group-$run.log")" | tee -a "$SOAK_DIR/summary.txt"
    [ $rc -ne 0 ] || rm -rf "$SOAK_DIR/tmp-$group-$run"  # a failed run keeps its files (job logs) to read
  done
}

: >"$SOAK_DIR/summary.txt"
pids=()
for g in "$@"; do
  soak_group "$g" &
  pids+=($!)
done
wait "${pids[@]}"
echo "---"
sort "$SOAK_DIR/summary.txt"
! grep -q FAILED "$SOAK_DIR/summary.txt"
