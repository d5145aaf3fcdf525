# Shell helpers shared by benches/e2e.sh and benches/floor.sh (sourced; they
# use the caller's $WORK and $TCK).

# A free TCP port on loopback.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits up to 10 s for 127.0.0.1:$1 to accept connections.
wait_port() {
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "port $1 never opened" >&2
    return 1
}

# CPU ticks of this shell's reaped children (the simulator, once `simulate`
# returned). `times` must run in this shell, not in a $(...) subshell.
child_ticks() {
    times >"$WORK/times"
    awk -v t="$TCK" 'NR == 2 { for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); s += a[1] * 60 + a[2] } } END { printf "%d", s * t }' "$WORK/times"
}
