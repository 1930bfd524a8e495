#!/usr/bin/env bash
# Runs the same load scenario against the ceiling server, Lockstep and RabbitMQ Web-STOMP,
# back to back in one invocation, and prints each result line and the ratios.
#
#   loadtest/compare.sh fanout      # 1000 subscribers on 1 topic: highest rate with p99 < 50 ms
#   loadtest/compare.sh fanout10    # 1000 subscribers on 10 topics at 2000 msg/s, 100-byte payloads
#   loadtest/compare.sh idle        # 10,000 connections x 3 subscriptions held 90 s: RSS per connection
#   loadtest/compare.sh connect     # connection + CONNECT + SUBSCRIBE-with-receipt rate
#   loadtest/compare.sh redis       # 2 nodes through Redis, then through a 3-master Redis Cluster,
#                                   # against the single in-process node in the same run
#   loadtest/compare.sh locks       # acquire+release pairs/s: SQLite, PostgreSQL 1 and 3 nodes; references:
#                                   # the same decisions as raw SQL (SQLite, PostgreSQL), Redis SET NX PX,
#                                   # and the database alone (pgbench: decision functions vs raw CTEs)
#   loadtest/compare.sh presign     # presigned URLs/s on one core vs boto3, and through the HTTP API
#   loadtest/compare.sh history    # history on vs off vs the commit before history (BASELINE, default
#                                   # 4292fc8): fan-out on 1 node and 2 nodes + Redis, Redis CPU
#                                   # per event; resume latency (1000 clients, 100 and 1000 missed);
#                                   # memory per retained event (in-process ring, Redis stream)
#   loadtest/compare.sh resume     # only the resume latency part of history
#   loadtest/compare.sh retained   # only the memory per retained event part of history
#   loadtest/compare.sh keyed      # keyed publishing (10 keys per publisher) against unkeyed, back to
#                                   # back, 1 node and 2 nodes + Redis; snapshot latency for 1000 keys
#   loadtest/compare.sh presence   # idle RSS per connection, presence on vs off (alternated); 2,000 and
#                                   # 10,000 members on 2 nodes + Redis: join latency across nodes, list
#                                   # latency, Redis commands/s while held, RSS per member
#   loadtest/compare.sh control    # the revocation check's cost per connection setup against the commit
#                                   # before it (BASELINE, default f75c5fa), 1 node + Redis; disconnect
#                                   # and unsubscribe latency across 3 nodes + Redis
#   loadtest/compare.sh webhooks   # occupancy webhooks to a local receiver: delivery lag and throughput,
#                                   # SQLite (embedded) and PostgreSQL queues, against sequential signed
#                                   # POSTs from the load generator to the same receiver
#   BASELINE=<git rev> loadtest/compare.sh ab
#                                   # this tree against an earlier commit, alternating twice:
#                                   # CPU per delivery, fanout p99, idle RSS per connection
#   loadtest/compare.sh all
#
# Everything runs on loopback and stops by itself. Servers are release builds started here and
# stopped by PID; RabbitMQ runs as a private node on its own ports (so its file-descriptor limit
# and configuration are ours, not the machine's). Set NO_RABBIT=1 to skip RabbitMQ, and
# LOG_LEVEL (default warn) for Lockstep's log filter.
# Results also go to $OUT (default target/bench/compare-<time>.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lockstep-target}"
export RUST_BACKTRACE=0
scenario="${1:-all}"
cargo build --release --locked -q -p lockstep -p loadtest
bin="$CARGO_TARGET_DIR/release"
work=$(mktemp -d)
OUT="${OUT:-$CARGO_TARGET_DIR/bench/compare-$(date +%Y%m%d-%H%M%S).jsonl}"
mkdir -p "$(dirname "$OUT")"
pids=()
rabbit_node=""
pg_stop=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ ${#pg_stop[@]} -gt 0 ]; then "${pg_stop[@]}" >/dev/null 2>&1 || true; fi
  stop_rabbit
  rm -rf "$work"
}
trap cleanup EXIT
ulimit -n 20000

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 300); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

start_ceiling() {
  "$bin/loadtest" ceiling-server >"$work/ceiling.out" 2>&1 &
  ceiling_pid=$!; pids+=("$ceiling_pid")
  for _ in $(seq 1 100); do grep -q listening "$work/ceiling.out" && break; sleep 0.05; done
  ceiling_url=$(sed -n 's/.*listening on \(ws:[^ ]*\)/\1/p' "$work/ceiling.out")
}

start_lockstep() {
  secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  # A backend publisher is not rate-limited like a browser connection.
  LOCKSTEP_JWT_SECRET=$secret LOCKSTEP_HUB_PUBLISH_RATE=10000000 LOCKSTEP_HUB_PUBLISH_BURST=100000 \
    LOCKSTEP_LOG_LEVEL="${LOG_LEVEL:-warn}" LOCKSTEP_DATA_DIR="$work/lockstep" env "${storage_env[@]}" "${extra_env[@]}" \
    "${lockstep_bin:-$bin/lockstep}" serve --listen 127.0.0.1:0 >"$work/lockstep.out" 2>"$work/lockstep.err" &
  lockstep_pid=$!; pids+=("$lockstep_pid")
  for _ in $(seq 1 100); do grep -q listening "$work/lockstep.out" && break; sleep 0.05; done
  lockstep_http=$(sed -n 's/^lockstep listening on //p' "$work/lockstep.out")
  lockstep_url="ws://${lockstep_http#http://}/ws"
  export LOADTEST_JWT_SECRET=$secret
}

# Presigning needs a bucket configured but never contacts it (only `commit` does), so the
# benchmarks sign for an address nothing listens on, with the same keys as presign_boto3.py.
storage_env=(LOCKSTEP_S3_BUCKET=items LOCKSTEP_S3_ENDPOINT=http://127.0.0.1:9000 LOCKSTEP_S3_PATH_STYLE=true
  LOCKSTEP_S3_ACCESS_KEY_ID=AKIDEXAMPLE LOCKSTEP_S3_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY)

# RabbitMQ runs only while it is measured: with its node started (idle) before the sweeps the
# ceiling server lost about half its rate (BENCHMARKS.md, 2026-11-28).
stop_rabbit() {
  [ -n "$rabbit_node" ] || return 0
  kill "$rabbit_pid" 2>/dev/null || true
  for _ in $(seq 1 300); do kill -0 "$rabbit_pid" 2>/dev/null || break; sleep 0.1; done
  rabbit_node=""
}

