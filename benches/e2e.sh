#!/usr/bin/env bash
# End-to-end benchmarks of the gateway against `hj212-gateway simulate` (benches/README.md).
#
#   benches/e2e.sh sustained   # RATE=20000 DURATION=300: throughput, zero loss, CPU/frame
#   benches/e2e.sh latency     # RATE=5000 DURATION=60: ack latency percentiles
#   benches/e2e.sh outage      # RATE=5000, broker stopped OUTAGE=600 s: loss, drain time, acks meanwhile
#   benches/e2e.sh idle        # SESSIONS=19000 idle sessions: gateway RSS per session
#   benches/e2e.sh storm       # SESSIONS=19000 dropped and re-established at once
#
# Each run starts its own mosquitto and gateway (sync = full, MQTT QoS 1) on free
# loopback ports with the log in a temp dir under $TMPDIR (default /tmp), runs the
# simulator on the same machine, prints one summary (the simulator's JSON, the
# counts from the log, gateway CPU from /proc/<pid>/stat, RSS, load average) and
# removes everything it started and wrote. A 5-minute run at 20k frames/s writes
# ~6 GB; make sure $TMPDIR has room.
#
# Environment: BIN (default target/release/hj212-gateway; build with
# `cargo build --release`), MOSQUITTO (/usr/sbin/mosquitto), RATE, DURATION,
# DEVICES, FRAME_SIZE (500), SIM_THREADS (1), SIM_NICE (0: the simulator's nice
# value), OUTAGE (s), WARM (s before the broker
# stops), SESSIONS, PROCS (simulator processes for idle/storm), STORE_TOML (extra
# `[store]` lines, e.g. 'batch_delay = "0ms"'), MQTT_TOML (extra `[mqtt]` lines),
# KEEP=1 keeps the temp dir.
# Exit 0 when the run met its zero-loss condition, 1 otherwise.
set -euo pipefail
# `times` prints seconds with the locale's decimal separator.
export LC_ALL=C

SCENARIO=${1:-}
BIN=${BIN:-target/release/hj212-gateway}
STORE_TOML=${STORE_TOML:-}
MQTT_TOML=${MQTT_TOML:-}
MOSQUITTO=${MOSQUITTO:-/usr/sbin/mosquitto}
FRAME_SIZE=${FRAME_SIZE:-500}
SIM_THREADS=${SIM_THREADS:-1}
SIM_NICE=${SIM_NICE:-0}
TCK=$(getconf CLK_TCK)

case "$SCENARIO" in
sustained | latency | outage | idle | storm) ;;
*)
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
[ -x "$BIN" ] || {
    echo "no $BIN: run cargo build --release (or set BIN)" >&2
    exit 2
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hj212-e2e.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    if [ "${KEEP:-0}" = 1 ]; then
        echo "kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

# shellcheck source=benches/lib.sh
. "$(dirname "$0")/lib.sh"

MQ_PORT=$(free_port)
GW_PORT=$(free_port)
METRICS_PORT=$(free_port)
DB=$WORK/data/frames.db

start_broker() {
    "$MOSQUITTO" -p "$MQ_PORT" >>"$WORK/mosquitto.log" 2>&1 &
    MQ_PID=$!
    PIDS+=("$MQ_PID")
    wait_port "$MQ_PORT"
}

stop_broker() {
    kill "$MQ_PID"
    wait "$MQ_PID" 2>/dev/null || true
}

start_gateway() {
    cat >"$WORK/gateway.toml" <<EOF
[server]
listen = ["127.0.0.1:$GW_PORT"]
max_connections = 20000
max_per_ip = 20000
idle_timeout = "1h"
[store]
sync = "full"
$STORE_TOML
[mqtt]
url = "mqtt://127.0.0.1:$MQ_PORT"
client_id = "e2e"
qos = 1
$MQTT_TOML
[metrics]
listen = "127.0.0.1:$METRICS_PORT"
EOF
    "$BIN" serve --config "$WORK/gateway.toml" --data "$WORK/data" >"$WORK/gateway.log" 2>&1 &
    GW_PID=$!
    PIDS+=("$GW_PID")
    wait_port "$GW_PORT"
    sleep 1
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$GW_PID/stat"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$GW_PID/status"; }
mq_ticks() { awk '{print $14 + $15}' "/proc/$MQ_PID/stat"; }
# Busy and total ticks of the whole machine (all CPUs), from /proc/stat.
machine_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 }' /proc/stat; }
fds() { find "/proc/$GW_PID/fd" -mindepth 1 -maxdepth 1 | wc -l; }

