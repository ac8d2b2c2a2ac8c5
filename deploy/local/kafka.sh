#!/usr/bin/env bash
# Single-node Kafka (KRaft: broker+controller in one JVM) on 127.0.0.1 for tests.
#
#   kafka.sh fetch   resolve the broker jars from Maven Central into the cache
#   kafka.sh start   run a fresh broker, wait until it is really ready, record
#                    TALLY_TEST_BOOTSTRAP in $TALLY_RUN_DIR/kafka.env
#                    (and the SASL_SSL listener's TALLY_TEST_SASL_* entries)
#   kafka.sh stop    stop the broker and delete its data
#   kafka.sh logs    tail of the broker log
#
# Env: TALLY_CACHE_DIR (default ~/.cache/tally), TALLY_RUN_DIR (default
# /tmp/tally-run), TALLY_KAFKA_READY_TIMEOUT (s, default 60), TALLY_LOG_LINES.
#
# Listeners: PLAINTEXT (TALLY_TEST_BOOTSTRAP) for most tests, and SASL_SSL with
# SCRAM-SHA-512 (TALLY_TEST_SASL_BOOTSTRAP) on a second free port, the way managed
# clusters are secured. Its TLS material is made here with openssl: a throwaway CA
# (TALLY_TEST_SASL_CA, the PEM file clients set as `ssl.ca.location`) and a broker
# certificate for 127.0.0.1 and localhost, kept in $TALLY_RUN_DIR/kafka-tls and
# reused while it is valid for another day. The SCRAM user
# (TALLY_TEST_SASL_USER) is created by Kafka's own storage tool while formatting
# (`--add-scram`), with a fresh random password written to a file
# (TALLY_TEST_SASL_PASSWORD_FILE), as a Kubernetes Secret would be mounted.
# Controller and inter-broker traffic stay PLAINTEXT.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"

# Kafka 4.1.1: 4.x brokers need Java 17+, and this runs on our Java 17.
# Keep in sync with <kafka.version> in kafka-pom.xml (checked below).
KAFKA_VERSION=4.1.1
POM="$HERE/kafka-pom.xml"
READY_SRC="$HERE/KafkaReady.java"
LOG4J_CONF="$HERE/log4j2.xml"
CACHE_DIR="${TALLY_CACHE_DIR:-$HOME/.cache/tally}"
KAFKA_HOME="$CACHE_DIR/kafka-$KAFKA_VERSION"
LIBS="$KAFKA_HOME/libs"
MARKER="$KAFKA_HOME/.complete"
ENV_FILE="$RUN_DIR/kafka.env"
LAST_LOG="$RUN_DIR/kafka-last.log"
READY_TIMEOUT="${TALLY_KAFKA_READY_TIMEOUT:-60}"
PROBE_TIMEOUT=60 # bound on the first Maven contact: no network fails fast
COPY_TIMEOUT=600 # bound on downloading the jars once Maven Central answered

# JVM flags for all our Java processes: log via our log4j2 config; callers
# add -Dtally.kafka.logfile=FILE. Plain `java` calls (no wrapper function), so
# that `$!` of a backgrounded one is the JVM's own pid.
JVM_COMMON=(-Dlog4j2.configurationFile="$LOG4J_CONF" -Djava.awt.headless=true)
# Short-lived tools (format, readiness probe) start ~1 s faster with C1 only.
JVM_SHORT=(-XX:TieredStopAtLevel=1 -XX:+UseSerialGC)

ready_classes() { echo "$KAFKA_HOME/ready-$(sha256sum "$READY_SRC" | cut -c1-12)"; }

# Compiles KafkaReady.java against the cached jars (once per source version).
compile_ready() {
  local out tmp
  out="$(ready_classes)"
  [[ -f $out/KafkaReady.class ]] && return 0
  command -v javac >/dev/null || die "javac not found (need a JDK 17+)"
  tmp="$(mktemp -d "$KAFKA_HOME/.ready.XXXXXX")"
  if ! javac -nowarn -d "$tmp" -cp "$LIBS/*" "$READY_SRC"; then
    rm -rf "$tmp"
    die "could not compile $READY_SRC"
  fi
  rm -rf "$out"
  mv "$tmp" "$out"
}

