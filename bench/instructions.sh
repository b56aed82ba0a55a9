#!/bin/sh
# Instructions per request, counted by callgrind: a deterministic A/B for small changes.
#
#   sh bench/instructions.sh [REF ...]      (default: HEAD; e.g. "main~3 main")
#
# Wall-clock and CPU figures on a shared machine move by +-15 % between runs, which hides
# any change smaller than that. Counting the instructions the proxy executes (user space
# only: the kernel's share is not counted) for a fixed sequence of requests repeats within
# 0.1 %. For each git REF: a worktree, a proxy under valgrind (--workers 1, 4 egress
# addresses), 100 warm-up requests, counters zeroed, then N sequential keep-alive requests
# by curl (one client connection, HTTP then HTTPS through CONNECT) to the harness's nginx.
# Needs valgrind and a prior `make bench` (its nginx configuration and certificates).
# Loopback only; N requests per scheme (BENCH_IR_REQUESTS, default 1000).
# A ref that compiles its request path (setup.py, fifth session on) is built as
# `make install` builds it (about a minute), so the figures are those of what runs;
# BENCH_IR_COMPILE=0 counts every ref's source uncompiled.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
WORK=${BENCH_WORK:-$HERE/.work}
N=${BENCH_IR_REQUESTS:-1000}
PY=$ROOT/.venv/bin/python
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 2; }
[ -f "$WORK/nginx/nginx.conf" ] || { echo "run make bench once first (nginx config in $WORK)" >&2; exit 2; }
TMP=$(mktemp -d)
NGINX_PID=
cleanup() {
  [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null
  for wt in "$TMP"/wt-*; do [ -d "$wt" ] && git -C "$ROOT" worktree remove --force "$wt"; done
  rm -rf "$TMP"
}
trap cleanup EXIT INT TERM
if ! curl -s -o /dev/null http://127.0.0.1:18080/small; then
  nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" >/dev/null 2>&1 &
  NGINX_PID=$!
  sleep 1
fi
urls() {  # N curl config lines for one keep-alive connection
  i=0
  while [ "$i" -lt "$2" ]; do printf 'url = "%s"\noutput = "/dev/null"\n' "$1"; i=$((i + 1)); done
}
measure() {  # measure SRC SCHEME URL PORT
  out=$TMP/cg.$4
  # --trace-children: `start` execs a fresh interpreter (launch.py) under the same PID,
  # which callgrind would otherwise let run uncounted.
  PYTHONPATH=$1 valgrind --tool=callgrind --trace-children=yes --callgrind-out-file="$out" \
    "$PY" -m demux_proxy start \
    --workers 1 --listen "127.0.0.1:$4" --egress 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5 \
    --allow-private --upstream-ca "$WORK/certs/upstream-ca.pem" \
    --ca-cert "$WORK/certs/mitm-ca.pem" --ca-key "$WORK/certs/mitm-ca-private.key" >/dev/null 2>&1 &
  pid=$!
  tries=0
  until curl -s -o /dev/null -x "http://127.0.0.1:$4" http://127.0.0.1:18080/small; do
    tries=$((tries + 1)); [ "$tries" -gt 240 ] && { echo "proxy did not start" >&2; exit 1; }
    sleep 0.5
  done
  urls "$3" 100 > "$TMP/warm"
  urls "$3" "$N" > "$TMP/urls"
  curl -s -k -x "http://127.0.0.1:$4" -K "$TMP/warm" >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  ok=$(curl -s -k -x "http://127.0.0.1:$4" -K "$TMP/urls" -w '%{http_code}\n' | grep -c '^200$')
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill -INT "$pid"; wait "$pid" || true
  total=$(grep -h -E '^(summary|totals):' "$out".* | head -1 | awk '{print $2}')
  rm -f "$out" "$out".*
  [ "$ok" -eq "$N" ] || { echo "$2: only $ok of $N requests answered 200" >&2; exit 1; }
  echo $((total / N))
}
printf '| ref | commit | http instructions/request | https instructions/request |\n|---|---|---|---|\n'
port=18600
[ $# -eq 0 ] && set -- HEAD
for ref in "$@"; do
  commit=$(git -C "$ROOT" rev-parse --short "$ref")
  wt=$TMP/wt-$commit
  git -C "$ROOT" worktree add -q --detach "$wt" "$commit"
  src=$wt/src
  if [ -f "$wt/setup.py" ] && [ "${BENCH_IR_COMPILE:-1}" != 0 ]; then
    (cd "$wt" && "$ROOT/.venv/bin/pip" wheel -q --no-build-isolation --no-deps -w "$wt/dist" .) >&2
    src=$wt/built
    "$PY" -m zipfile -e "$wt"/dist/demux_proxy-*.whl "$src"
  fi
  http=$(measure "$src" http http://127.0.0.1:18080/small $port)
  https=$(measure "$src" https https://127.0.0.1:18443/small $((port + 1)))
  port=$((port + 2))
  printf '| %s | %s | %s | %s |\n' "$ref" "$commit" "$http" "$https"
done