# Counts from the log: inbound accepted frames (stored), acks we sent, the last seq,
# the MQTT cursor and how many publishable frames lie at or below it.
counts() {
    python3 - "$DB" <<'PY'
import json, sqlite3, sys
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, isolation_level=None)
db.execute("BEGIN")  # one snapshot for every count
one = lambda q: db.execute(q).fetchone()[0]
cur = dict(db.execute("SELECT name, seq FROM cursors").fetchall())
mqtt = cur.get("mqtt", 0)
print(json.dumps({
    "stored": one("SELECT count(*) FROM records WHERE direction='in' AND kind='frame' AND verdict='accepted'"),
    "stored_duplicates": one("SELECT count(*) FROM records WHERE direction='in' AND duplicate=1"),
    "rejected_or_junk": one("SELECT count(*) FROM records WHERE direction='in' AND verdict<>'accepted'"),
    "acks_sent": one("SELECT count(*) FROM records WHERE direction='out'"),
    "head": one("SELECT COALESCE(max(seq),0) FROM records"),
    "mqtt_cursor": mqtt,
    "published": db.execute("SELECT count(*) FROM records WHERE direction='in' AND kind='frame' AND verdict='accepted' AND seq <= ?", (mqtt,)).fetchone()[0],
}))
PY
}

# Group commit as the gateway saw it: transactions, mean records per transaction,
# mean transaction time (from its /metrics).
commit_stats() {
    python3 - "$METRICS_PORT" <<'PY'
import json, sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
v = {}
for line in text.splitlines():
    if line.startswith(("hj212_store_commit_batch_records_", "hj212_store_commit_duration_seconds_", "hj212_ack_latency_seconds_", "hj212_consumer_records_total")):
        name, _, val = line.rpartition(" ")
        v[name] = float(val)
n = v.get("hj212_store_commit_batch_records_count", 0) or 1
# Share of observations slower than each bucket bound (5 ms to 100 ms).
def slower(name):
    total = v.get(name + "_count", 0) or 1
    buckets = sorted(
        (float(k.split('le="')[1].rstrip('"}')), c)
        for k, c in v.items()
        if k.startswith(name + "_bucket") and "+Inf" not in k
    )
    return {f"over_{int(le * 1000)}ms": round(1 - c / total, 4) for le, c in buckets if 0.005 <= le <= 0.1}
print(json.dumps({
    "commits": int(v.get("hj212_store_commit_batch_records_count", 0)),
    "records_per_commit": round(v.get("hj212_store_commit_batch_records_sum", 0) / n, 1),
    "commit_ms_mean": round(v.get("hj212_store_commit_duration_seconds_sum", 0) * 1000 / n, 2),
    "commits_slower": slower("hj212_store_commit_duration_seconds"),
    # The gateway's own view of ack latency: frame read until its ack is written.
    "acks_slower": slower("hj212_ack_latency_seconds"),
    # Records the consumers took from the writer's in-memory feed, and those they
    # had to read back from SQLite because they fell behind it.
    "consumer_reads": {
        "feed": int(v.get('hj212_consumer_records_total{source="feed"}', 0)),
        "sqlite": int(v.get('hj212_consumer_records_total{source="sqlite"}', 0)),
    },
}))
PY
}

