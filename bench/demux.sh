#!/bin/sh
# make bench: demux-proxy and the direct baseline side by side in ONE run of the harness
# (same client, same nginx, same machine state), then the ratios. Loopback only, bounded.
#   BENCH_SCENARIOS  scenarios (default: all of the table in docs/performance.md)
#   BENCH_RUNS / BENCH_DURATION   runs per scenario and seconds per run (default 3 x 10)
#   BENCH_PEERS      extra presets to run in the same session, e.g. "squid-bump"
#   BENCH_FLOOR=1    also the floor (floor.py): the stack alone, with none of our work
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
S=${BENCH_SCENARIOS:-echo,http-small,https-small,http-close,https-close,http-large,https-large}
RUNS=${BENCH_RUNS:-3}
DUR=${BENCH_DURATION:-10}
OUT=${BENCH_OUT:-$ROOT/.bench/results-$(date +%Y%m%d-%H%M%S).jsonl}
mkdir -p "$(dirname "$OUT")"
export PATH="$ROOT/.venv/bin:$PATH"
command -v nginx >/dev/null && command -v wrk >/dev/null && command -v go >/dev/null || sh "$HERE/setup.sh"
python3 "$HERE/bench.py" --direct --scenario "$S" --runs "$RUNS" --duration "$DUR" --out "$OUT"
for peer in ${BENCH_PEERS:-}; do
  python3 "$HERE/bench.py" --peer "$peer" --scenario "$S" --runs "$RUNS" --duration "$DUR" --out "$OUT"
done
if [ "${BENCH_FLOOR:-0}" = 1 ]; then
  python3 "$HERE/bench.py" --name floor --proxy-port 18095 \
    --proxy-cmd "exec python $HERE/floor.py --port {port} --egress {src_addrs} --upstream-ca {upstream_ca} --ca-cert {mitm_ca_cert} --ca-key {mitm_ca_key}" \
    --scenario "$S" --runs "$RUNS" --duration "$DUR" --out "$OUT"
fi
python3 "$HERE/bench.py" --name demux-proxy --proxy-port 18090 \
  --proxy-cmd 'exec demux-proxy start --listen 127.0.0.1:{port} --egress {src_addrs} --allow-private --upstream-ca {upstream_ca} --ca-cert {mitm_ca_cert} --ca-key {mitm_ca_key_private}' \
  --scenario "$S" --runs "$RUNS" --duration "$DUR" --out "$OUT"
python3 "$HERE/bench.py" --report "$OUT" --by-scenario --ref direct
echo "results: $OUT"
