#!/usr/bin/env bash
# Peers, side by side: Tern's load generator and the same scenarios against Mosquitto
# (MQTT QoS 1), Redis Streams and NATS JetStream, in one session on this machine.
#
#   bench/peers/run.sh [online] [drain] [groups] [open]   (default: all four)
#
# Pinned mode (the default, PINNED=1): every server runs on CPU 0 (`taskset -c 0`; Tern
# with `--cores 1`) and every generator on CPU 1, so that no server shares a core with its
# load and Tern gets exactly the one core the single-threaded peers use. PINNED=0 lets
# servers and generators share both cores (the older two-core figures).
#
# `open` is the moderate-load table: open loop at RATES (1000 5000 20000) msg/s over USERS
# users, and the floor (2 users, one message in flight); latencies count from each
# message's intended send time (both generators pace with `tern_bench::pacer`).
#
# Installs the peers with apt if they are missing, builds ternd, loadgen and peerbench
# (release), then for each scenario runs Tern (loadgen starts its own ternd) and each peer,
# every peer started afresh on loopback with an empty data directory and stopped after its
# run. Durability, as configured below:
#   - ternd: every message fdatasync'ed before its sent tick (group commit).
#   - Redis 7.0: appendonly yes with appendfsync always (fsync before the reply, batched
#     per event-loop turn) and again with appendfsync everysec; RDB snapshots off.
#   - Mosquitto 2.0: persistence true, autosave_interval 1800 s (the default): the
#     in-memory store is written out whole every 30 minutes and at shutdown; no fsync per
#     message.
#   - NATS 2.9: JetStream file storage; the file store is fsync'ed in the background every
#     60 s (fixed in 2.9; `jetstream { sync_interval: always }` needs 2.10, which Debian
#     does not package), publishes are acked once written to the OS.
# Parameters (environment): USERS (1000), SECONDS_ (20), WINDOW (8), DRAIN_MESSAGES (100),
# GROUPS_ (50), GROUP_SIZE (256), GROUP_MESSAGES (20). Output: the figures on stdout and in
# target/peers/results.txt; one JSON line per run (Tern and peers) in target/peers/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/../.."

USERS=${USERS:-1000}
SECONDS_=${SECONDS_:-20}
WINDOW=${WINDOW:-8}
DRAIN_MESSAGES=${DRAIN_MESSAGES:-100}
GROUPS_=${GROUPS_:-50}
GROUP_SIZE=${GROUP_SIZE:-256}
GROUP_MESSAGES=${GROUP_MESSAGES:-20}
RATES=${RATES:-1000 5000 20000}
PINNED=${PINNED:-1}
SCENARIOS=${*:-online drain groups open}
if ((PINNED)); then
    SERVER_CPUS=(taskset -c 0)
    GENERATOR_CPUS=(taskset -c 1)
    TERN_PINNING=(--ternd-cpus 0 --cores 1)
    PLACEMENT="pinned: server on CPU 0, generator on CPU 1"
else
    SERVER_CPUS=()
    GENERATOR_CPUS=()
    TERN_PINNING=()
    PLACEMENT="unpinned: server and generator share both cores"
fi
OUT=target/peers
RESULTS=$OUT/results.txt
MQTT_ADDR=127.0.0.1:18830
REDIS_ADDR=127.0.0.1:16379
NATS_ADDR=127.0.0.1:14222