fetch() {
  local pom_version
  pom_version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM")"
  [[ $pom_version == "$KAFKA_VERSION" ]] ||
    die "kafka-pom.xml pins Kafka '$pom_version' but kafka.sh expects $KAFKA_VERSION"
  command -v java >/dev/null || die "java not found (need Java 17+)"
  mkdir -p "$CACHE_DIR"
  # One fetch at a time per cache dir. Close the lock fd again, or the broker
  # (started later by this shell) would inherit it and hold the lock.
  exec 9>"$CACHE_DIR/.kafka-fetch.lock"
  flock 9
  fetch_locked
  exec 9>&-
}

fetch_locked() {
  local pom_sum tmp mvn_log
  pom_sum="$(sha256sum "$POM" | cut -d' ' -f1)"
  if [[ -f $MARKER && "$(cat "$MARKER")" == "$pom_sum" ]]; then
    note "Kafka $KAFKA_VERSION already in $LIBS"
    compile_ready
    return 0
  fi

  command -v mvn >/dev/null || die "mvn not found: install Maven (apt-get install maven)"
  note "fetching Kafka $KAFKA_VERSION jars with Maven into $LIBS"
  tmp="$(mktemp -d "$CACHE_DIR/.kafka-$KAFKA_VERSION.XXXXXX")"
  mvn_log="$tmp/mvn.log"
  local mvn=(mvn -B -q -Dstyle.color=never -f "$POM")
  # Step 1, bounded: resolve the dependency tree (poms + plugin only). This is
  # the first contact with Maven Central; without network it fails here.
  local rc=0
  timeout "$PROBE_TIMEOUT" "${mvn[@]}" dependency:tree >"$mvn_log" 2>&1 || rc=$?
  if ((rc != 0)); then
    tail -n 30 "$mvn_log" >&2 || true
    rm -rf "$tmp"
    if ((rc == 124)); then
      die "Maven got no answer within ${PROBE_TIMEOUT}s: is Maven Central reachable?" \
        "There is no other source for the Kafka $KAFKA_VERSION broker."
    fi
    die "Maven failed to resolve Kafka $KAFKA_VERSION (exit $rc, output above): it needs" \
      "Maven Central (or a ~/.m2 that already holds the jars); there is no other source."
  fi
  # Step 2: download the jars and copy them into the cache.
  if ! timeout "$COPY_TIMEOUT" "${mvn[@]}" dependency:copy-dependencies \
    -DoutputDirectory="$tmp/libs" >>"$mvn_log" 2>&1; then
    tail -n 30 "$mvn_log" >&2 || true
    rm -rf "$tmp"
    die "Maven failed to download the Kafka $KAFKA_VERSION jars (see above)"
  fi
  [[ -f $tmp/libs/kafka_2.13-$KAFKA_VERSION.jar ]] || {
    rm -rf "$tmp"
    die "Maven ran but kafka_2.13-$KAFKA_VERSION.jar is missing"
  }
  rm -rf "$KAFKA_HOME"
  mv "$tmp" "$KAFKA_HOME"
  compile_ready
  echo "$pom_sum" >"$MARKER"
  note "Kafka $KAFKA_VERSION ready in $KAFKA_HOME ($(du -sh "$KAFKA_HOME" | cut -f1))"
}

# The SCRAM user of the SASL_SSL listener.
SASL_USER=tally
TLS_DIR="$RUN_DIR/kafka-tls"
# Password of the broker's PKCS12 keystore (a throwaway file in the run dir).
KEYSTORE_PASSWORD=tally-test-keystore

# Makes the CA and the broker's certificate and keystore in $TLS_DIR unless the
# ones there are still valid for a day. openssl only; no network.
make_tls() {
  if [[ -f $TLS_DIR/broker.p12 && -f $TLS_DIR/ca.pem ]] &&
    openssl x509 -checkend 86400 -noout -in "$TLS_DIR/broker.pem" >/dev/null 2>&1; then
    return 0
  fi
  command -v openssl >/dev/null || die "openssl not found (apt-get install openssl)"
  local tmp
  mkdir -p "$RUN_DIR"
  tmp="$(mktemp -d "$RUN_DIR/.kafka-tls.XXXXXX")"
  if ! (
    set -e
    cd "$tmp"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -keyout ca.key -out ca.pem -days 30 -subj "/CN=tally test CA" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -keyout broker.key -out broker.csr -subj "/CN=127.0.0.1"
    printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" \
      "extendedKeyUsage=serverAuth" "basicConstraints=CA:FALSE" >broker.ext
    openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
      -out broker.pem -days 30 -extfile broker.ext
    openssl pkcs12 -export -in broker.pem -inkey broker.key -certfile ca.pem \
      -name broker -out broker.p12 -passout "pass:$KEYSTORE_PASSWORD"
  ) >"$tmp/openssl.log" 2>&1; then
    cat "$tmp/openssl.log" >&2
    rm -rf "$tmp"
    die "could not make the TLS certificates for the SASL_SSL listener"
  fi
  rm -rf "$TLS_DIR"
  mv "$tmp" "$TLS_DIR"
}