start_rabbit() {
  [ "${NO_RABBIT:-0}" = 1 ] && return 0
  command -v rabbitmq-server >/dev/null || { echo "rabbitmq-server not installed; skipping RabbitMQ (apt-get install rabbitmq-server)" >&2; NO_RABBIT=1; return 0; }
  local dir="$work/rabbit" amqp dist
  mkdir -p "$dir"
  amqp=$(free_port); dist=$(free_port); rabbit_port=$(free_port); stomp=$(free_port)
  echo '[rabbitmq_web_stomp].' >"$dir/enabled_plugins"
  # Every listener on its own free port: the machine's own RabbitMQ may hold the defaults.
  cat >"$dir/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$amqp
stomp.listeners.tcp.1 = 127.0.0.1:$stomp
web_stomp.tcp.ip = 127.0.0.1
web_stomp.tcp.port = $rabbit_port
loopback_users = none
CONF
  # Debian's /usr/sbin/rabbitmq-server switches to the rabbitmq user through su, whose PAM
  # session resets the open-file limit to 1024 (RabbitMQ then stalls near 1000 connections).
  # As root, start the real script with setpriv instead, which keeps our 20,000 limit.
  local runner=()
  if [ "$(id -u)" = 0 ] && id rabbitmq >/dev/null 2>&1; then
    chown -R rabbitmq:rabbitmq "$work"
    runner=(setpriv --reuid rabbitmq --regid rabbitmq --init-groups env HOME=/var/lib/rabbitmq)
  fi
  rabbit_node="lsbench$$@localhost"
  RABBITMQ_NODENAME=$rabbit_node RABBITMQ_NODE_PORT=$amqp RABBITMQ_DIST_PORT=$dist \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" RABBITMQ_CONFIG_FILE="$dir/rabbitmq" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" RABBITMQ_PID_FILE="$dir/pid" \
    "${runner[@]}" /usr/lib/rabbitmq/bin/rabbitmq-server >"$dir/out.log" 2>&1 &
  pids+=("$!")
  for _ in $(seq 1 600); do (echo >"/dev/tcp/127.0.0.1/$rabbit_port") 2>/dev/null && break; sleep 0.1; done
  (echo >"/dev/tcp/127.0.0.1/$rabbit_port") 2>/dev/null || { echo "RabbitMQ did not start; see $dir/log" >&2; tail -20 "$dir/out.log" >&2; exit 1; }
  rabbit_pid=$(cat "$dir/pid")
  pids+=("$rabbit_pid")
  echo "rabbitmq: private node $rabbit_node, open-file limit $(awk '/open files/ {print $4}' "/proc/$rabbit_pid/limits")"
  rabbit_url="ws://127.0.0.1:$rabbit_port/ws"
}

record() { tee -a "$OUT"; }

# Extra LOCKSTEP_* settings for the nodes a scenario starts (empty: defaults).
extra_env=()

start_lockstep_pair() { # redis-url: two nodes sharing it; sets pair_url and pair_pids
  start_api_nodes 2 "" "$1"
  pair_pids=("${api_pids[@]}")
  pair_url=$(sed 's|http://\([^,]*\)|ws://\1/ws|g' <<<"$api_http")
}

stop_pids() { for p in "$@"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }

start_redis() { # sets redis_port, redis_pid
  redis_port=$(free_port)
  redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no --dir "$work" >/dev/null 2>&1 &
  redis_pid=$!; pids+=("$redis_pid")
  wait_port "$redis_port"
}

start_redis_cluster() { # 3 masters; sets cluster_url, cluster_pids
  local i port dir addrs=()
  cluster_pids=()
  for i in 1 2 3; do
    # Redis Cluster also binds port + 10000 for its bus. Both stay below the kernel's ephemeral
    # range (32768 and up), where the load generator's own connections may already hold the
    # bus port without listening on it.
    while :; do port=$((20000 + RANDOM % 2700)); (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null || (echo >"/dev/tcp/127.0.0.1/$((port + 10000))") 2>/dev/null || break; done
    dir="$work/cluster$i"; mkdir -p "$dir"
    redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --dir "$dir" \
      --cluster-enabled yes --cluster-config-file nodes.conf >/dev/null 2>&1 &
    cluster_pids+=("$!"); pids+=("$!")
    wait_port "$port"
    addrs+=("127.0.0.1:$port")
  done
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
  for _ in $(seq 1 200); do redis-cli -p "${addrs[0]#*:}" cluster info | grep -q cluster_state:ok && break; sleep 0.05; done
  cluster_url="redis-cluster://$(IFS=,; echo "${addrs[*]}")"
}

# Highest rate of a sweep with p99 < 50 ms and nothing lost.
best() { jq -s '[.[] | select(.latency.p99_ms < 50 and .lost == 0)] | max_by(.deliveries_per_sec) // {deliveries_per_sec: 0, rate: 0, latency: {p99_ms: null}}'; }

fanout_sweep() { # name url target rates
  "$bin/loadtest" fanout --target "$3" --url "$2" --subscribers 1000 --topics 1 --rates "$4" --duration 10s 2>/dev/null | record >"$work/$1.fanout"
  best <"$work/$1.fanout" >"$work/$1.best"
  echo "$1: $(jq -r '"\(.deliveries_per_sec|floor) deliveries/s at \(.rate) msg/s, p99 \(.latency.p99_ms) ms"' "$work/$1.best")"
}

ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'{a/b:.2f}' if b else 'n/a')" "$1" "$2"; }

run_fanout() {
  echo "== fanout: 1000 subscribers on 1 topic, 10 s per rate; best rate with p99 < 50 ms and no loss"
  local rates=${FANOUT_RATES:-250,500,750,1000,1250,1500,2000}
  fanout_sweep ceiling "$ceiling_url" ceiling "$rates"
  fanout_sweep lockstep "$lockstep_url" lockstep "$rates"
  local c l
  c=$(jq .deliveries_per_sec "$work/ceiling.best"); l=$(jq .deliveries_per_sec "$work/lockstep.best")
  echo "lockstep / ceiling = $(ratio "$l" "$c")"
  start_rabbit
  if [ "${NO_RABBIT:-0}" != 1 ]; then
    fanout_sweep rabbitmq "$rabbit_url" rabbitmq 2,5,10,20,30,40,50
    echo "lockstep / rabbitmq = $(ratio "$l" "$(jq .deliveries_per_sec "$work/rabbitmq.best")")"
    # RabbitMQ may meet p99 < 50 ms at no rate at all; then compare with its highest rate that
    # lost nothing, whatever its latency, and say so.
    jq -s '[.[] | select(.lost == 0)] | max_by(.deliveries_per_sec) // {deliveries_per_sec: 0, rate: 0, latency: {p99_ms: null}}' \
      <"$work/rabbitmq.fanout" >"$work/rabbitmq.lossless"
    echo "rabbitmq, highest rate with nothing lost (any latency): $(jq -r '"\(.deliveries_per_sec|floor) deliveries/s at \(.rate) msg/s, p99 \(.latency.p99_ms) ms"' "$work/rabbitmq.lossless")"
    echo "lockstep / rabbitmq (lossless) = $(ratio "$l" "$(jq .deliveries_per_sec "$work/rabbitmq.lossless")")"
  fi
  stop_rabbit
}

