#!/usr/bin/env bash
# The floor under the gateway's CPU per frame (benches/README.md, issue 23).
#
#   benches/floor.sh    # RATE=5000 DURATION=40 DEVICES=2000
#
# Runs `examples/floor.rs` (frames cut, each frame and its ack appended to a
# SQLite WAL file with synchronous = FULL in group commits, the ack written after
# the commit, every frame published to mosquitto with QoS 1; nothing else) under
# the same load as `benches/e2e.sh latency|sustained`: `hj212-gateway simulate`
# with 2017 CN=2011 frames of FRAME_SIZE bytes. Prints the simulator's JSON and the
# floor's CPU per frame next to the simulator's and mosquitto's, after checking
# that every frame was acked, stored with its ack and acknowledged by the broker.
#
# Environment: BIN (the gateway, for `simulate`; default
# target/release/hj212-gateway), FLOOR (default target/release/examples/floor;
# build with `cargo build --release --example floor`), MOSQUITTO, RATE, DURATION,
# DEVICES, FRAME_SIZE (500), SIM_THREADS (1).
# Exit 0 when every frame was acked, stored and published, 1 otherwise.
set -euo pipefail
# `times` prints seconds with the locale's decimal separator.
export LC_ALL=C

BIN=${BIN:-target/release/hj212-gateway}
FLOOR=${FLOOR:-target/release/examples/floor}
MOSQUITTO=${MOSQUITTO:-/usr/sbin/mosquitto}
RATE=${RATE:-5000}
DURATION=${DURATION:-40}
DEVICES=${DEVICES:-2000}
FRAME_SIZE=${FRAME_SIZE:-500}
SIM_THREADS=${SIM_THREADS:-1}
TCK=$(getconf CLK_TCK)
for b in "$BIN" "$FLOOR"; do
    [ -x "$b" ] || {
        echo "no $b: cargo build --release && cargo build --release --example floor" >&2
        exit 2
    }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hj212-floor.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

# shellcheck source=benches/lib.sh
. "$(dirname "$0")/lib.sh"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

MQ_PORT=$(free_port)
PORT=$(free_port)
"$MOSQUITTO" -p "$MQ_PORT" >>"$WORK/mosquitto.log" 2>&1 &
MQ_PID=$!
PIDS+=("$MQ_PID")
wait_port "$MQ_PORT"
"$FLOOR" "127.0.0.1:$PORT" "$WORK/floor.db" "127.0.0.1:$MQ_PORT" "$WORK/stats.json" >"$WORK/floor.log" 2>&1 &
FLOOR_PID=$!
PIDS+=("$FLOOR_PID")
wait_port "$PORT"
sleep 1
echo "floor pid $FLOOR_PID on 127.0.0.1:$PORT, mosquitto on $MQ_PORT; $(uptime)" >&2

f0=$(ticks "$FLOOR_PID")
m0=$(ticks "$MQ_PID")
child_ticks >"$WORK/s0"
sim=$("$BIN" simulate --target "127.0.0.1:$PORT" --frame-size "$FRAME_SIZE" --dialects 2017 \
    --cn 2011 --threads "$SIM_THREADS" --progress 0 --json \
    --devices "$DEVICES" --rate "$RATE" --duration "$DURATION" --ramp 5) || true
f1=$(ticks "$FLOOR_PID")
m1=$(ticks "$MQ_PID")
child_ticks >"$WORK/s1"
# MQTT catching up after the run.
start=$(date +%s.%N)
for _ in $(seq 600); do
    if python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); sys.exit(0 if s["pubacks"] >= s["frames"] else 1)' "$WORK/stats.json" 2>/dev/null; then
        break
    fi
    sleep 0.1
done
drain=$(python3 -c "import time; print(round(time.time() - $start, 1))")
f2=$(ticks "$FLOOR_PID")
m2=$(ticks "$MQ_PID")
kill "$FLOOR_PID"
wait "$FLOOR_PID" 2>/dev/null || true

python3 - "$sim" "$WORK/stats.json" "$WORK/floor.db" "$TCK" $((f1 - f0)) $((f2 - f0)) $(($(cat "$WORK/s1") - $(cat "$WORK/s0"))) $((m1 - m0)) $((m2 - m0)) "$drain" "$RATE" "$DURATION" "$DEVICES" <<'PY'
import json, sqlite3, sys
sim, stats, db, tck, run_t, all_t, sim_t, mq_t, mq_all_t, drain, rate, dur, dev = sys.argv[1:14]
sim = json.loads(sim) if sim else {}
st = json.load(open(stats))
rows = sqlite3.connect(db).execute("SELECT count(*) FROM records").fetchone()[0]
tck = int(tck)
n = max(st["frames"], 1)
per = lambda t: round(int(t) / tck * 1e6 / n, 1)
out = {
    "scenario": f"floor rate={rate} duration={dur} devices={dev}",
    "simulate": sim,
    "floor": dict(st, rows=rows, publish_drain_s=float(drain),
                  floor_cpu_us_per_frame=per(run_t),
                  floor_cpu_us_per_frame_incl_drain=per(all_t),
                  simulator_cpu_us_per_frame=per(sim_t),
                  mosquitto_cpu_us_per_frame=per(mq_t),
                  mosquitto_cpu_us_per_frame_incl_drain=per(mq_all_t)),
}
print(json.dumps(out, indent=1))
ok = sim.get("acked") == st["frames"] == st["pubacks"] and rows == 2 * st["frames"] and sim.get("errors") == 0
print("ZERO LOSS: acked %s == frames %d == pubacks %d, rows %d: %s" % (
    sim.get("acked"), st["frames"], st["pubacks"], rows, "yes" if ok else "NO"))
sys.exit(0 if ok else 1)
PY
