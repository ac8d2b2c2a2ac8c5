#!/usr/bin/env bash
# The project's one test command (CI runs it through .ci/run).
#
# Installs missing Debian build packages, starts a real single-node Kafka
# broker and a PostgreSQL server on 127.0.0.1, then runs (each step failing fast,
# the test step's lanes each to their end):
#   promtool check/test of the alert rules, docker-compose config of the stack,
#   cargo fmt --check, the test build, then every test in three lanes: clippy
#   -D warnings followed by most tests; beside it the kill soak; and doctests,
#   benches in test mode, the group and EOS suites
# Both services are stopped on exit, whatever happens.
#
# Env:
#   TALLY_SKIP_LINT=1     skip fmt and clippy (local iteration; ignored when CI is set)
#   TALLY_TEST_THREADS=N  export RUST_TEST_THREADS=N for cargo test
#   TALLY_RUN_DIR         where services record themselves (default: a fresh temp dir)
#   TALLY_CACHE_DIR       Kafka jar cache (default ~/.cache/tally), see kafka.sh
# Exported to the tests: TALLY_TEST_BOOTSTRAP, TALLY_TEST_PG_URL, and the SASL_SSL
# listener's TALLY_TEST_SASL_BOOTSTRAP, _USER, _PASSWORD_FILE, _CA.
set -euo pipefail

cd "$(dirname "$0")/../.."
LOCAL=deploy/local
T0=$SECONDS
STEPS=()     # finished steps, "name seconds result"
CURRENT=""   # the step running now
CURRENT_T0=0
OWN_RUN_DIR=0

# die, BUILD_PKGS (the Rust build's Debian packages), missing_build_pkgs, apt_install.
# shellcheck source=deploy/local/lib.sh
source "$LOCAL/lib.sh"

# Runs one named step with a timestamped header; records its duration.
step() {
  local name=$1
  shift
  CURRENT=$name
  CURRENT_T0=$SECONDS
  echo
  echo "==> $name (elapsed $((SECONDS - T0))s)"
  "$@"
  STEPS+=("$name $((SECONDS - CURRENT_T0)) ok")
  CURRENT=""
}

skip_step() {
  echo
  echo "==> $1 (elapsed $((SECONDS - T0))s): skipped ($2)"
  STEPS+=("$1 0 skipped")
}

summary() {
  local s name secs result
  echo
  echo "==> summary (total $((SECONDS - T0))s)"
  for s in "${STEPS[@]}"; do
    read -r name secs result <<<"$s"
    printf '    %-16s %6ss  %s\n' "$name" "$secs" "$result"
  done
}

on_exit() {
  local rc=$?
  set +e
  if [[ -n $CURRENT ]]; then
    STEPS+=("$CURRENT $((SECONDS - CURRENT_T0)) FAILED(exit=$rc)")
  fi
  if ((rc != 0)) && [[ -f $TALLY_RUN_DIR/kafka.env ]]; then
    echo
    echo "==> broker log after failure"
    "$LOCAL/kafka.sh" logs
  fi
  echo
  echo "==> stopping services"
  "$LOCAL/kafka.sh" stop
  "$LOCAL/postgres.sh" stop
  if ((OWN_RUN_DIR)); then rm -rf "$TALLY_RUN_DIR"; fi
  summary
  exit "$rc"
}

