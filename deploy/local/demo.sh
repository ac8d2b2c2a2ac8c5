#!/usr/bin/env bash
# Builds tally and runs `tally demo`: the whole pipeline in one process on
# librdkafka's in-process mock cluster, with no Kafka, no PostgreSQL and no Java.
#
# Installs the missing Debian packages the Rust build needs (as deploy/local/test.sh
# does, through lib.sh), builds the release binary with the locked dependencies,
# then runs `tally demo` with the arguments given, e.g.
#   deploy/local/demo.sh --count 500000 --seconds 40
#   deploy/local/demo.sh --broker 127.0.0.1:9092     # the same demo on a real broker
# `tally demo --help` lists every flag.
set -euo pipefail

cd "$(dirname "$0")/../.."
# shellcheck source=deploy/local/lib.sh
source deploy/local/lib.sh

command -v cargo >/dev/null || die "cargo not found (install Rust with rustup: https://rustup.rs)"
missing=()
missing_build_pkgs missing
apt_install "${missing[@]}"
note "building target/release/tally (the first build compiles librdkafka: a few minutes)"
cargo build --release --locked --bin tally
exec target/release/tally demo "$@"