# Writes the broker config for data dir $1, broker port $2, controller port $3,
# SASL_SSL port $4.
write_config() {
  local dir=$1 port=$2 cport=$3 sport=$4
  cat >"$dir/server.properties" <<EOF
# Generated by deploy/local/kafka.sh: throwaway single-node KRaft broker for tests.
process.roles=broker,controller
node.id=1
# Kafka 4.x dynamic quorum; the storage is formatted with --standalone.
controller.quorum.bootstrap.servers=127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,SASL_SSL://127.0.0.1:$sport,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port,SASL_SSL://127.0.0.1:$sport
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL

# The secured listener: TLS with the script's CA, SCRAM-SHA-512 users.
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PKCS12
listener.name.sasl_ssl.ssl.keystore.location=$TLS_DIR/broker.p12
listener.name.sasl_ssl.ssl.keystore.password=$KEYSTORE_PASSWORD
listener.name.sasl_ssl.ssl.key.password=$KEYSTORE_PASSWORD
log.dirs=$dir/data

# A small box: fewer threads.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1

# Single node: every internal topic has one replica, few partitions.
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1

# Fast tests: no rebalance delay, short sessions allowed, explicit topics only.
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
auto.create.topics.enable=false
delete.topic.enable=true
log.retention.ms=-1
EOF
}

start() {
  fetch
  if [[ -f $ENV_FILE ]]; then
    note "a broker from an earlier start is recorded in $ENV_FILE; stopping it first"
    stop
  fi
  mkdir -p "$RUN_DIR"
  rm -f "$LAST_LOG"

  local port cport sport dir cluster_id pid t0 password
  t0=$SECONDS
  port="$(free_port)" || die "no free loopback port found"
  cport="$(free_port "$port")" || die "no free loopback port found"
  sport="$(free_port "$port" "$cport")" || die "no free loopback port found"
  dir="$(mktemp -d "${TMPDIR:-/tmp}/tally-kafka.XXXXXX")"
  write_env "$dir" "$port" "" "$sport"
  make_tls
  write_config "$dir" "$port" "$cport" "$sport"
  # A fresh SCRAM password per broker, in a file the way a Secret is mounted.
  password="$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')"
  (umask 077 && printf '%s\n' "$password" >"$dir/sasl-password")

  # Kafka cluster ids are 16 random bytes, URL-safe base64 without padding.
  cluster_id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | cut -c1-22)"
  while [[ $cluster_id == -* ]]; do
    cluster_id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | cut -c1-22)"
  done
  if ! java "${JVM_COMMON[@]}" "${JVM_SHORT[@]}" \
    -Dtally.kafka.logfile="$dir/format.log" -Dtally.kafka.loglevel=WARN \
    -cp "$LIBS/*" kafka.tools.StorageTool format -t "$cluster_id" \
    -c "$dir/server.properties" --standalone \
    --add-scram "SCRAM-SHA-512=[name=$SASL_USER,password=$password]" \
    >"$dir/format.out" 2>&1; then
    cat "$dir/format.out" >&2
    stop
    die "formatting the broker storage failed"
  fi

  java "${JVM_COMMON[@]}" -Dtally.kafka.logfile="$dir/broker.log" \
    -Xms256m -Xmx768m -XX:+UseG1GC -cp "$LIBS/*" kafka.Kafka "$dir/server.properties" \
    >"$dir/broker.out" 2>&1 </dev/null &
  pid=$!
  write_env "$dir" "$port" "$pid" "$sport"
  note "broker pid $pid on 127.0.0.1:$port (SASL_SSL :$sport, controller :$cport), data in $dir"

  # Readiness probe in the background, so a broker crash fails us at once.
  local rpid rc=0 died=0
  timeout $((READY_TIMEOUT + 30)) java "${JVM_COMMON[@]}" "${JVM_SHORT[@]}" \
    -Dtally.kafka.logfile="$dir/ready.log" -Dtally.kafka.loglevel=WARN \
    -cp "$LIBS/*:$(ready_classes)" KafkaReady "127.0.0.1:$port" "$READY_TIMEOUT" \
    2>"$dir/ready.out" &
  rpid=$!
  while pid_alive "$rpid"; do
    if ! pid_alive "$pid"; then
      died=1
      kill "$rpid" 2>/dev/null || true
      break
    fi
    sleep 0.3
  done
  wait "$rpid" || rc=$?

  if ((rc != 0 || died)); then
    if [[ -s $dir/ready.out ]]; then
      echo "---- readiness probe output" >&2
      cat "$dir/ready.out" >&2
    fi
    logs >&2 || true
    stop
    if ((died)); then
      die "the broker exited during startup (see log above)"
    fi
    die "broker not ready within ${READY_TIMEOUT}s (see log above)"
  fi
  sed 's/^/  /' "$dir/ready.out" >&2
  # The broker opens all its listeners together; check the secured one is there.
  if (($(listeners_on "$sport") == 0)); then
    logs >&2 || true
    stop
    die "the SASL_SSL listener on 127.0.0.1:$sport is not open (see log above)"
  fi
  note "Kafka ready at 127.0.0.1:$port after $((SECONDS - t0))s; env in $ENV_FILE"
}

