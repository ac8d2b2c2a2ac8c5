# Helpers shared by deploy/local/*.sh. Sourced, not run.
# shellcheck shell=bash

# Where running services record themselves (kafka.env, postgres.env).
# shellcheck disable=SC2034 # used by the scripts that source this file
RUN_DIR="${TALLY_RUN_DIR:-/tmp/tally-run}"

SELF="$(basename "$0")"

note() { echo "$SELF: $*" >&2; }
die() {
  echo "$SELF: error: $*" >&2
  exit 1
}

# Prints a TCP port on 127.0.0.1 that nothing uses right now. Picks from
# 20000-31999, below Linux's ephemeral range, so outgoing connections don't
# grab it in the meantime. Ports given as arguments are skipped.
free_port() {
  local p _
  for _ in $(seq 1 500); do
    p=$((20000 + RANDOM % 12000))
    [[ " $* " == *" $p "* ]] && continue
    if [[ -z "$(ss -Hant "sport = :$p")" ]]; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

# True while PID is a live (not zombie) process.
pid_alive() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [[ -n $stat && ${stat:0:1} != Z && ${stat:0:1} != X ]]
}

# Stops PID: TERM, then KILL after GRACE seconds. Fails if it survives.
stop_pid() {
  local pid=$1 grace=$2 i
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 5; i++)); do
    pid_alive "$pid" || return 0
    sleep 0.2
  done
  note "pid $pid ignored TERM for ${grace}s; sending KILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 25; i++)); do
    pid_alive "$pid" || return 0
    sleep 0.2
  done
  return 1
}

# Prints the value of KEY in an env file written by these scripts.
env_get() {
  local file=$1 key=$2
  sed -n "s/^${key}=//p" "$file" 2>/dev/null | tail -n 1
}

# Prints the number of TCP sockets listening on PORT (0 when free).
listeners_on() {
  ss -Hltn "sport = :$1" | wc -l
}

# Debian packages the Rust build needs: rdkafka builds librdkafka with cmake and a
# C compiler against the OpenSSL, SASL, curl, zlib and zstd headers.
BUILD_PKGS=(libssl-dev libsasl2-dev libcurl4-openssl-dev zlib1g-dev libzstd-dev pkg-config cmake build-essential)

# Appends to the array named by $1 every package of BUILD_PKGS not installed.
missing_build_pkgs() {
  local -n into=$1
  local p
  for p in "${BUILD_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
      into+=("$p")
  done
}

# Installs the Debian packages given (as root, else through `sudo -n`); does
# nothing, and runs no apt at all, when none are given.
apt_install() {
  (($# > 0)) || return 0
  echo "installing: $*"
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "need root (or sudo) to install: $*"
    sudo=(sudo -n)
  fi
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends "$@" >/dev/null
}
