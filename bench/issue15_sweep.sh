#!/usr/bin/env bash
# One run of each of issue 15's benchmarks, in sequence (run it on a quiet machine; about
# 8 minutes, plus the peer's virtual environment on the first run). Each one's output goes
# to a file of its own in OUT (default: a new temporary directory, printed at the end).
#
#     bash bench/issue15_sweep.sh [OUT]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
out=${1:-$(mktemp -d -t isthmus-sweep-XXXXXX)}
mkdir -p "$out"
stamp() { echo "== $1 $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"; }
run() {  # name, then the command
    local name=$1
    shift
    { stamp "$name"; "$@"; } > "$out/$name.txt" 2>&1
}
run 01_translate $PY bench/translate.py --seconds 2
run 02_translate_floor $PY bench/translate_floor.py --seconds 3
run 03_cli bash -c 'for i in 1 2 3; do /usr/bin/time -f "%e s wall" .venv/bin/isthmus translate tests/messages/adt_a01.hl7 > /dev/null; done'
run 04_mllp_ingest $PY bench/mllp_ingest.py --messages 6000 --connections 1,8
run 05_apply_lag $PY bench/apply_lag.py --messages 6000 --settle 10 --profile
run 06_apply_lag_mixed $PY bench/apply_lag.py --messages 4000 --settle 10 --mix oru
run 07_apply_floor $PY bench/apply_floor.py --messages 6000 --batch 64
run 08_isolation $PY bench/isolation.py --seconds 3 --rate 200
run 09_memory_flood $PY bench/memory_flood.py
run 10_fhir_rest $PY bench/fhir_rest.py --audit durable --seconds 3 --connections 8
run 11_fhir_floor $PY bench/fhir_floor.py --seconds 3 --connections 8
run 12_translate_instructions env PYTHONHASHSEED=0 $PY bench/translate_instructions.py
echo "$out"