run_fanout10() {
  echo "== fanout10: 1000 subscribers on 10 topics, 2000 msg/s, 100-byte payloads, 20 s"
  local name url
  for name in ceiling lockstep; do
    url=$([ $name = ceiling ] && echo "$ceiling_url" || echo "$lockstep_url")
    "$bin/loadtest" fanout --target "$name" --url "$url" --subscribers 1000 --topics 10 --rates 2000 --payload 100 --duration 20s 2>/dev/null | record >"$work/$name.f10"
    echo "$name: $(jq -r '"\(.deliveries_per_sec|floor) deliveries/s, lost \(.lost), p50 \(.latency.p50_ms) ms, p99 \(.latency.p99_ms) ms"' "$work/$name.f10")"
  done
  echo "lockstep p99 / ceiling p99 = $(ratio "$(jq .latency.p99_ms "$work/lockstep.f10")" "$(jq .latency.p99_ms "$work/ceiling.f10")")"
}

run_idle() {
  echo "== idle: 10,000 connections x 3 subscriptions, heart-beats every 10 s, held 90 s"
  # Fresh server processes: memory an earlier scenario left in the allocator would otherwise
  # be reused and hide what idle connections cost.
  stop_pids "$ceiling_pid" "$lockstep_pid"
  start_ceiling
  start_lockstep
  local name url pid
  for name in ceiling lockstep rabbitmq; do
    [ $name = rabbitmq ] && start_rabbit
    [ $name = rabbitmq ] && [ "${NO_RABBIT:-0}" = 1 ] && continue
    case $name in ceiling) url=$ceiling_url pid=$ceiling_pid;; lockstep) url=$lockstep_url pid=$lockstep_pid;; rabbitmq) url=$rabbit_url pid=$rabbit_pid;; esac
    "$bin/loadtest" idle --target "$name" --url "$url" --connections 10000 --subscriptions 3 --hold 90s --server-pid "$pid" --sources 4 2>/dev/null | record >"$work/$name.idle"
    echo "$name: $(jq -r '"\(.still_open)/\(.connections) open after \(.held_s) s, \(.rss_per_connection_kib) KiB RSS per connection"' "$work/$name.idle")"
  done
  stop_rabbit
}

run_connect() {
  echo "== connect: 10,000 x (TCP + upgrade + CONNECT + SUBSCRIBE with receipt), 64 at a time"
  local name url
  for name in lockstep rabbitmq; do
    [ $name = rabbitmq ] && start_rabbit
    [ $name = rabbitmq ] && [ "${NO_RABBIT:-0}" = 1 ] && continue
    url=$([ $name = lockstep ] && echo "$lockstep_url" || echo "$rabbit_url")
    "$bin/loadtest" connect --target "$name" --url "$url" --connections 10000 --concurrency 64 --sources 4 2>/dev/null | record >"$work/$name.connect"
    echo "$name: $(jq -r '"\(.connections_per_sec) connections/s (\(.succeeded) ok, \(.failed) failed), p99 setup \(.setup_latency.p99_ms) ms"' "$work/$name.connect")"
  done
  if [ "${NO_RABBIT:-0}" != 1 ]; then
    echo "lockstep / rabbitmq = $(ratio "$(jq .connections_per_sec "$work/lockstep.connect")" "$(jq .connections_per_sec "$work/rabbitmq.connect")")"
  fi
  stop_rabbit
}

