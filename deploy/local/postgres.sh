#!/usr/bin/env bash
# Throwaway PostgreSQL on 127.0.0.1 for tests.
#
#   postgres.sh start   initdb a fresh cluster in a temp dir, start it on a free
#                       port, create database tally_test, record
#                       TALLY_TEST_PG_URL in $TALLY_RUN_DIR/postgres.env
#   postgres.sh stop    stop it and delete the dir
#   postgres.sh pause   freeze the server (SIGSTOP to the postmaster and every
#                       process it forked): connections hang, new ones time
#                       out, as with a stalled host. Outage tests use it.
#   postgres.sh resume  SIGCONT the same processes; the server goes on as before
#
# Env: TALLY_RUN_DIR (default /tmp/tally-run).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"

ENV_FILE="$RUN_DIR/postgres.env"
DB=tally_test
READY_TIMEOUT=30
BIN=""

# Prints the newest /usr/lib/postgresql/<ver>/bin that has the server tools.
find_bindir() {
  local d
  while read -r d; do
    if [[ -x $d/initdb && -x $d/pg_ctl && -x $d/postgres ]]; then
      echo "$d"
      return 0
    fi
  done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -rV)
  return 1
}

# Installs Debian's server package when no initdb exists. The cluster the
# package may create and start (port 5432) is not ours; we ignore it.
ensure_postgres() {
  if BIN="$(find_bindir)"; then return 0; fi
  [[ $(id -u) -eq 0 ]] || die "no initdb under /usr/lib/postgresql/*/bin;" \
    "install Debian's postgresql package (needs root)"
  note "no PostgreSQL server found; installing Debian's postgresql package"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  BIN="$(find_bindir)" || die "postgresql installed but no initdb under /usr/lib/postgresql/*/bin"
}

# initdb, pg_ctl and postgres refuse to run as root: use the postgres user then.
as_pg() {
  if [[ $(id -u) -eq 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

write_env() {
  local dir=$1 port=$2
  mkdir -p "$RUN_DIR"
  cat >"$ENV_FILE.tmp" <<EOF
TALLY_TEST_PG_URL=postgres://postgres@127.0.0.1:$port/$DB
TALLY_PG_PORT=$port
TALLY_PG_DIR=$dir
EOF
  mv "$ENV_FILE.tmp" "$ENV_FILE"
}

# Prints the tail of the server log of DIR to stderr.
show_log() {
  local dir=$1 f
  for f in "$dir/initdb.log" "$dir/postgres.log"; do
    if [[ -s $f ]]; then
      echo "---- last 40 lines of $f" >&2
      tail -n 40 "$f" >&2
    fi
  done
}

start() {
  ensure_postgres
  if [[ -f $ENV_FILE ]]; then
    note "a server from an earlier start is recorded in $ENV_FILE; stopping it first"
    stop
  fi
  if [[ $(id -u) -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
    note "creating system user postgres"
    useradd --system --user-group --no-create-home --home-dir /var/lib/postgresql \
      --shell /usr/sbin/nologin postgres
  fi

  local port dir i t0=$SECONDS
  # shellcheck disable=SC2119 # no ports to skip
  port="$(free_port)" || die "no free loopback port found"
  # Under /tmp (not $TMPDIR): the postgres user must be able to reach it.
  dir="$(mktemp -d /tmp/tally-pg.XXXXXX)"
  if [[ $(id -u) -eq 0 ]]; then chown postgres:postgres "$dir"; fi
  write_env "$dir" "$port"

  if ! as_pg "$BIN/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C \
    --no-sync >"$dir/initdb.log" 2>&1; then
    show_log "$dir"
    stop
    die "initdb failed"
  fi
  # Local testing only: trust auth (initdb -A trust), loopback, no durability.
  cat >>"$dir/data/postgresql.conf" <<EOF

# deploy/local/postgres.sh: throwaway test server
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
EOF

  if ! as_pg "$BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t "$READY_TIMEOUT" \
    start >"$dir/pg_ctl.log" 2>&1; then
    cat "$dir/pg_ctl.log" >&2
    show_log "$dir"
    stop
    die "PostgreSQL did not start"
  fi
  for ((i = 0; ; i++)); do
    "$BIN/pg_isready" -q -h 127.0.0.1 -p "$port" -d postgres -t 1 && break
    if ((i >= READY_TIMEOUT * 2)); then
      show_log "$dir"
      stop
      die "pg_isready: not ready after ${READY_TIMEOUT}s"
    fi
    sleep 0.5
  done
  if ! "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres \
    -c "CREATE DATABASE $DB" >&2; then
    show_log "$dir"
    stop
    die "could not create database $DB"
  fi
  note "PostgreSQL ready at 127.0.0.1:$port (db $DB) after $((SECONDS - t0))s; env in $ENV_FILE"
  echo "postgres://postgres@127.0.0.1:$port/$DB"
}

stop() {
  if [[ ! -f $ENV_FILE ]]; then
    note "no server recorded in $ENV_FILE; nothing to stop"
    return 0
  fi
  local dir pid
  dir="$(env_get "$ENV_FILE" TALLY_PG_DIR)"
  [[ -n $BIN ]] || BIN="$(find_bindir)" || true
  if [[ -n $dir && -f $dir/data/postmaster.pid ]]; then
    pid="$(head -n 1 "$dir/data/postmaster.pid")"
    if [[ -n $BIN ]] &&
      as_pg "$BIN/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >/dev/null 2>&1; then
      note "PostgreSQL (pid $pid) stopped"
    elif [[ -n $pid ]] && pid_alive "$pid"; then
      stop_pid "$pid" 10 || die "postmaster pid $pid would not die"
      note "PostgreSQL (pid $pid) killed"
    fi
  fi
  # Guard the rm: only ever delete a dir that start created.
  if [[ $dir == /tmp/tally-pg.* && -d $dir ]]; then
    rm -rf "$dir"
  fi
  rm -f "$ENV_FILE"
}

# Prints the postmaster's pid and the pids of the processes it forked.
server_pids() {
  [[ -f $ENV_FILE ]] || die "no server recorded in $ENV_FILE"
  local dir pid
  dir="$(env_get "$ENV_FILE" TALLY_PG_DIR)"
  [[ -n $dir && -f $dir/data/postmaster.pid ]] || die "no postmaster.pid under $dir/data"
  pid="$(head -n 1 "$dir/data/postmaster.pid")"
  pid_alive "$pid" || die "postmaster pid $pid is not running"
  echo "$pid"
  pgrep -P "$pid" || true
}

# Sends SIGNAL to the server's processes; the postmaster first on STOP (so it
# forks no new backend meanwhile), last on CONT.
signal_server() {
  local signal=$1 pids
  mapfile -t pids < <(server_pids)
  if [[ $signal == CONT ]]; then
    kill -CONT "${pids[@]:1}" 2>/dev/null || true
    kill -CONT "${pids[0]}"
  else
    kill -STOP "${pids[0]}"
    # Children forked between the listing and the STOP are caught by a second pass.
    mapfile -t pids < <(server_pids)
    kill -STOP "${pids[@]}" 2>/dev/null || true
  fi
  note "PostgreSQL: SIG$signal sent to ${#pids[@]} processes"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
pause) signal_server STOP ;;
resume) signal_server CONT ;;
*)
  echo "usage: $SELF start|stop|pause|resume" >&2
  exit 2
  ;;
esac
