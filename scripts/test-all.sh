#!/usr/bin/env bash
# The whole test suite, as README.md gives it and .ci/run runs it.
set -euo pipefail
cd "$(dirname "$0")/.."

# Redis-backed tests start their own redis-server on loopback ports
# (tests/redis_cluster.rs and tests/scale_out.rs a three-master Cluster,
# joined with redis-cli, which comes with the package); --all-features
# below turns on the `redis` feature they need.
if ! command -v redis-server >/dev/null 2>&1; then
  echo "== installing redis-server from the distribution's packages"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

# PostgreSQL-backed tests (integrations/postgres) start their own cluster
# (initdb + pg_ctl as the postgres user) on loopback ports.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  echo "== installing postgresql from the distribution's packages"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
fi

# Broker consumer tests (integrations/consumers) start their own
# `nats-server -js` on loopback ports.
if ! command -v nats-server >/dev/null 2>&1; then
  echo "== installing nats-server from the distribution's packages"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nats-server >/dev/null
fi

echo "== format and lints (every workspace member)"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features --quiet

echo "== the library as its users build it: no features, then each alone"
cargo clippy -p tiered-dedup --all-targets --no-default-features -- -D warnings
for feature in redis metrics tracing; do
  cargo clippy -p tiered-dedup --all-targets --no-default-features --features "$feature" -- -D warnings
done

echo "== unit, integration and doc tests (release, every workspace member)"
cargo test --release --workspace --all-features --no-fail-fast

echo "== the 2^32-bit filter run (ignored by default: 4 GiB)"
cargo test --release --all-features --test fpr -- --ignored

echo "== loom model checks of the filter's atomics"
RUSTFLAGS="--cfg loom -D warnings" CARGO_TARGET_DIR=target/loom cargo test --release --test loom

echo "== benchmarks compile"
cargo bench --workspace --no-run --all-features