write_env() {
  local dir=$1 port=$2 pid=$3 sport=$4
  mkdir -p "$RUN_DIR"
  cat >"$ENV_FILE.tmp" <<EOF
TALLY_TEST_BOOTSTRAP=127.0.0.1:$port
TALLY_TEST_SASL_BOOTSTRAP=127.0.0.1:$sport
TALLY_TEST_SASL_USER=$SASL_USER
TALLY_TEST_SASL_PASSWORD_FILE=$dir/sasl-password
TALLY_TEST_SASL_CA=$TLS_DIR/ca.pem
TALLY_KAFKA_PID=$pid
TALLY_KAFKA_DIR=$dir
TALLY_KAFKA_LOG=$dir/broker.log
EOF
  mv "$ENV_FILE.tmp" "$ENV_FILE"
}

stop() {
  if [[ ! -f $ENV_FILE ]]; then
    note "no broker recorded in $ENV_FILE; nothing to stop"
    return 0
  fi
  local pid dir
  pid="$(env_get "$ENV_FILE" TALLY_KAFKA_PID)"
  dir="$(env_get "$ENV_FILE" TALLY_KAFKA_DIR)"
  # Only signal the pid if it still is our broker (pids get reused).
  if [[ -n $pid ]] && pid_alive "$pid" &&
    grep -qa 'kafka.Kafka' "/proc/$pid/cmdline" 2>/dev/null; then
    stop_pid "$pid" 10 || die "broker pid $pid would not die"
    note "broker pid $pid stopped"
  fi
  if [[ -n $dir && -f $dir/broker.log ]]; then
    cp "$dir/broker.log" "$LAST_LOG" 2>/dev/null || true
  fi
  # Guard the rm: only ever delete a dir that start created.
  if [[ $dir == */tally-kafka.* && -d $dir ]]; then
    rm -rf "$dir"
  fi
  rm -f "$ENV_FILE"
}

logs() {
  local dir="" log lines="${TALLY_LOG_LINES:-80}"
  [[ -f $ENV_FILE ]] && dir="$(env_get "$ENV_FILE" TALLY_KAFKA_DIR)"
  # The running (or starting) broker's log, else the last stopped one's.
  if [[ -n $dir ]]; then log="$dir/broker.log"; else log=$LAST_LOG; fi
  if [[ -f $log ]]; then
    echo "---- last $lines lines of $log"
    tail -n "$lines" "$log"
  else
    echo "---- no broker log at $log"
  fi
  if [[ -n $dir && -s $dir/broker.out ]]; then
    echo "---- last $lines lines of $dir/broker.out (JVM stdout/stderr)"
    tail -n "$lines" "$dir/broker.out"
  fi
}

case "${1:-}" in
fetch) fetch ;;
start) start ;;
stop) stop ;;
logs) logs ;;
*)
  echo "usage: $SELF fetch|start|stop|logs" >&2
  exit 2
  ;;
esac