# Installs the packages (from BUILD_PKGS and the commands the harness needs:
# Java 17 + Maven for Kafka, ss for free ports, promtool) that are missing; no
# apt at all when everything is there.
install_deps() {
  local missing=()
  missing_build_pkgs missing
  if ! command -v java >/dev/null || ! command -v javac >/dev/null; then
    missing+=(openjdk-17-jdk-headless)
  fi
  command -v mvn >/dev/null || missing+=(maven)
  command -v ss >/dev/null || missing+=(iproute2)
  # promtool, from the same Prometheus release as Debian 12's server (2.42).
  command -v promtool >/dev/null || missing+=(prometheus)
  if ((${#missing[@]} == 0)); then
    echo "all Debian packages present"
    return 0
  fi
  apt_install "${missing[@]}"
}

# docker-compose (Debian's, 1.29) checks deploy/compose; optional: when the package
# cannot be installed the compose step is skipped with a loud warning.
install_compose() {
  command -v docker-compose >/dev/null && return 0
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then sudo=(sudo -n); fi
  if ! { "${sudo[@]}" apt-get update -qq &&
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends docker-compose >/dev/null; }; then
    echo "test.sh: WARNING: the docker-compose package could not be installed;" >&2
    echo "test.sh: WARNING: deploy/compose/docker-compose.yml is NOT checked" >&2
  fi
}

# promtool: the rules load, and every alert's unit tests pass.
check_alert_rules() {
  promtool check rules deploy/prometheus/tally-alerts.yml
  promtool test rules deploy/prometheus/tally-alerts.test.yml
}

# The test executables cargo built, one "executable<TAB>manifest path" per line.
test_binaries() {
  cargo test --workspace --locked --no-run --message-format=json 2>/dev/null |
    grep '"executable":"[^"]*/deps/' |
    sed -n 's/.*"manifest_path":"\([^"]*\)".*"executable":"\([^"]*\)".*/\2\t\1/p'
}

# Runs the test executables of one lane in turn, each from its package's directory
# (as cargo does); prints a line per failure and returns non-zero if any failed.
run_lane() {
  local exe manifest failed=0
  while IFS=$'\t' read -r exe manifest; do
    echo "     Running $(basename "$exe")"
    if ! (cd "$(dirname "$manifest")" && "$exe"); then
      echo "test.sh: FAILED: $(basename "$exe")"
      failed=1
    fi
  done
  return "$failed"
}

# Every test, in three lanes sharing the broker and the database (the tests use
# their own topics, groups and databases; they mostly wait on the broker, commit
# intervals and restarts, so the 2 cores stay more than half idle):
#   - clippy (when linting), then everything else, printed as it runs;
#   - the aggregator's kill soak, from the start;
#   - started once clippy is done: the doctests and criterion's test mode (every
#     benchmark runs once, as a smoke test, reusing the test build; real figures come
#     from `cargo bench`, see README), then the group and exactly-once suites.
# So clippy competes only with the kill soak, which asserts on offsets and sums; the
# tests with wall-clock bounds (liveness, shutdown within 5 s) start after it. The
# side lanes are printed whole at the end. A failure in any lane, clippy included,
# fails the run; every lane still runs to its end.
run_tests() {
  local all rc=0 lane t0
  local -a names=(aggregator_kill "doctests, benches, aggregator_group, aggregator_eos")
  local -a pids=()
  local soak='/aggregator_kill-[0-9a-f]+'$'\t'
  local group='/aggregator_(group|eos)-[0-9a-f]+'$'\t'
  all="$(test_binaries)"
  [[ -n $all ]] || die "cargo listed no test executables"
  grep -E "$soak" <<<"$all" | run_lane >"$TALLY_RUN_DIR/lane-0.log" 2>&1 &
  pids+=($!)
  if ((lint)); then
    echo "==> clippy (elapsed $((SECONDS - T0))s, beside the kill soak)"
    t0=$SECONDS
    if cargo clippy --workspace --all-targets --locked -- -D warnings; then
      STEPS+=("clippy $((SECONDS - t0)) ok")
    else
      STEPS+=("clippy $((SECONDS - t0)) FAILED")
      echo "test.sh: FAILED: clippy"
      rc=1
    fi
  fi
  (
    failed=0
    cargo test --workspace --locked --doc || failed=1
    cargo test --workspace --locked --benches || failed=1
    grep -E "$group" <<<"$all" | run_lane || failed=1
    exit "$failed"
  ) >"$TALLY_RUN_DIR/lane-1.log" 2>&1 &
  pids+=($!)
  grep -vE "$soak|$group" <<<"$all" | run_lane || rc=1
  for lane in 0 1; do
    wait "${pids[$lane]}" || rc=1
    echo
    echo "==> lane: ${names[$lane]} (ran beside the tests above)"
    cat "$TALLY_RUN_DIR/lane-$lane.log"
  done
  return "$rc"
}

# Prints KEY's value from an env file written by kafka.sh / postgres.sh.
env_value() {
  sed -n "s/^$2=//p" "$1" | tail -n 1
}

command -v cargo >/dev/null || die "cargo not found (install Rust with rustup)"
command -v rustfmt >/dev/null || die "rustfmt not found (rustup component add rustfmt)"
command -v cargo-clippy >/dev/null || die "clippy not found (rustup component add clippy)"

if [[ -z ${TALLY_RUN_DIR:-} ]]; then
  # A private run dir per invocation: parallel runs never share services.
  TALLY_RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/tally-run.XXXXXX")"
  OWN_RUN_DIR=1
fi
export TALLY_RUN_DIR
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step deps install_deps
step alert-rules check_alert_rules
install_compose
if command -v docker-compose >/dev/null; then
  step compose docker-compose -f deploy/compose/docker-compose.yml config -q
else
  skip_step compose "docker-compose package unavailable: COMPOSE FILE NOT CHECKED"
fi
step kafka-fetch "$LOCAL/kafka.sh" fetch
step kafka-start "$LOCAL/kafka.sh" start
step pg-start "$LOCAL/postgres.sh" start

TALLY_TEST_BOOTSTRAP="$(env_value "$TALLY_RUN_DIR/kafka.env" TALLY_TEST_BOOTSTRAP)"
TALLY_TEST_PG_URL="$(env_value "$TALLY_RUN_DIR/postgres.env" TALLY_TEST_PG_URL)"
[[ -n $TALLY_TEST_BOOTSTRAP && -n $TALLY_TEST_PG_URL ]] ||
  die "the services did not record their addresses"
export TALLY_TEST_BOOTSTRAP TALLY_TEST_PG_URL
# The broker's SASL_SSL listener (tests/kafka_sasl.rs).
for key in TALLY_TEST_SASL_BOOTSTRAP TALLY_TEST_SASL_USER TALLY_TEST_SASL_PASSWORD_FILE \
  TALLY_TEST_SASL_CA; do
  value="$(env_value "$TALLY_RUN_DIR/kafka.env" "$key")"
  [[ -n $value ]] || die "kafka.sh did not record $key"
  export "$key=$value"
done
echo
echo "TALLY_TEST_BOOTSTRAP=$TALLY_TEST_BOOTSTRAP"
echo "TALLY_TEST_PG_URL=$TALLY_TEST_PG_URL"
if [[ -n ${TALLY_TEST_THREADS:-} ]]; then
  export RUST_TEST_THREADS=$TALLY_TEST_THREADS
  echo "RUST_TEST_THREADS=$RUST_TEST_THREADS"
fi

# The test build before clippy: clippy then reuses the built dependencies' build
# scripts and proc macros and checks the rest (100-150 s on the 2-core machine);
# clippy first, from a cold target, took 370 s and the build after it 386 s. Clippy
# runs in the test step, beside the first tests (run_tests).
lint=1
if [[ ${TALLY_SKIP_LINT:-} == 1 && -z ${CI:-} ]]; then lint=0; fi
if ((lint)); then step fmt cargo fmt --all -- --check; else skip_step fmt "TALLY_SKIP_LINT=1"; fi
step build cargo test --workspace --locked --no-run --all-targets
if ((!lint)); then skip_step clippy "TALLY_SKIP_LINT=1"; fi
step test run_tests
