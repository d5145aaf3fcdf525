#!/usr/bin/env bash
# Two gateways behind HAProxy (send-proxy-v2) publishing to one mosquitto, on
# this machine, by hand: what tests/scaleout.rs asserts, to look at.
# See deploy/multi-node.md.
#
#   cargo build --release && deploy/multinode-demo.sh [--no-wait]
#
# Needs haproxy, mosquitto, mosquitto-clients (mosquitto_sub) and python3 (the
# demo devices). Everything runs from a temporary directory on free loopback
# ports and is stopped on exit. HJ212_BIN overrides the gateway binary.
set -euo pipefail

BIN=${HJ212_BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release/hj212-gateway}
WAIT=1
[ "${1:-}" = "--no-wait" ] && WAIT=0
for tool in haproxy mosquitto mosquitto_sub python3; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || {
        echo "missing: $tool (apt-get install haproxy mosquitto mosquitto-clients python3)" >&2
        exit 2
    }
done
[ -x "$BIN" ] || { echo "no gateway binary at $BIN (cargo build --release)" >&2; exit 2; }
export PATH="$PATH:/usr/sbin"

DIR=$(mktemp -d /tmp/hj212-multinode.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 100); do
        python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on $1" >&2; exit 1
}

MQTT=$(free_port); LB=$(free_port); GW1=$(free_port); GW2=$(free_port)
echo "== in $DIR: mosquitto :$MQTT, haproxy :$LB, gw1 :$GW1, gw2 :$GW2"

cat >"$DIR/mosquitto.conf" <<EOF
listener $MQTT 127.0.0.1
allow_anonymous true
log_dest stderr
EOF
mosquitto -c "$DIR/mosquitto.conf" 2>"$DIR/mosquitto.log" & PIDS+=($!)
wait_port "$MQTT"

# Two members of one shared-subscription group split the stream.
for c in 1 2; do
    mosquitto_sub -p "$MQTT" -q 1 -t "\$share/demo/hj212/+/+" -v >"$DIR/consumer$c.log" & PIDS+=($!)
done

for n in 1 2; do
    port=GW$n
    mkdir -p "$DIR/gw$n"
    cat >"$DIR/gw$n/gateway.toml" <<EOF
[server]
listen = ["127.0.0.1:${!port}"]
proxy_protocol = "v2"
proxy_trusted = ["127.0.0.1/32"]
[store]
sync = "normal"
[metrics]
listen = "127.0.0.1:$((9463 + n))"
[mqtt]
url = "mqtt://127.0.0.1:$MQTT"
client_id = "gw$n"
EOF
    "$BIN" serve --config "$DIR/gw$n/gateway.toml" --data "$DIR/gw$n/data" 2>"$DIR/gw$n/gateway.log" &
    PIDS+=($!)
    eval "GW${n}_PID=$!"
    wait_port "${!port}"
done

cat >"$DIR/haproxy.cfg" <<EOF
defaults
    mode tcp
    timeout connect 2s
    timeout client 15m
    timeout server 15m
    retries 3
    option redispatch
frontend hj212
    bind 127.0.0.1:$LB
    default_backend gateways
backend gateways
    balance roundrobin
    default-server send-proxy-v2 check check-send-proxy inter 500ms fall 1 rise 2
    server gw1 127.0.0.1:$GW1
    server gw2 127.0.0.1:$GW2
EOF
haproxy -db -f "$DIR/haproxy.cfg" >"$DIR/haproxy.log" 2>&1 & PIDS+=($!)
wait_port "$LB"

# Eight loggers from 127.0.0.10..17, each sending frames and waiting for acks,
# reconnecting through the balancer when the connection breaks. Between the two
# phases the script SIGKILLs gw1; the devices keep their connections.
cat >"$DIR/devices.py" <<'EOF'
import os, signal, socket, sys, time
lb, victim, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

def crc(seg):
    c = 0xFFFF
    for b in seg:
        c = (c >> 8) ^ b
        for _ in range(8):
            c = (c >> 1) ^ 0xA001 if c & 1 else c >> 1
    return c

def frame(mn, n):
    qn = "20240601%02d%02d%02d%03d" % (8 + n // 3600000, n // 60000 % 60, n // 1000 % 60, n % 1000)
    seg = ("QN=%s;ST=31;CN=2011;PW=123456;MN=%s;Flag=5;CP=&&DataTime=20240601085857;"
           "a21026-Rtd=12.5,a21026-Flag=N&&" % (qn, mn)).encode()
    return b"##%04d" % len(seg) + seg + b"%04X\r\n" % crc(seg)

socks = {}
def phase(first_qn):
  for i in range(8):
    src, mn = "127.0.0.%d" % (10 + i), "010000A8900016F0%08d" % (100 + i)
    acked = reconnects = 0
    for n in range(first_qn, first_qn + count):
        f = frame(mn, n)
        for attempt in range(50):
            try:
                s = socks.get(src)
                if s is None:
                    s = socket.socket(); s.bind((src, 0)); s.connect(("127.0.0.1", lb))
                    s.settimeout(3); socks[src] = s
                s.sendall(f)
                buf = b""
                while not buf.endswith(b"\r\n"):
                    chunk = s.recv(256)
                    if not chunk: raise ConnectionError("closed")
                    buf += chunk
                acked += 1
                break
            except OSError:
                socks.pop(src, None); reconnects += 1; time.sleep(0.2)
    print("device %s (%s): %d/%d acked, %d reconnects, now from %s"
          % (src, mn, acked, count, reconnects, socks[src].getsockname()))

print("== phase 1: 8 devices x %d frames through haproxy" % count)
phase(0)
print("== kill -9 gw1 (pid %d); the same devices send %d more frames each" % (victim, count))
os.kill(victim, signal.SIGKILL)
phase(count)
EOF

per_node() {
    for n in 1 2; do
        echo "-- gw$n: inbound frames by peer address (the devices, not haproxy)"
        "$BIN" export --data "$DIR/gw$n/data" --format jsonl --direction in |
            python3 -c 'import sys,json,collections; c=collections.Counter(json.loads(l)["peer"].rsplit(":",1)[0] for l in sys.stdin); print(dict(sorted(c.items())))'
    done
}
consumers() {
    sleep 1
    for c in 1 2; do
        echo "-- consumer $c: $(grep -c '"seq"' "$DIR/consumer$c.log" || true) data messages"
    done
    # A frame is (mn, qn) across nodes: each node numbers its own log (seq).
    cat "$DIR"/consumer?.log | python3 -c 'import sys,json; k=[(d["mn"],d["qn"]) for d in (json.loads(l.split(" ",1)[1]) for l in sys.stdin if "\"seq\"" in l)]; print("-- together: %d messages, %d distinct frames of 80 sent" % (len(k), len(set(k))))'
}

python3 -u "$DIR/devices.py" "$LB" "$GW1_PID" 5
echo "== where the frames are: gw1 kept what it took before it died"
per_node; consumers

echo "== restart gw1 on its data directory: it publishes what it had not yet published"
"$BIN" serve --config "$DIR/gw1/gateway.toml" --data "$DIR/gw1/data" 2>>"$DIR/gw1/gateway.log" &
PIDS+=($!)
wait_port "$GW1"
sleep 1
consumers

echo "== verify each node's log (gw1 was killed)"
for n in 1 2; do "$BIN" verify --data "$DIR/gw$n/data" | tail -1; done

if [ "$WAIT" = 1 ]; then
    echo "== everything is in $DIR (logs, data dirs). Enter stops and removes it."
    read -r _
fi