# MQTT cursor and head only: cheap enough to poll (the counts above scan the log).
progress() {
    python3 - "$DB" <<'PY'
import json, sqlite3, sys
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
cur = db.execute("SELECT seq FROM cursors WHERE name = 'mqtt'").fetchone()
head = db.execute("SELECT COALESCE(max(seq), 0) FROM records").fetchone()[0]
print(json.dumps({"mqtt_cursor": cur[0] if cur else 0, "head": head}))
PY
}

field() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(d.get(sys.argv[2]))' "$1" "$2"; }

# Seconds until the MQTT cursor reaches the head (checked every 0.5 s), or "timeout".
wait_published() {
    local limit=$1 t0 c
    t0=$(date +%s.%N)
    while :; do
        c=$(progress)
        if [ "$(field "$c" mqtt_cursor)" -ge "$(field "$c" head)" ]; then
            python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$t0" "$(date +%s.%N)"
            return
        fi
        if python3 -c "import sys; sys.exit(0 if float(sys.argv[2]) - float(sys.argv[1]) < float(sys.argv[3]) else 1)" "$t0" "$(date +%s.%N)" "$limit"; then
            sleep 0.5
        else
            echo timeout
            return
        fi
    done
}

simulate() {
    nice -n "$SIM_NICE" "$BIN" simulate --target "127.0.0.1:$GW_PORT" --frame-size "$FRAME_SIZE" --dialects 2017 \
        --cn 2011 --threads "$SIM_THREADS" --progress 0 --json "$@"
}

report() {
    # report NAME SIM_JSON CPU_TICKS_RUN CPU_TICKS_TOTAL EXTRA_JSON
    python3 - "$@" "$TCK" "$(uptime)" <<'PY'
import json, sys
name, sim, run_t, all_t, extra, tck, up = sys.argv[1:8]
sim = json.loads(sim) if sim else {}
extra = json.loads(extra)
stored = extra.get("stored", 0) or 1
run_s, all_s = int(run_t) / int(tck), int(all_t) / int(tck)
extra["gateway_cpu_s"] = round(run_s, 2)
extra["gateway_cpu_s_incl_drain"] = round(all_s, 2)
extra["gateway_cpu_us_per_frame"] = round(run_s * 1e6 / stored, 1)
extra["gateway_cpu_us_per_frame_incl_drain"] = round(all_s * 1e6 / stored, 1)
extra["load"] = up.split("load average:")[-1].strip()
print(json.dumps({"scenario": name, "simulate": sim, "gateway": extra}, indent=1))
PY
}

zero_loss() {
    # zero_loss SIM_JSON COUNTS_JSON: acked == stored == published, no errors
    python3 - "$1" "$2" <<'PY'
import json, sys
s, c = json.loads(sys.argv[1]), json.loads(sys.argv[2])
ok = s["acked"] == c["stored"] == c["published"] and s["errors"] == 0 and c["rejected_or_junk"] == 0
print("ZERO LOSS: acked %d == stored %d == published %d, errors %d: %s" % (
    s["acked"], c["stored"], c["published"], s["errors"], "yes" if ok else "NO"))
sys.exit(0 if ok else 1)
PY
}

start_broker
start_gateway
echo "gateway pid $GW_PID on 127.0.0.1:$GW_PORT, mosquitto on $MQ_PORT, data $WORK/data; $(uptime)" >&2

