# Shared by the bench/ scripts (sourced, not run): a work directory removed on exit with
# every process started, free ports, processes' CPU time, wrk measurements, and the
# system started through the runner on free ports. Expects $duration (wrk's -d) to be set.

work=$(mktemp -d)
pids=()
cleanup() {
  # SIGINT first (the runner then stops its children); whatever still runs after 5 s is
  # killed, so a benchmark never leaves processes behind.
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 50); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { free_block 1; }
# The first of N consecutive free ports, below the kernel's ephemeral range.
free_block() {
  python3 - "$1" <<'PY'
import random, socket, sys
n = int(sys.argv[1])
while True:
    base = random.randrange(10000, 30000)
    sockets = []
    try:
        for port in range(base, base + n):
            s = socket.socket()
            s.bind(("127.0.0.1", port))
            sockets.append(s)
        print(base)
        break
    except OSError:
        pass
    finally:
        for s in sockets:
            s.close()
PY
}

# CPU seconds the processes PIDS... have used.
cpu_of() {
  python3 - "$@" <<'PY'
import os, sys
total = 0
for pid in sys.argv[1:]:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
print(total)
PY
}

cat > "$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"msg":"hello from wrk"}'
wrk.headers["Content-Type"] = "application/json"
LUA
echo 'wrk.method = "GET"' > "$work/get.lua"

# wrk -> "requests/s p50 p99" (latencies in ms)
measure() {
  local url=$1 connections=$2 script=${3:-post}
  local threads=$(( connections < 2 ? connections : 2 ))
  wrk -t"$threads" -c"$connections" -d"$duration" --latency -s "$work/$script.lua" "$url" > "$work/wrk.txt" 2>&1
  python3 - "$work/wrk.txt" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
def ms(label):
    m = re.search(r"^\s*%s%%\s+([\d.]+)(us|ms|s)\s*$" % label, text, re.M)
    if not m: return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
found = re.search(r"Requests/sec:\s+([\d.]+)", text)
if not found:
    sys.exit("wrk printed no result:\n" + text)
rps = float(found.group(1))
non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
print(f"{rps:.0f} {ms('50'):.2f} {ms('99'):.2f} {non2xx.group(1) if non2xx else 0}")
PY
}

# A system through the runner: $1 store, $2 discovery, $3 logging instances, and $4
# optionally a `runner certs` host folder (then everything speaks TLS and the NATS
# cluster is locked down). Sets $registry $messages $facade $logging (the first logging
# port) and $nats_port.
start_system() {
  local store=$1 discovery=$2 instances=$3 tls=${4:-}
  registry=$(free_port); messages=$(free_port); facade=$(free_port)
  # Consecutive ports for the logging instances, the NATS clients and the NATS routes.
  logging=$(free_block 3); nats_port=$(free_block 3); nats_cluster=$(free_block 3)
  rm -rf "$work/data"
  "${BIN:-target/release}/runner" --store "$store" --discovery "$discovery" --logging "$instances" \
    --registry-port "$registry" --messages-port "$messages" --facade-port "$facade" \
    --logging-port "$logging" --nats-port "$nats_port" --nats-cluster-port "$nats_cluster" \
    --data-dir "$work/data" ${tls:+--tls "$tls"} > "$work/runner.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 300); do
    grep -q "runner: ready" "$work/runner.log" && return 0
    sleep 0.1
  done
  echo "the system did not start; see its output:" >&2; tail -30 "$work/runner.log" >&2; exit 1
}

stop_system() {
  local pid=${pids[-1]}
  kill -INT "$pid"; wait "$pid" 2>/dev/null || true
  unset 'pids[-1]'
}