run_redis() {
  local rates="250,500,750,1000,1250,1500" user_rates="5000,10000,20000,40000,60000"
  echo "== redis: 1000 subscribers on 1 topic, and on 1000 user topics; 1 node in-process vs 2 nodes through Redis"
  "$bin/loadtest" fanout --url "$lockstep_url" --subscribers 1000 --topics 1 --rates "$rates" --duration 10s \
    --cpu-pid lockstep="$lockstep_pid" 2>/dev/null | record >"$work/single.fanout"
  best <"$work/single.fanout" >"$work/single.best"
  echo "single node, in-process: $(jq -r '"\(.deliveries_per_sec|floor) deliveries/s at \(.rate) msg/s, p99 \(.latency.p99_ms) ms"' "$work/single.best")"
  start_redis
  start_lockstep_pair "redis://127.0.0.1:$redis_port"
  for shape in topic user; do
    if [ $shape = topic ]; then args=(--topics 1 --rates "$rates"); else args=(--topic-kind user --rates "$user_rates"); fi
    "$bin/loadtest" fanout --url "$pair_url" --subscribers 1000 "${args[@]}" --duration 10s \
      --cpu-pid redis="$redis_pid" --cpu-pid node1="${pair_pids[0]}" --cpu-pid node2="${pair_pids[1]}" 2>/dev/null | record >"$work/redis.$shape"
    best <"$work/redis.$shape" >"$work/redis.$shape.best"
    echo "2 nodes + Redis, $shape: $(jq -r '"\(.deliveries_per_sec|floor) deliveries/s at \(.rate) msg/s, p99 \(.latency.p99_ms) ms, Redis \(.cpu[0].us_per_published) us CPU per published event"' "$work/redis.$shape.best")"
  done
  echo "2 nodes + Redis / single node (1 topic) = $(ratio "$(jq .deliveries_per_sec "$work/redis.topic.best")" "$(jq .deliveries_per_sec "$work/single.best")")"
  stop_pids "${pair_pids[@]}" "$redis_pid"
  start_redis_cluster
  start_lockstep_pair "$cluster_url"
  for shape in topic user; do
    if [ $shape = topic ]; then args=(--topics 1 --rates "$rates"); else args=(--topic-kind user --rates "$user_rates"); fi
    "$bin/loadtest" fanout --url "$pair_url" --subscribers 1000 "${args[@]}" --duration 10s \
      --cpu-pid redis1="${cluster_pids[0]}" --cpu-pid redis2="${cluster_pids[1]}" --cpu-pid redis3="${cluster_pids[2]}" 2>/dev/null | record >"$work/cluster.$shape"
    best <"$work/cluster.$shape" >"$work/cluster.$shape.best"
    echo "2 nodes + Redis Cluster (3 masters), $shape: $(jq -r '"\(.deliveries_per_sec|floor) deliveries/s at \(.rate) msg/s, p99 \(.latency.p99_ms) ms, Redis \(([.cpu[]?.us_per_published] | add // 0) * 100 | round / 100) us CPU per published event (all shards)"' "$work/cluster.$shape.best")"
  done
  stop_pids "${pair_pids[@]}" "${cluster_pids[@]}"
}

start_postgres() { # a private cluster on a free port; sets pg_url
  local pgbin dir="$work/pg" port
  pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  [ -x "$pgbin/initdb" ] || { echo "PostgreSQL server binaries not found (tests/run.sh installs them)" >&2; exit 1; }
  port=$(free_port)
  mkdir -p "$dir"
  local as=()
  # PostgreSQL refuses to run as root.
  if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; chmod 755 "$work"; as=(setpriv --reuid postgres --regid postgres --init-groups); fi
  "${as[@]}" "$pgbin/initdb" -D "$dir/data" -U postgres -A trust >/dev/null
  "${as[@]}" "$pgbin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300" start >/dev/null
  pg_stop=("${as[@]}" "$pgbin/pg_ctl" -D "$dir/data" -m fast stop)
  pg_url="postgres://postgres@127.0.0.1:$port/postgres"
}

start_api_nodes() { # count database-url redis-url: N nodes; sets api_http (comma list) and api_pids
  local i out
  api_http=""; api_pids=()
  for i in $(seq 1 "$1"); do
    out="$work/api$i.out"
    rm -rf "$work/api$i"
    # Empty URLs mean the defaults (SQLite in the data directory, the in-process broker).
    LOCKSTEP_JWT_SECRET=$secret LOCKSTEP_HUB_PUBLISH_RATE=10000000 LOCKSTEP_HUB_PUBLISH_BURST=100000 \
      LOCKSTEP_LOG_LEVEL="${LOG_LEVEL:-warn}" LOCKSTEP_DATA_DIR="$work/api$i" \
      LOCKSTEP_DATABASE_URL="$2" LOCKSTEP_REDIS_URL="$3" env "${storage_env[@]}" "${extra_env[@]}" \
      "${lockstep_bin:-$bin/lockstep}" serve --listen 127.0.0.1:0 >"$out" 2>"$work/api$i.err" &
    api_pids+=("$!"); pids+=("$!")
    for _ in $(seq 1 100); do grep -q listening "$out" && break; sleep 0.05; done
    local http
    http=$(sed -n 's/^lockstep listening on //p' "$out")
    for _ in $(seq 1 200); do [ "$(curl -s -o /dev/null -w '%{http_code}' "$http/readyz")" = 200 ] && break; sleep 0.05; done
    api_http="${api_http:+$api_http,}$http"
  done
}

sign_line() { jq -r '"\(.urls_per_sec|floor) URLs/s, p50 \(.latency.p50_ms) ms, p99 \(.latency.p99_ms) ms per batch"'; }

locks_line() { jq -r '"\(.operations_per_sec|floor) pairs/s, p50 \(.latency.p50_ms) ms, p99 \(.latency.p99_ms) ms, \(.errors) errors"'; }

# The database alone, no node: pgbench drives the decision functions (loadtest/pgbench/
# decisions.sql) and the raw reference's CTEs (raw.sql) with the same clients, so the ratio
# shows how much of the gap the functions themselves make. pgbench opens one connection per
# client (the loadtest's raw reference shares a pool of 16).
run_locks_db() { # clients
  local pgbench tps_f tps_r
  pgbench="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)/pgbench"
  [ -x "$pgbench" ] || { echo "pgbench not found: no database-alone cell" >&2; return; }
  LOCKSTEP_JWT_SECRET=$secret LOCKSTEP_DATA_DIR="$work/migrate" LOCKSTEP_DATABASE_URL="$pg_url" \
    "$bin/lockstep" migrate >/dev/null 2>&1
  psql -q "$pg_url" -f loadtest/pgbench/tables.sql >/dev/null 2>&1
  # Pairs are script 1's transactions; script 2 is the node's batched outbox delete.
  tps_f=$("$pgbench" -n -c "$1" -j 2 -T 10 -M prepared -f loadtest/pgbench/decisions.sql@10 \
    -f loadtest/pgbench/outbox_delete.sql@1 "$pg_url" 2>/dev/null \
    | sed -n '/^SQL script 1/,/^SQL script 2/s/.*transactions (.*tps = \([0-9.]*\)).*/\1/p')
  tps_r=$("$pgbench" -n -c "$1" -j 2 -T 10 -M prepared -f loadtest/pgbench/raw.sql "$pg_url" 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
  echo "{\"scenario\":\"locks-db\",\"clients\":$1,\"functions_pairs_per_sec\":${tps_f:-null},\"raw_pairs_per_sec\":${tps_r:-null}}" | record >/dev/null
  echo "database alone (pgbench, $1 connections): decision functions ${tps_f%.*} pairs/s, raw CTEs ${tps_r%.*} pairs/s; functions / raw = $(ratio "${tps_f:-0}" "${tps_r:-1}")"
}

run_locks() {
  echo "== locks: acquire+release pairs/s, each client on its own item, 10 s per cell"
  # Lock requests draw on their token's event budget (api.publish_rate, 1000/s): one client
  # alone would be throttled, and this measures the decisions, not the budget.
  extra_env=(LOCKSTEP_API_PUBLISH_RATE=0)
  start_redis
  start_postgres
  local conc
  for conc in 1 16 64; do
    echo "-- $conc concurrent clients"
    "$bin/loadtest" locks --redis "redis://127.0.0.1:$redis_port" --concurrency "$conc" --duration 10s 2>/dev/null | record >"$work/locks.redis"
    echo "Redis SET NX PX + DEL (reference): $(locks_line <"$work/locks.redis")"
    "$bin/loadtest" locks --raw "sqlite://$work/raw-$conc.db" --concurrency "$conc" --duration 10s 2>/dev/null | record >"$work/locks.rawsqlite"
    echo "raw SQL on SQLite (reference): $(locks_line <"$work/locks.rawsqlite")"
    "$bin/loadtest" locks --raw "$pg_url" --concurrency "$conc" --duration 10s 2>/dev/null | record >"$work/locks.rawpg"
    echo "raw SQL on PostgreSQL, 16 connections (reference): $(locks_line <"$work/locks.rawpg")"
    run_locks_db "$conc"
    start_api_nodes 1 "sqlite://$work/bench-$conc.db" ""
    "$bin/loadtest" locks --http "$api_http" --concurrency "$conc" --duration 10s 2>/dev/null | record >"$work/locks.sqlite"
    echo "SQLite, 1 node: $(locks_line <"$work/locks.sqlite")"
    stop_pids "${api_pids[@]}"
    for nodes in 1 3; do
      start_api_nodes "$nodes" "$pg_url" "redis://127.0.0.1:$redis_port"
      "$bin/loadtest" locks --http "$api_http" --concurrency "$conc" --duration 10s 2>/dev/null | record >"$work/locks.pg$nodes"
      echo "PostgreSQL, $nodes node(s): $(locks_line <"$work/locks.pg$nodes")"
      stop_pids "${api_pids[@]}"
    done
    for f in sqlite pg1 pg3; do
      echo "  $f / Redis = $(ratio "$(jq .operations_per_sec "$work/locks.$f")" "$(jq .operations_per_sec "$work/locks.redis")")"
    done
    echo "  sqlite / raw SQLite = $(ratio "$(jq .operations_per_sec "$work/locks.sqlite")" "$(jq .operations_per_sec "$work/locks.rawsqlite")")"
    for f in pg1 pg3; do
      echo "  $f / raw PostgreSQL = $(ratio "$(jq .operations_per_sec "$work/locks.$f")" "$(jq .operations_per_sec "$work/locks.rawpg")")"
    done
    echo "  pg3 / pg1 = $(ratio "$(jq .operations_per_sec "$work/locks.pg3")" "$(jq .operations_per_sec "$work/locks.pg1")")"
  done
  "${pg_stop[@]}" >/dev/null; pg_stop=()
  stop_pids "$redis_pid"
  extra_env=()
}

run_presign() {
  echo "== presign: URLs signed per second on one core (no HTTP), Lockstep's signer vs boto3"
  local batch
  for batch in 1 300; do
    "$bin/loadtest" sign --count 60000 --batch "$batch" 2>/dev/null | record >"$work/sign.lockstep"
    echo "lockstep, batch $batch: $(sign_line <"$work/sign.lockstep")"
    if python3 -c 'import boto3' 2>/dev/null; then
      python3 loadtest/presign_boto3.py --count 60000 --batch "$batch" | record >"$work/sign.boto3"
      echo "boto3, batch $batch: $(sign_line <"$work/sign.boto3")"
      echo "  lockstep / boto3 = $(ratio "$(jq .urls_per_sec "$work/sign.lockstep")" "$(jq .urls_per_sec "$work/sign.boto3")")"
    else
      echo "boto3 not installed (pip install boto3): no reference" >&2
    fi
  done
  echo "== presign through the HTTP API, 10 s each (batch 300 alone: its latency; with 8 clients: throughput)"
  local cell conc
  for cell in 1:8 300:1 300:8; do
    batch=${cell%:*} conc=${cell#*:}
    "$bin/loadtest" presign --http "$lockstep_http" --batch "$batch" --concurrency "$conc" --duration 10s 2>/dev/null | record >"$work/presign.http"
    echo "HTTP, batch $batch, $conc client(s): $(jq -r '"\(.operations_per_sec) requests/s (\(.urls_per_sec|floor) URLs/s), p50 \(.latency.p50_ms) ms, p99 \(.latency.p99_ms) ms, \(.errors) errors"' "$work/presign.http")"
  done
}

echo "machine: $(nproc) cores, $(uname -r); $(date -u +%FT%TZ); results in $OUT"
start_ceiling
start_lockstep
# The same tree against an earlier commit: what a change cost. The baseline is built from a
# git worktree in the same target directory (only the workspace crates rebuild), copied out,
# and this tree rebuilt; the two binaries then take turns, twice, so a drift of the machine's
# speed shows as a spread.
run_ab() {
  local rev=${BASELINE:?set BASELINE to a git revision, e.g. BASELINE=HEAD~1}
  local tree="$work/baseline" shape
  git worktree add -q --detach "$tree" "$rev"
  (cd "$tree" && cargo build --release --locked -q -p lockstep)
  cp "$bin/lockstep" "$work/lockstep-baseline"
  # Once the worktree is gone its sources are missing, so cargo rebuilds this tree's crates.
  git worktree remove --force "$tree"
  cargo build --release --locked -q -p lockstep -p loadtest
  echo "== ab: $(git rev-parse --short "$rev") (baseline) against this tree; 1000 subscribers on 1 topic at 500 msg/s, 10 s; 1000 on 10 topics at 2000 msg/s, 100 B, 20 s; 10,000 idle connections x 3 subscriptions, 30 s"
  stop_pids "$ceiling_pid" "$lockstep_pid"
  local round name
  for round in 1 2; do
    for name in baseline current; do
      lockstep_bin=$([ $name = baseline ] && echo "$work/lockstep-baseline" || echo "$bin/lockstep")
      start_lockstep
      "$bin/loadtest" fanout --target lockstep --url "$lockstep_url" --subscribers 1000 --topics 1 --rates 500 --duration 10s \
        --cpu-pid lockstep="$lockstep_pid" 2>/dev/null | record >"$work/ab.$name.$round.f1"
      "$bin/loadtest" fanout --target lockstep --url "$lockstep_url" --subscribers 1000 --topics 10 --rates 2000 --payload 100 --duration 20s \
        --cpu-pid lockstep="$lockstep_pid" 2>/dev/null | record >"$work/ab.$name.$round.f10"
      stop_pids "$lockstep_pid"
      start_lockstep
      "$bin/loadtest" idle --target lockstep --url "$lockstep_url" --connections 10000 --subscriptions 3 --hold 30s \
        --server-pid "$lockstep_pid" --sources 4 2>/dev/null | record >"$work/ab.$name.$round.idle"
      stop_pids "$lockstep_pid"
      echo "round $round $name: 1 topic $(jq -r '"\(.deliveries_per_sec|floor)/s, lost \(.lost), p99 \(.latency.p99_ms) ms, \(.cpu[0].us_per_delivery) µs CPU per delivery"' "$work/ab.$name.$round.f1");" \
        "10 topics $(jq -r '"lost \(.lost), p99 \(.latency.p99_ms) ms, \(.cpu[0].us_per_delivery) µs CPU per delivery"' "$work/ab.$name.$round.f10");" \
        "idle $(jq -r '"\(.rss_per_connection_kib) KiB per connection"' "$work/ab.$name.$round.idle")"
    done
  done
  local b c
  for shape in f1 f10; do
    b=$(jq -s 'map(.cpu[0].us_per_delivery) | add / length * 100 | round / 100' "$work"/ab.baseline.*."$shape")
    c=$(jq -s 'map(.cpu[0].us_per_delivery) | add / length * 100 | round / 100' "$work"/ab.current.*."$shape")
    echo "$shape CPU per delivery, current / baseline = $(ratio "$c" "$b") (means over both rounds: $c vs $b µs)"
  done
  b=$(jq -s 'map(.rss_per_connection_kib) | add / length * 100 | round / 100' "$work"/ab.baseline.*.idle)
  c=$(jq -s 'map(.rss_per_connection_kib) | add / length * 100 | round / 100' "$work"/ab.current.*.idle)
  echo "idle RSS per connection, current / baseline = $(ratio "$c" "$b") ($c vs $b KiB)"
}

# History on against off (the same binary, history.enabled=false) and against the commit before
# history existed (BASELINE): plain SPUBLISH, no offsets. Each variant gets fresh processes.
run_history() {
  local rev=${BASELINE:-4292fc8}
  local tree="$work/baseline" rates="500,1000,1500,2000,2500"
  git worktree add -q --detach "$tree" "$rev"
  (cd "$tree" && cargo build --release --locked -q -p lockstep)
  cp "$bin/lockstep" "$work/lockstep-baseline"
  git worktree remove --force "$tree"
  cargo build --release --locked -q -p lockstep -p loadtest
  echo "== history: baseline $(git rev-parse --short "$rev") (no history), this tree with history off, and on"
  stop_pids "$ceiling_pid" "$lockstep_pid"
  local name
  for name in baseline off on; do
    lockstep_bin=$([ $name = baseline ] && echo "$work/lockstep-baseline" || echo "$bin/lockstep")
    extra_env=()
    [ $name = off ] && extra_env=(LOCKSTEP_HISTORY_ENABLED=false)
    start_lockstep
    "$bin/loadtest" fanout --url "$lockstep_url" --subscribers 1000 --topics 1 --rates "$rates" --duration 8s \
      --cpu-pid lockstep="$lockstep_pid" 2>/dev/null | record >"$work/h.$name.single"
    best <"$work/h.$name.single" >"$work/h.$name.single.best"
    "$bin/loadtest" fanout --url "$lockstep_url" --subscribers 1000 --topics 10 --rates 2000 --payload 100 --duration 15s \
      --cpu-pid lockstep="$lockstep_pid" 2>/dev/null | record >"$work/h.$name.ten"
    stop_pids "$lockstep_pid"
    start_redis
    start_lockstep_pair "redis://127.0.0.1:$redis_port"
    "$bin/loadtest" fanout --url "$pair_url" --subscribers 1000 --topics 1 --rates "$rates" --duration 8s \
      --cpu-pid redis="$redis_pid" 2>/dev/null | record >"$work/h.$name.pair"
    best <"$work/h.$name.pair" >"$work/h.$name.pair.best"
    "$bin/loadtest" fanout --url "$pair_url" --subscribers 1000 --topics 10 --rates 2000 --payload 100 --duration 15s \
      --cpu-pid redis="$redis_pid" 2>/dev/null | record >"$work/h.$name.pairten"
    stop_pids "${pair_pids[@]}" "$redis_pid"
    echo "$name: 1 node, 1 topic $(jq -r '"\(.deliveries_per_sec|floor)/s at \(.rate) msg/s, p99 \(.latency.p99_ms) ms, \(.cpu[0].us_per_delivery) µs CPU per delivery"' "$work/h.$name.single.best");" \
      "10 topics $(jq -r '"\(.deliveries_per_sec|floor)/s, lost \(.lost), p99 \(.latency.p99_ms) ms"' "$work/h.$name.ten");" \
      "2 nodes + Redis, 1 topic $(jq -r '"\(.deliveries_per_sec|floor)/s at \(.rate) msg/s, p99 \(.latency.p99_ms) ms, Redis \(.cpu[0].us_per_published) µs CPU per published event"' "$work/h.$name.pair.best");" \
      "10 topics $(jq -r '"\(.deliveries_per_sec|floor)/s, lost \(.lost), p99 \(.latency.p99_ms) ms, Redis \(.cpu[0].us_per_published) µs CPU per event"' "$work/h.$name.pairten")"
  done
  local shape
  for shape in single pair; do
    echo "$shape, best deliveries/s: on / off = $(ratio "$(jq .deliveries_per_sec "$work/h.on.$shape.best")" "$(jq .deliveries_per_sec "$work/h.off.$shape.best")"), on / baseline = $(ratio "$(jq .deliveries_per_sec "$work/h.on.$shape.best")" "$(jq .deliveries_per_sec "$work/h.baseline.$shape.best")")"
  done
  echo "Redis CPU per published event at 2000 msg/s on 10 topics: on / baseline (plain SPUBLISH) = $(ratio "$(jq .cpu[0].us_per_published "$work/h.on.pairten")" "$(jq .cpu[0].us_per_published "$work/h.baseline.pairten")")"
  lockstep_bin=""; extra_env=()

  run_resume
  run_retained
}

run_resume() {
  echo "== resume: 1000 clients resuming at once, 100 and 1000 missed events, 100-byte payloads"
  start_redis
  start_lockstep_pair "redis://127.0.0.1:$redis_port"
  "$bin/loadtest" resume --url "$pair_url" --http "${api_http%%,*}" --clients 1000 --missed 100,1000 2>/dev/null | record >"$work/h.resume.pair"
  stop_pids "${pair_pids[@]}" "$redis_pid"
  start_lockstep
  "$bin/loadtest" resume --url "$lockstep_url" --http "$lockstep_http" --clients 1000 --missed 100,1000 2>/dev/null | record >"$work/h.resume.single"
  stop_pids "$lockstep_pid"
  jq -r '"2 nodes + Redis: \(.missed) missed: \(.recovered)/\(.clients) recovered, p50 \(.latency.p50_ms) ms, p99 \(.latency.p99_ms) ms"' "$work/h.resume.pair"
  jq -r '"1 node: \(.missed) missed: \(.recovered)/\(.clients) recovered, p50 \(.latency.p50_ms) ms, p99 \(.latency.p99_ms) ms"' "$work/h.resume.single"

}

run_retained() {
  echo "== memory per retained event: 50,000 events of ~100-byte data on one team topic"
  local before after n=50000
  # The resume at the end reads all of them back, so "on" shows they were all retained.
  for name in off on; do
    extra_env=("LOCKSTEP_HISTORY_TEAM_EVENTS=$n" "LOCKSTEP_HISTORY_MAX_REPLAY=$n" LOCKSTEP_API_PUBLISH_RATE=0)
    [ $name = off ] && extra_env+=(LOCKSTEP_HISTORY_ENABLED=false)
    start_lockstep
    before=$(awk '/VmRSS/ {print $2}' "/proc/$lockstep_pid/status")
    "$bin/loadtest" resume --url "$lockstep_url" --http "$lockstep_http" --clients 1 --missed $n 2>/dev/null | record >"$work/h.retained.$name"
    after=$(awk '/VmRSS/ {print $2}' "/proc/$lockstep_pid/status")
    stop_pids "$lockstep_pid"
    echo "in-process, history $name: RSS grew $(( after - before )) KiB for $n events ($(python3 -c "print(round(($after-$before)*1024/$n))") B per event); resuming from before them: $(jq .recovered "$work/h.retained.$name")/1 recovered"
  done
  extra_env=(LOCKSTEP_API_PUBLISH_RATE=0)
  start_redis
  start_lockstep_pair "redis://127.0.0.1:$redis_port"
  "$bin/loadtest" resume --url "$pair_url" --http "${api_http%%,*}" --clients 1 --missed 1000 2>/dev/null >/dev/null || true
  local usage
  usage=$(redis-cli -p "$redis_port" MEMORY USAGE "lockstep:{/team/t0}:s" SAMPLES 0)
  echo "Redis stream of 1000 events: $usage bytes ($(( usage / 1000 )) B per event)"
  stop_pids "${pair_pids[@]}" "$redis_pid"
  extra_env=()
}

# Keyed state (DESIGN §13): the same binary publishing keyed events (each also its key's latest)
# against unkeyed ones, back to back in fresh processes; then how long a snapshot of 1000 keys
# takes when 100 clients ask at once.
run_keyed() {
  local rates="250,500,750,1000,1500" name keys
  echo "== keyed: 1000 subscribers on 1 topic, unkeyed vs keyed (10 keys per publisher), 8 s per rate"
  extra_env=()
  for name in unkeyed keyed; do
    keys=0; [ $name = keyed ] && keys=10
    start_lockstep
    "$bin/loadtest" fanout --url "$lockstep_url" --subscribers 1000 --topics 1 --rates "$rates" --duration 8s --keys $keys \
      --cpu-pid lockstep="$lockstep_pid" 2>/dev/null | record >"$work/k.$name.single"
    best <"$work/k.$name.single" >"$work/k.$name.single.best"
    stop_pids "$lockstep_pid"
    start_redis
    start_lockstep_pair "redis://127.0.0.1:$redis_port"
    "$bin/loadtest" fanout --url "$pair_url" --subscribers 1000 --topics 1 --rates "$rates" --duration 8s --keys $keys \
      --cpu-pid redis="$redis_pid" 2>/dev/null | record >"$work/k.$name.pair"
    best <"$work/k.$name.pair" >"$work/k.$name.pair.best"
    stop_pids "${pair_pids[@]}" "$redis_pid"
    echo "$name: 1 node $(jq -r '"\(.deliveries_per_sec|floor)/s at \(.rate) msg/s, p99 \(.latency.p99_ms) ms, \(.cpu[0].us_per_delivery) µs CPU per delivery"' "$work/k.$name.single.best");" \
      "2 nodes + Redis $(jq -r '"\(.deliveries_per_sec|floor)/s at \(.rate) msg/s, p99 \(.latency.p99_ms) ms, Redis \(.cpu[0].us_per_published) µs CPU per published event"' "$work/k.$name.pair.best")"
  done
  local shape
  for shape in single pair; do
    echo "$shape, best deliveries/s: keyed / unkeyed = $(ratio "$(jq .deliveries_per_sec "$work/k.keyed.$shape.best")" "$(jq .deliveries_per_sec "$work/k.unkeyed.$shape.best")")"
  done
  echo "Redis CPU per published event at the best rate: keyed / unkeyed = $(ratio "$(jq .cpu[0].us_per_published "$work/k.keyed.pair.best")" "$(jq .cpu[0].us_per_published "$work/k.unkeyed.pair.best")")"

  echo "== snapshot: 1000 keys, 100 clients subscribing with x-stream-offset:snapshot at once"
  start_lockstep
  "$bin/loadtest" resume --snapshot --url "$lockstep_url" --http "$lockstep_http" --clients 100 --missed 1000 2>/dev/null | record >"$work/k.snap.single"
  stop_pids "$lockstep_pid"
  start_redis
  start_lockstep_pair "redis://127.0.0.1:$redis_port"
  "$bin/loadtest" resume --snapshot --url "$pair_url" --http "${api_http%%,*}" --clients 100 --missed 1000 2>/dev/null | record >"$work/k.snap.pair"
  stop_pids "${pair_pids[@]}" "$redis_pid"
  jq -r '"1 node: \(.recovered)/\(.clients) complete, p50 \(.latency.p50_ms) ms, p99 \(.latency.p99_ms) ms"' "$work/k.snap.single"
  jq -r '"2 nodes + Redis: \(.recovered)/\(.clients) complete, p50 \(.latency.p50_ms) ms, p99 \(.latency.p99_ms) ms"' "$work/k.snap.pair"
}

run_presence() {
  local round state
  echo "== presence: idle RSS per connection with presence on vs off (10,000 connections x 3 subscriptions"
  echo "   held 30 s, fresh node each, alternated twice; each connection is present in a team topic)"
  for round in 1 2; do
    for state in false true; do
      stop_pids "$lockstep_pid"
      extra_env=(LOCKSTEP_PRESENCE_ENABLED=$state)
      start_lockstep
      "$bin/loadtest" idle --url "$lockstep_url" --connections 10000 --subscriptions 3 --hold 30s \
        --server-pid "$lockstep_pid" --sources 4 2>/dev/null | record >"$work/presence.idle.$state.$round"
      echo "presence $state, round $round: $(jq -r '"\(.still_open)/\(.connections) open, \(.rss_per_connection_kib) KiB RSS per connection"' "$work/presence.idle.$state.$round")"
    done
    echo "round $round: on / off = $(ratio "$(jq .rss_per_connection_kib "$work/presence.idle.true.$round")" "$(jq .rss_per_connection_kib "$work/presence.idle.false.$round")")"
  done
  stop_pids "$lockstep_pid"
  extra_env=()
  start_lockstep
  local members
  for members in 2000 10000; do
    # A fresh Redis each: the last run's members stay present for the leave delay after their
    # nodes stop, and would join the next run silently.
    start_redis
    echo "== presence: $members members join one team topic on node A (2 nodes + Redis) at $((members / 10))/s;"
    echo "   a watcher on node B; the list read whole 50 times; Redis commands/s over a 30 s hold (3 refreshes)"
    start_lockstep_pair "redis://127.0.0.1:$redis_port"
    # Above presence.max_listed (10,000) the list gives counts only: not read at 10,000.
    "$bin/loadtest" presence --url "$pair_url" --http "${api_http%%,*}" --members "$members" --rate $((members / 10)) \
      --lists $([ "$members" -le 2000 ] && echo 50 || echo 0) --hold 30s --redis "redis://127.0.0.1:$redis_port" \
      --server-pid "${pair_pids[0]}" 2>"$work/presence.$members.err" | record >"$work/presence.$members" \
      || { echo "loadtest presence failed:" >&2; tail -5 "$work/presence.$members.err" >&2; }
    jq -r '"\(.joined)/\(.members) joins seen on node B: p50 \(.join_latency.p50_ms) ms, p99 \(.join_latency.p99_ms) ms; list p50 \(.list_latency.p50_ms) ms, p99 \(.list_latency.p99_ms) ms (correct: \(.list_correct)); Redis \(.redis_commands_per_sec|floor) commands/s (\(.redis_scripts_per_sec*100|floor/100) script calls/s) held; node A \(.rss_per_member_kib) KiB RSS per member"' "$work/presence.$members"
    stop_pids "${pair_pids[@]}" "$redis_pid"
  done
}

# The control API (DESIGN §15). What the revocation check (one Redis read on every CONNECT and
# every SUBSCRIBE) costs a connection's setup, against the commit before it (BASELINE, default
# f75c5fa), both on one node through Redis, alternating twice; then how fast disconnect and
# unsubscribe reach a user's connections on two other nodes of three.
run_control() {
  local rev=${BASELINE:-f75c5fa} tree="$work/baseline" round name url b c sum count
  git worktree add -q --detach "$tree" "$rev"
  (cd "$tree" && cargo build --release --locked -q -p lockstep)
  cp "$bin/lockstep" "$work/lockstep-baseline"
  git worktree remove --force "$tree"
  cargo build --release --locked -q -p lockstep -p loadtest
  stop_pids "$ceiling_pid" "$lockstep_pid"
  start_redis
  echo "== control: 10,000 x (TCP + upgrade + CONNECT + SUBSCRIBE with receipt), 64 at a time, 1 node + Redis;"
  echo "   $(git rev-parse --short "$rev") (baseline: no revocation check) against this tree, alternating twice"
  for round in 1 2; do
    for name in baseline current; do
      lockstep_bin=$([ $name = baseline ] && echo "$work/lockstep-baseline" || echo "$bin/lockstep")
      start_api_nodes 1 "" "redis://127.0.0.1:$redis_port"
      url="ws://${api_http#http://}/ws"
      "$bin/loadtest" connect --target lockstep --url "$url" --connections 10000 --concurrency 64 --sources 4 2>/dev/null \
        | record >"$work/control.$name.$round"
      [ $name = current ] && curl -s "$api_http/metrics" >"$work/control.metrics.$round"
      stop_pids "${api_pids[@]}"
      echo "round $round $name: $(jq -r '"\(.connections_per_sec) connections/s (\(.failed) failed), setup p50 \(.setup_latency.p50_ms) ms, p99 \(.setup_latency.p99_ms) ms"' "$work/control.$name.$round")"
    done
  done
  unset lockstep_bin
  for field in connections_per_sec setup_latency.p50_ms setup_latency.p99_ms; do
    b=$(jq -s "map(.$field) | add / length * 100 | round / 100" "$work"/control.baseline.*)
    c=$(jq -s "map(.$field) | add / length * 100 | round / 100" "$work"/control.current.*)
    echo "$field, current / baseline = $(ratio "$c" "$b") (means of both rounds: $c vs $b)"
  done
  sum=$(cat "$work"/control.metrics.* | awk '/^lockstep_revocation_check_seconds_sum/ {s += $2} END {print s}')
  count=$(cat "$work"/control.metrics.* | awk '/^lockstep_revocation_check_seconds_count/ {s += $2} END {print s}')
  echo "revocation check (Redis HGETALL): $count checks, mean $(python3 -c "import sys; print(round(float(sys.argv[1]) / float(sys.argv[2]) * 1e6))" "$sum" "$count") µs"
  echo "== control: 3 nodes + Redis; 200 users each on nodes 1 and 2 (team + item subscriptions), the call on node 3, 8 users at a time"
  start_api_nodes 3 "" "redis://127.0.0.1:$redis_port"
  local hosts
  IFS=, read -r -a hosts <<<"$api_http"
  "$bin/loadtest" control --url "ws://${hosts[0]#http://}/ws,ws://${hosts[1]#http://}/ws" --http "${hosts[2]}" \
    --users 200 --concurrency 8 2>/dev/null | record >"$work/control.latency"
  jq -r '"disconnect (both connections closed 4011): p50 \(.disconnect.p50_ms) ms, p99 \(.disconnect.p99_ms) ms, max \(.disconnect.max_ms) ms; unsubscribe (4 subscriptions ended): p50 \(.unsubscribe.p50_ms) ms, p99 \(.unsubscribe.p99_ms) ms, max \(.unsubscribe.max_ms) ms; HTTP answer p99 \(.call_answer.p99_ms) ms (\(.calls) calls)"' "$work/control.latency"
  stop_pids "${api_pids[@]}" "$redis_pid"
}

# Webhooks (DESIGN §15): 5,000 item topics occupied (50 per connection, 16 connections at a
# time), each a `topic.occupied` the load generator's own receiver must get; its reference is
# the same receiver fed sequential signed POSTs by the load generator itself. Then a backlog of
# 5,000 more queued while the receiver answers 503, drained once it answers 200. Default
# batching (up to 100 events per delivery) on the embedded SQLite queue and on PostgreSQL.
run_webhooks() {
  local port hook_secret store
  stop_pids "$ceiling_pid" "$lockstep_pid"
  start_postgres
  for store in sqlite postgres; do
    port=$(free_port)
    hook_secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    extra_env=(LOCKSTEP_PRESENCE_ENABLED=true LOCKSTEP_WEBHOOKS_URLS="http://127.0.0.1:$port/hook"
      LOCKSTEP_WEBHOOKS_SECRET="$hook_secret" LOCKSTEP_WEBHOOKS_EVENTS=topic.occupied LOCKSTEP_HUB_MAX_SUBSCRIPTIONS=64)
    start_api_nodes 1 "$([ $store = postgres ] && echo "$pg_url")" ""
    echo "== webhooks ($store queue): 5,000 topic.occupied to a local receiver, 1 node"
    LOADTEST_WEBHOOK_SECRET=$hook_secret "$bin/loadtest" webhooks --url "ws://${api_http#http://}/ws" --http "$api_http" \
      --listen "127.0.0.1:$port" --topics 5000 --per-connection 50 --concurrency 16 --reference 2000 \
      2>"$work/webhooks.$store.err" | record >"$work/webhooks.$store" \
      || { echo "loadtest webhooks failed:" >&2; tail -5 "$work/webhooks.$store.err" >&2; }
    jq -r '"\(.events) events in \(.deliveries) deliveries (\(.duplicates) duplicates): \(.events_per_sec) events/s, \(.deliveries_per_sec) deliveries/s; lag p50 \(.lag.p50_ms) ms, p99 \(.lag.p99_ms) ms, max \(.lag.max_ms) ms; reference \(.reference_posts_per_sec) POSTs/s (p99 \(.reference_latency.p99_ms) ms); deliveries / reference POSTs = \(.deliveries_vs_reference), events / reference POSTs = \(.events_per_sec / .reference_posts_per_sec * 100 | round / 100); backlog of \(.backlog_events) (receiver down, then up): drained in \(.backlog_drain_ms) ms, \(.backlog_events_per_sec) events/s in \(.backlog_deliveries) deliveries (\(.backlog_deliveries_per_sec)/s)"' "$work/webhooks.$store"
    curl -s "$api_http/metrics" | grep -E '^lockstep_webhook_(deliveries_total|delivery_lag_seconds_(sum|count))' || true
    stop_pids "${api_pids[@]}"
    extra_env=()
  done
  "${pg_stop[@]}" >/dev/null; pg_stop=()
}

case "$scenario" in
  webhooks) run_webhooks ;;
  presence) run_presence ;;
  control) run_control ;;
  fanout) run_fanout ;;
  fanout10) run_fanout10 ;;
  idle) run_idle ;;
  connect) run_connect ;;
  redis) run_redis ;;
  locks) run_locks ;;
  presign) run_presign ;;
  all) run_fanout; run_fanout10; run_connect; run_redis; run_locks; run_presign; run_idle ;;
  ab) run_ab ;;
  history) run_history ;;
  keyed) run_keyed ;;
  resume) run_resume ;;
  retained) run_retained ;;
  *) echo "unknown scenario $scenario" >&2; exit 64 ;;
esac