case "$SCENARIO" in
sustained | latency)
    if [ "$SCENARIO" = sustained ]; then
        RATE=${RATE:-20000} DURATION=${DURATION:-300} DEVICES=${DEVICES:-2000}
    else
        RATE=${RATE:-5000} DURATION=${DURATION:-60} DEVICES=${DEVICES:-1000}
    fi
    c0=$(cpu_ticks)
    m0=$(mq_ticks)
    child_ticks >"$WORK/s0"
    read -r b0 t0 < <(machine_ticks)
    sim=$(simulate --devices "$DEVICES" --rate "$RATE" --duration "$DURATION" --ramp 5) || true
    c1=$(cpu_ticks)
    m1=$(mq_ticks)
    child_ticks >"$WORK/s1"
    read -r b1 t1 < <(machine_ticks)
    drain=$(wait_published 300)
    c2=$(cpu_ticks)
    c=$(counts)
    # Where the machine's CPU went during the run: what is left for the gateway
    # when the simulator and the broker share its cores.
    others=$(python3 -c 'import json,sys; s,m,b,t=map(int,sys.argv[1:5]); tck=int(sys.argv[5]); n=max(json.loads(sys.argv[6]).get("stored",0),1); print(json.dumps(dict(simulator_cpu_us_per_frame=round(s/tck*1e6/n,1), mosquitto_cpu_us_per_frame=round(m/tck*1e6/n,1), machine_busy=round(b/max(t,1),3))))' \
        $(($(cat "$WORK/s1") - $(cat "$WORK/s0"))) $((m1 - m0)) $((b1 - b0)) $((t1 - t0)) "$TCK" "$c")
    extra=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d.update(rss_kib=int(sys.argv[2]), publish_drain_s=sys.argv[3], store=json.loads(sys.argv[4]), log_bytes=int(sys.argv[5])); d.update(json.loads(sys.argv[6])); print(json.dumps(d))' "$c" "$(rss_kib)" "$drain" "$(commit_stats)" "$(du -sb "$WORK/data" | cut -f1)" "$others")
    report "$SCENARIO rate=$RATE duration=$DURATION devices=$DEVICES" "$sim" $((c1 - c0)) $((c2 - c0)) "$extra"
    zero_loss "$sim" "$c"
    ;;
