//! Shared helpers for the end-to-end tests: the real broker's address, random names,
//! config files for the `tally` binary.
#![allow(dead_code, unreachable_pub)]

pub mod eos;
pub mod exports;
pub mod finance;
pub mod group;
pub mod kill;
pub mod money;
pub mod ops;
pub mod prometheus;
pub mod replay;
pub mod sink;
pub mod sink_soak;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rand::Rng;

/// The real broker started by `deploy/local/test.sh`.
pub fn bootstrap() -> String {
    std::env::var("TALLY_TEST_BOOTSTRAP").expect(
        "TALLY_TEST_BOOTSTRAP is not set: run the tests through deploy/local/test.sh, \
         which starts a real Kafka broker",
    )
}

/// A name no other test run uses.
pub fn rand_name(prefix: &str) -> String {
    let suffix: u64 = rand::rng().random();
    format!("{prefix}-{suffix:016x}")
}

/// Topic names of one test.
#[derive(Debug, Clone)]
pub struct TestTopics {
    pub usage_events: String,
    pub billing_aggregates: String,
    pub late: String,
    pub dlq: String,
    pub checkpoints: String,
}

impl TestTopics {
    /// Random names (`t-<random>.usage.events`, ...).
    pub fn random() -> TestTopics {
        TestTopics::with_prefix("t")
    }

    /// Random names that start with `prefix` (`<prefix>-<random>.usage.events`, ...).
    pub fn with_prefix(prefix: &str) -> TestTopics {
        let base = rand_name(prefix);
        TestTopics {
            usage_events: format!("{base}.usage.events"),
            billing_aggregates: format!("{base}.billing.aggregates"),
            late: format!("{base}.usage.late"),
            dlq: format!("{base}.usage.dlq"),
            checkpoints: format!("{base}.tally.checkpoints"),
        }
    }
}

/// The contracts file the binary runs with in these tests.
pub fn default_contracts_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/contracts/default.toml")
}

/// Writes a config file for the binary pointing at the real broker.
pub fn write_config(dir: &Path, topics: &TestTopics, partitions: i32, extra: &str) -> PathBuf {
    let path = dir.join(format!("tally-{partitions}.toml"));
    let contracts = default_contracts_path();
    let body = format!(
        r#"[kafka]
bootstrap_servers = "{bootstrap}"

[topics]
usage_events = "{events}"
billing_aggregates = "{aggregates}"
late = "{late}"
dlq = "{dlq}"
checkpoints = "{checkpoints}"
partitions = {partitions}
output_partitions = 2
replication_factor = 1

[aggregator]
contracts_path = "{contracts}"

[metrics]
listen = ""
{extra}
"#,
        bootstrap = bootstrap(),
        events = topics.usage_events,
        aggregates = topics.billing_aggregates,
        late = topics.late,
        dlq = topics.dlq,
        checkpoints = topics.checkpoints,
        contracts = contracts.display(),
    );
    std::fs::write(&path, body).expect("write config");
    path
}

/// Runs the real `tally` binary.
pub fn tally(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run tally")
}

/// Panics with both streams when the command failed.
pub fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
