#!/usr/bin/env bash
# shellcheck disable=SC2317,SC2329 # the start_* functions are called as "start_$name" (shellcheck < 0.10 reports that as SC2317)
# Starts the local services the tests need, if they are down, and waits until
# each accepts TCP connections on 127.0.0.1. Services already up are left
# alone (never stopped or restarted), so running this again is harmless.
#
# Usage: scripts/services.sh [all | SERVICE...]
#   SERVICE is one of: postgres nats mariadb redis rabbitmq mosquitto kafka
#   default: postgres nats
#
# kafka is tansu, a Kafka-protocol broker with in-memory storage, run from
# ${PROCLAIM_TOOLS_DIR:-$HOME/.cache/proclaim/tools}/bin/tansu; when that
# binary is missing it is built there first with `cargo install` (about 20
# minutes, once). Its log is <tools dir>/log/tansu.log.
#
# Prints one line per service, "<name>: up" (was already running) or
# "<name>: started"; exits non-zero if any service could not be brought up.
# SERVICES_WAIT_SECS (default 60) bounds the wait for each service.
set -euo pipefail

ALL=(postgres nats mariadb redis rabbitmq mosquitto kafka)
DEFAULT=(postgres nats)
declare -A PORT=([postgres]=5432 [nats]=4222 [mariadb]=3306 [redis]=6379 [rabbitmq]=5672 [mosquitto]=1883 [kafka]=9092)
# The programs each start command needs (checked before running it).
declare -A NEEDS=(
	[postgres]="pg_ctlcluster psql"
	[nats]="start-stop-daemon /usr/sbin/nats-server"
	[mariadb]="start-stop-daemon /usr/sbin/mariadbd"
	[redis]="redis-server"
	[rabbitmq]="rabbitmq-server"
	[mosquitto]="mosquitto"
	[kafka]="setsid nohup"
)
WAIT_SECS=${SERVICES_WAIT_SECS:-60}
TOOLS_DIR=${PROCLAIM_TOOLS_DIR:-$HOME/.cache/proclaim/tools}
TANSU_VERSION=0.6.0

start_postgres() {
	[[ -d /etc/postgresql ]] || { echo "postgres: /etc/postgresql does not exist (no cluster configured)" >&2; return 1; }
	# shellcheck disable=SC2046 # the version directory name, unquoted on purpose
	pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start
}
start_nats() {
	start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
}
start_rabbitmq() { rabbitmq-server -detached; }
start_redis() {
	redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
}
start_mosquitto() { mosquitto -d -c /etc/mosquitto/mosquitto.conf; }
start_mariadb() { start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd; }
start_kafka() {
	local bin=$TOOLS_DIR/bin/tansu log_dir=$TOOLS_DIR/log
	mkdir -p "$log_dir"
	if [[ ! -x $bin ]]; then
		command -v cargo >/dev/null 2>&1 || { echo "kafka: $bin is missing and cargo is not installed to build it" >&2; return 1; }
		echo "kafka: building tansu $TANSU_VERSION into $TOOLS_DIR (takes about 20 minutes, once; log: $log_dir/tansu-build.log)"
		if ! cargo install --locked --root "$TOOLS_DIR" "tansu@$TANSU_VERSION" --no-default-features --features dynostore >"$log_dir/tansu-build.log" 2>&1; then
			tail -n 20 "$log_dir/tansu-build.log"
			echo "kafka: building tansu failed (see $log_dir/tansu-build.log)"
			return 1
		fi
	fi
	setsid nohup "$bin" broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 \
		--storage-engine memory://tansu/ >>"$log_dir/tansu.log" 2>&1 </dev/null &
}

port_open() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# Polls `port_open` until it succeeds or WAIT_SECS have passed.
wait_port() {
	local port=$1 deadline=$((SECONDS + WAIT_SECS + 1))
	until port_open "$port"; do
		((SECONDS < deadline)) || return 1
		sleep 0.5
	done
}

# Prints the first program of $1 that is not installed, if any.
missing_program() {
	local prog
	for prog in ${NEEDS[$1]}; do
		if [[ $prog == */* ]]; then
			[[ -x $prog ]] || { echo "$prog"; return; }
		else
			command -v "$prog" >/dev/null 2>&1 || { echo "$prog"; return; }
		fi
	done
}

# Makes sure the database `test` exists (retrying while PostgreSQL finishes
# starting up).
ensure_test_db() {
	local deadline=$((SECONDS + WAIT_SECS + 1)) exists
	until exists=$(psql -w -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" 2>/dev/null); do
		((SECONDS < deadline)) || { echo "postgres: cannot query pg_database as user postgres on 127.0.0.1:5432" >&2; return 1; }
		sleep 0.5
	done
	[[ $exists == 1 ]] && return 0
	# Another run may create it concurrently: check again if CREATE fails.
	if psql -w -h 127.0.0.1 -U postgres -qc 'CREATE DATABASE test' >/dev/null 2>&1 ||
		[[ $(psql -w -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'") == 1 ]]; then
		echo "postgres: created database test"
	else
		echo "postgres: could not create database test" >&2
		return 1
	fi
}

usage() {
	echo "usage: $0 [all | SERVICE...]   (SERVICE: ${ALL[*]}; default: ${DEFAULT[*]})" >&2
	exit 2
}

case "${1:-}" in
'') services=("${DEFAULT[@]}") ;;
all) services=("${ALL[@]}") ;;
-h | --help) usage ;;
*) services=("$@") ;;
esac
for s in "${services[@]}"; do
	[[ -n ${PORT[$s]:-} ]] || { echo "unknown service: $s" >&2; usage; }
done

failed=0
declare -A state
# Start everything that is down first, then wait for all of them together.
for s in "${services[@]}"; do
	if port_open "${PORT[$s]}"; then
		state[$s]=up
		continue
	fi
	prog=$(missing_program "$s")
	if [[ -n $prog ]]; then
		echo "$s: cannot start: program '$prog' is not installed" >&2
		state[$s]=failed
		failed=1
		continue
	fi
	# Start commands' own output goes to stderr; stdout has one line per service.
	if "start_$s" >&2; then
		state[$s]=starting
	else
		echo "$s: start command failed (exit $?)" >&2
		state[$s]=failed
		failed=1
	fi
done

for s in "${services[@]}"; do
	case ${state[$s]} in
	up) echo "$s: up" ;;
	starting)
		if wait_port "${PORT[$s]}"; then
			echo "$s: started"
		else
			echo "$s: not accepting connections on 127.0.0.1:${PORT[$s]} after ${WAIT_SECS}s" >&2
			failed=1
			continue
		fi
		;;
	*) continue ;;
	esac
	if [[ $s == postgres ]]; then
		if [[ -z $(missing_program postgres) ]]; then
			ensure_test_db || failed=1
		else
			echo "postgres: cannot check database test: program 'psql' is not installed" >&2
			failed=1
		fi
	fi
done
exit "$failed"