outage)
    RATE=${RATE:-5000} OUTAGE=${OUTAGE:-600} WARM=${WARM:-30} DEVICES=${DEVICES:-1000}
    AFTER=${AFTER:-150}
    DURATION=$((WARM + OUTAGE + AFTER))
    c0=$(cpu_ticks)
    simulate --devices "$DEVICES" --rate "$RATE" --duration "$DURATION" --ramp 5 >"$WORK/sim.json" &
    SIM=$!
    PIDS+=("$SIM")
    sleep "$WARM"
    stop_broker
    echo "broker stopped at +${WARM}s for ${OUTAGE}s" >&2
    sleep "$OUTAGE"
    backlog=$(progress)
    start_broker
    t0=$(date +%s.%N)
    echo "broker back; backlog: $backlog" >&2
    # How much of the drain is the publisher's reconnect backoff ([mqtt] reconnect_max).
    reconnected=$(python3 - "$METRICS_PORT" "$t0" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/metrics"
t0 = float(sys.argv[2])
while time.time() - t0 < 300:
    try:
        text = urllib.request.urlopen(url, timeout=1).read().decode()
        if any(l.split()[-1] == "1" for l in text.splitlines() if l.startswith("hj212_mqtt_connected")):
            print(round(time.time() - t0, 2))
            break
    except OSError:
        pass
    time.sleep(0.05)
else:
    print("timeout")
PY
)
    echo "publisher reconnected after ${reconnected}s" >&2
    # Live traffic keeps coming: drained = the cursor reached the head of one poll earlier.
    prev=$(field "$(progress)" head)
    drain=timeout
    while python3 -c "import sys; sys.exit(0 if float(sys.argv[2]) - float(sys.argv[1]) < 300 else 1)" "$t0" "$(date +%s.%N)"; do
        sleep 0.5
        c=$(progress)
        if [ "$(field "$c" mqtt_cursor)" -ge "$prev" ]; then
            drain=$(python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$t0" "$(date +%s.%N)")
            break
        fi
        prev=$(field "$c" head)
    done
    echo "backlog drained after ${drain}s" >&2
    wait "$SIM" || true
    sim=$(cat "$WORK/sim.json")
    c1=$(cpu_ticks)
    tail_drain=$(wait_published 300)
    c2=$(cpu_ticks)
    c=$(counts)
    extra=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d.update(backlog_at_return=json.loads(sys.argv[2]), backlog_drained_s=sys.argv[3], rss_kib=int(sys.argv[4]), store=json.loads(sys.argv[5]), reconnected_s=sys.argv[6]); print(json.dumps(d))' "$c" "$backlog" "$drain" "$(rss_kib)" "$(commit_stats)" "$reconnected")
    report "outage rate=$RATE outage=${OUTAGE}s devices=$DEVICES" "$sim" $((c1 - c0)) $((c2 - c0)) "$extra"
    zero_loss "$sim" "$c"
    ;;
idle | storm)
    SESSIONS=${SESSIONS:-19000} PROCS=${PROCS:-4}
    per=$(((SESSIONS + PROCS - 1) / PROCS))
    sleep 2
    rss0=$(rss_kib)
    fd0=$(fds)
    if [ "$SCENARIO" = idle ]; then
        HOLD=${HOLD:-60}
        args=(--idle --heartbeat 3600 --ramp 20 --duration "$HOLD")
    else
        # Every device sends every 20 s; all drop and reconnect at +30 s. "Sending
        # again" then takes up to one interval by construction.
        HOLD=${HOLD:-75}
        args=(--interval 20 --ramp 20 --duration "$HOLD" --reconnect-storm-at 30)
    fi
    for i in $(seq 0 $((PROCS - 1))); do
        n=$((SESSIONS - i * per < per ? SESSIONS - i * per : per))
        simulate --devices "$n" --first-device $((i * per)) --source-ips "127.0.$((i + 1)).1-127.0.$((i + 1)).8" \
            "${args[@]}" >"$WORK/sim$i.json" 2>"$WORK/sim$i.err" &
        PIDS+=("$!")
        SIMS[i]=$!
    done
    # Wait until every session is accepted, let the heartbeats and ramp settle, then measure.
    for _ in $(seq 120); do
        [ $(($(fds) - fd0)) -ge "$SESSIONS" ] && break
        sleep 1
    done
    sleep 15
    rss1=$(rss_kib)
    fd1=$(fds)
    echo "sessions open: $((fd1 - fd0)); RSS ${rss0} -> ${rss1} KiB" >&2
    for i in $(seq 0 $((PROCS - 1))); do
        wait "${SIMS[i]}" || true
    done
    sims=$(python3 -c 'import json,sys; print(json.dumps([json.load(open(f)) for f in sys.argv[1:]]))' "$WORK"/sim*.json)
    c=$(counts)
    python3 - "$SCENARIO" "$sims" "$c" "$rss0" "$rss1" "$fd0" "$fd1" "$(uptime)" <<'PY'
import json, sys
name, sims, c, rss0, rss1, fd0, fd1, up = sys.argv[1:]
sims, c = json.loads(sims), json.loads(c)
rss0, rss1, n = int(rss0), int(rss1), int(fd1) - int(fd0)
tot = lambda k: sum(s.get(k) or 0 for s in sims)
worst = lambda k: max((s.get(k) or 0) for s in sims)
out = {"scenario": name, "sessions_open": n, "rss_kib_before": rss0, "rss_kib_after": rss1,
       "rss_bytes_per_session": round((rss1 - rss0) * 1024 / max(n, 1)),
       "sent": tot("sent"), "acked": tot("acked"), "errors": tot("errors"),
       "reconnects": tot("reconnects"), "storm_reconnect_s": worst("storm_reconnect_s"),
       "storm_resend_s": worst("storm_resend_s"), "stored": c["stored"],
       "load": up.split("load average:")[-1].strip()}
print(json.dumps(out, indent=1))
PY
    ;;
esac