missing=()
command -v mosquitto >/dev/null || missing+=(mosquitto)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v nats-server >/dev/null || missing+=(nats-server)
if ((${#missing[@]})); then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
cargo build --release -p tern-edge --bin ternd -p tern-bench --bin loadgen --bin peerbench

mkdir -p "$OUT"
SERVER_PID=
stop_server() {
    if [[ -n $SERVER_PID ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
    fi
}
trap stop_server EXIT

# Waits until something listens on host:port.
wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on $1" >&2
    return 1
}

fresh_dir() {
    rm -rf "$OUT/data/$1"
    mkdir -p "$OUT/data/$1"
    realpath "$OUT/data/$1"
}

start_mqtt() {
    local dir
    dir=$(fresh_dir mosquitto)
    cat >"$dir/mosquitto.conf" <<CONF
listener ${MQTT_ADDR#*:} ${MQTT_ADDR%:*}
allow_anonymous true
set_tcp_nodelay true
user root
persistence true
persistence_location $dir/
autosave_interval 1800
max_queued_messages 0
max_inflight_messages 20
log_dest file $dir/mosquitto.log
CONF
    "${SERVER_CPUS[@]}" mosquitto -c "$dir/mosquitto.conf" &
    SERVER_PID=$!
    wait_port "$MQTT_ADDR"
}

start_redis() {
    local dir
    dir=$(fresh_dir "redis-$1")
    "${SERVER_CPUS[@]}" redis-server --bind "${REDIS_ADDR%:*}" --port "${REDIS_ADDR#*:}" --dir "$dir" \
        --appendonly yes --appendfsync "$1" --save "" --protected-mode no \
        --maxclients 10000 --logfile "$dir/redis.log" &
    SERVER_PID=$!
    wait_port "$REDIS_ADDR"
}

start_nats() {
    local dir
    dir=$(fresh_dir nats)
    cat >"$dir/nats.conf" <<CONF
listen: $NATS_ADDR
max_payload: 1MB
jetstream { store_dir: "$dir/js" }
CONF
    "${SERVER_CPUS[@]}" nats-server -c "$dir/nats.conf" -l "$dir/nats.log" &
    SERVER_PID=$!
    wait_port "$NATS_ADDR"
}

# Runs peerbench against a started peer: peer, address, label, scenario, extra flags.
peer() {
    local name=$1 addr=$2 label=$3 scenario=$4
    shift 4
    echo "== $name [$label] $scenario (load: $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$RESULTS"
    "${GENERATOR_CPUS[@]}" ./target/release/peerbench --peer "$name" --addr "$addr" --label "$label" \
        --scenario "$scenario" --server-pid "$SERVER_PID" "$@" | tee -a "$RESULTS"
    stop_server
}

tern() {
    echo "== tern [fdatasync before sent] $1 (load: $(cut -d' ' -f1-3 /proc/loadavg))" \
        | tee -a "$RESULTS"
    "${GENERATOR_CPUS[@]}" ./target/release/loadgen "${TERN_PINNING[@]}" "${@:2}" | tee -a "$RESULTS"
}

run_all() {
    local scenario=$1
    shift
    case $scenario in
    online) tern online --users "$USERS" --seconds "$SECONDS_" --window "$WINDOW" ;;
    drain) tern drain --scenario drain --users $((USERS + 10)) --drain-messages "$DRAIN_MESSAGES" ;;
    groups)
        tern groups --scenario groups --users $((USERS + GROUPS_)) --groups "$GROUPS_" \
            --group-size "$GROUP_SIZE" --group-messages "$GROUP_MESSAGES"
        ;;
    esac
    run_peers "$scenario" "$@"
}

# Every peer, each started afresh, in one scenario with peerbench's flags.
run_peers() {
    local scenario=$1
    shift
    start_mqtt && peer mqtt "$MQTT_ADDR" "QoS 1, autosave 1800 s" "$scenario" "$@"
    start_redis always && peer redis "$REDIS_ADDR" "appendfsync always" "$scenario" "$@"
    start_redis everysec && peer redis "$REDIS_ADDR" "appendfsync everysec" "$scenario" "$@"
    start_nats && peer nats "$NATS_ADDR" "file store, fsync every 60 s" "$scenario" "$@"
    start_nats && peer nats "$NATS_ADDR" "same, a stream per user/group" "$scenario" "$@" \
        --nats-stream-each
}

versions="$(mosquitto -h | head -1); $(redis-server --version | cut -d' ' -f1-3)"
echo "=== $(date -u +%FT%TZ) $(nproc) cores, $PLACEMENT; $versions; $(nats-server --version)" \
    | tee -a "$RESULTS"
for scenario in $SCENARIOS; do
    case $scenario in
    online) run_all online --users "$USERS" --seconds "$SECONDS_" --window "$WINDOW" ;;
    drain) run_all drain --users "$USERS" --drain-messages "$DRAIN_MESSAGES" ;;
    groups)
        run_all groups --users $((USERS + GROUPS_)) --groups "$GROUPS_" \
            --group-size "$GROUP_SIZE" --group-messages "$GROUP_MESSAGES"
        ;;
    open)
        for rate in $RATES; do
            tern "open loop $rate msg/s" --users "$USERS" --seconds "$SECONDS_" \
                --window "$WINDOW" --rate "$rate"
            run_peers online --users "$USERS" --seconds "$SECONDS_" --window "$WINDOW" \
                --rate "$rate"
        done
        tern "floor (2 users, 1 in flight)" --users 2 --seconds "$SECONDS_" --window 1
        run_peers online --users 2 --seconds "$SECONDS_" --window 1
        ;;
    *) echo "unknown scenario $scenario (online, drain, groups, open)" >&2 && exit 2 ;;
    esac
done
grep '^JSON ' "$RESULTS" | sed 's/^JSON //' >"$OUT/results.jsonl"
