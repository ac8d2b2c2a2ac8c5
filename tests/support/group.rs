//! A member of an aggregator consumer group in the end-to-end tests: a real
//! `tally aggregate` process with its own `/metrics` endpoint, so a test observes it
//! through counters, never through its log text (tests/aggregator_group.rs,
//! tests/aggregator_restore.rs).

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use super::TestTopics;
use super::eos::{AggregatorProcess, ChildConfig, free_port};
use super::prometheus::{Exposition, counter, try_scrape};

/// How long a scrape is retried while a member's endpoint starts.
const SCRAPE_START_TIMEOUT: Duration = Duration::from_secs(10);

/// A group member: the process and the address of its `/metrics` endpoint.
pub struct Member {
    pub process: AggregatorProcess,
    pub metrics: String,
}

impl Member {
    /// Writes `dir/<log_name>.toml` (the `child` config with a free metrics port) and
    /// starts the process with `instance_id` and the `extra` arguments.
    pub fn spawn(
        child: &ChildConfig,
        topics: &TestTopics,
        partitions: i32,
        dir: &Path,
        log_name: &str,
        instance_id: &str,
        extra: &[&str],
    ) -> Member {
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut child = child.clone();
        child.metrics_listen = metrics.clone();
        let config = child.write(dir, log_name, topics, partitions);
        let process = AggregatorProcess::spawn(&config, instance_id, dir, log_name, extra);
        Member { process, metrics }
    }

    /// A scrape of the member's endpoint, retried for up to 10 s while the endpoint
    /// starts; `None` once the process has exited.
    pub fn scrape(&mut self) -> Option<Exposition> {
        let started = Instant::now();
        loop {
            if let Some(exposition) = try_scrape(&self.metrics) {
                return Some(exposition);
            }
            if self.process.try_status().is_some() {
                return None;
            }
            assert!(
                started.elapsed() < SCRAPE_START_TIMEOUT,
                "{} serves no metrics; log:\n{}",
                self.process.instance_id,
                self.process.log_tail(40)
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// [`Member::scrape`] of a member that must be running.
    pub fn scrape_running(&mut self) -> Exposition {
        self.scrape().unwrap_or_else(|| {
            panic!(
                "{} exited; log:\n{}",
                self.process.instance_id,
                self.process.log_tail(40)
            )
        })
    }

    /// The counter `name` of a member that must be running.
    pub fn counter(&mut self, name: &str) -> f64 {
        counter(&self.scrape_running(), name)
    }

    /// SIGTERM, then asserts a clean exit (status 0) within `timeout`.
    pub fn terminate_cleanly(&mut self, timeout: Duration) {
        let status = self.process.terminate(timeout);
        assert!(
            status.success(),
            "{} exits 0 on SIGTERM ({status}); log:\n{}",
            self.process.instance_id,
            self.process.log_tail(40)
        );
    }
}
