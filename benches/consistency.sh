#!/usr/bin/env bash
# False alarms of aggregate.mismatch / emission.mismatch on `simulate`'s clean
# traffic (benches/README.md, "issue 24").
#
#   benches/consistency.sh DEVICES DURATION SPEEDUP INTERVAL MINUTE_EVERY
#   benches/consistency.sh 1000 120 60 30 1     # 1,000 devices, ~2 h simulated
#   benches/consistency.sh 100 60 3000 300 5    # 100 devices, 50 h (days, 2031)
#
# Starts a release gateway on a free loopback port with the log in a temp dir,
# the simulated fleet as its registry, runs `simulate --speedup` against it,
# waits until the detector has read the whole log, and prints the simulator's
# summary, the records per CN and the alarms per kind. Then, as a negative
# control, judges the same log again with `replay` twice: with the same
# [alarms], and with aggregate_stamp = "end" for every device (every record is
# then held against the interval before its own, which must raise).
#
# Environment: BIN (default target/release/hj212-gateway), KEEP=1 keeps the
# temp dir. Needs sqlite3 and python3.
set -euo pipefail

DEVICES=${1:?devices}
DURATION=${2:?duration (s)}
SPEEDUP=${3:?speedup}
INTERVAL=${4:?2011 interval (simulated s)}
MINUTE_EVERY=${5:?minutes between 2051}
BIN=$(realpath "${BIN:-target/release/hj212-gateway}")
DIR=$(mktemp -d "${TMPDIR:-/tmp}/consistency.XXXXXX")
cleanup() {
    [ -n "${GW:-}" ] && kill "$GW" 2>/dev/null || true
    [ "${KEEP:-0}" = 1 ] || rm -rf "$DIR"
}
trap cleanup EXIT
cd "$DIR"

FLEET=(--devices "$DEVICES" --dialects 2017=6,2005=2,2025=1,2025e=1 --kinds air=1,water=1 --seed 24)
"$BIN" simulate --target 127.0.0.1:1 --list-devices "${FLEET[@]}" > devices.toml
cat > gw.toml <<EOT
[server]
listen = ["127.0.0.1:0"]
max_per_ip = 100000
[registry]
devices_file = "devices.toml"
[metrics]
enabled = false
[mqtt]
enabled = false
[store]
sync = "off"
# A 1012 would set the simulated clocks to now; history answers are drawn,
# not derived from samples.
[downlink]
time_sync_skew = false
backfill = false
# Compressed history is hours behind the receive time.
[alarms]
skew_threshold = "4d"
[validation]
stale_after = "4d"
EOT
"$BIN" serve --config gw.toml --data data 2> gw.log &
GW=$!
for _ in $(seq 100); do grep -q "listen=\[" gw.log && break; sleep 0.1; done
ADDR=$(grep -o "listen=\[[^]]*\]" gw.log | head -1 | sed 's/listen=\[//; s/\]//')
"$BIN" simulate --target "$ADDR" "${FLEET[@]}" --cn 2011,2051,2061,2031 \
    --interval "$INTERVAL" --minute-every "$MINUTE_EVERY" --frame-size 500 \
    --speedup "$SPEEDUP" --duration "$DURATION" --ramp 5 --progress 0 --json || true
for _ in $(seq 300); do
    C=$(sqlite3 data/frames.db "select seq from cursors where name = 'alarms'" || true)
    M=$(sqlite3 data/frames.db "select max(seq) from records where direction = 'in'")
    [ -n "$C" ] && [ "$C" -ge "$M" ] && break
    sleep 1
done
kill "$GW"
wait "$GW" || true
GW=
echo "records per CN:"
sqlite3 data/frames.db "select cn, count(*) from records where direction = 'in' group by cn"
"$BIN" alarms --db data/frames.db --json > alarms.jsonl
python3 - devices.toml <<'PY'
import collections, json, re, sys
print("alarms by kind:", dict(collections.Counter(json.loads(l)["kind"] for l in open("alarms.jsonl"))))
mns = re.findall(r'mn = "([^"]+)"', open(sys.argv[1]).read())
with open("control.toml", "w") as f:
    f.write(open("gw.toml").read())
    for m in mns:
        f.write(f'[alarms.device."{m}"]\naggregate_stamp = "end"\n')
PY
"$BIN" replay data/frames.db --config gw.toml --report clean.json > /dev/null
"$BIN" replay data/frames.db --config control.toml --report control.json > /dev/null
python3 - <<'PY'
import collections, json
for name in ["clean", "control"]:
    alarms = json.load(open(name + ".json"))["alarms"]
    print(f"replay {name}:", dict(collections.Counter(a["kind"] for a in alarms)))
PY
