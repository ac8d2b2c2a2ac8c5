//! What one aggregator process runs with: the config file, the contracts, and the
//! command line of `tally aggregate`.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use tally_core::config::Config;
use tally_core::contracts::Contracts;
use tally_core::health::Health;
use tally_core::partition::PartitionParams;
use tally_core::validate::ValidationLimits;
use tally_core::window::WindowSize;

use crate::error::AggregatorError;

/// Where a partition without a committed offset starts (DESIGN.md, "Start position").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// The partition's first retained offset.
    Earliest,
    /// The partition's end: only records produced from now on.
    Latest,
    /// The first offset whose Kafka timestamp is at or after this time, UTC ms.
    Timestamp(i64),
}

/// Why a `--start-from` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected `earliest`, `latest` or a time in epoch milliseconds, got {0:?}")]
pub struct StartFromParseError(String);

impl FromStr for StartFrom {
    type Err = StartFromParseError;

    fn from_str(text: &str) -> Result<StartFrom, StartFromParseError> {
        match text {
            "earliest" => Ok(StartFrom::Earliest),
            "latest" => Ok(StartFrom::Latest),
            other => match other.parse::<i64>() {
                Ok(time_ms) if time_ms >= 0 => Ok(StartFrom::Timestamp(time_ms)),
                _ => Err(StartFromParseError(other.to_owned())),
            },
        }
    }
}

/// Command-line arguments of `tally aggregate`.
#[derive(Debug, Clone, clap::Args)]
pub struct AggregateArgs {
    /// Stable identity of this process (e.g. the pod's ordinal): the transactional id is
    /// `tally-aggregator-<instance-id>`, so a restarted process fences its predecessor.
    #[arg(long, env = "TALLY_INSTANCE_ID")]
    pub instance_id: String,
    /// Where partitions without a committed offset start: earliest | latest | <epoch ms>.
    /// Without it, such a partition stops the aggregator. Committed offsets always win.
    #[arg(long)]
    pub start_from: Option<StartFrom>,
    /// Overrides `aggregator.commit_interval_ms`.
    #[arg(long)]
    pub commit_interval_ms: Option<u64>,
    /// Test hook: abort every k-th transaction (k ≥ 2) instead of committing it.
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..))]
    pub abort_every: Option<u32>,
    /// Test hook: every partition restore takes at least this long (the re-read is
    /// paced evenly over its range and stays cancellable), to show that a restore
    /// longer than `max.poll.interval.ms` keeps the member in the group.
    #[arg(long)]
    pub restore_min_duration_ms: Option<u64>,
    /// Test hook: the first N committed-offset fetches of this process fail as a broker
    /// timeout would, to show that a partition's fetch is retried and that its third
    /// failure in a row stops the aggregator.
    #[arg(long)]
    pub fail_offset_fetches: Option<u32>,
    /// Test hook: every partition restore thread panics, to show that a restore thread
    /// that ends without a result stops the aggregator with a clear error.
    #[arg(long)]
    pub panic_restores: bool,
    /// Exit 0 once every owned partition has sat at its end for this long after its
    /// last usage record and its tick was read back (for tests and batch catch-up).
    #[arg(long)]
    pub exit_after_idle_ms: Option<u64>,
    /// Contracts file; overrides `aggregator.contracts_path`.
    #[arg(long)]
    pub contracts: Option<PathBuf>,
}

/// Everything [`crate::run`] needs.
#[derive(Debug, Clone)]
pub struct AggregatorSettings {
    /// The validated configuration.
    pub config: Config,
    /// The contracts in force.
    pub contracts: Contracts,
    /// Stable instance identity (transactional id suffix).
    pub instance_id: String,
    /// Start position of partitions without a committed offset.
    pub start_from: Option<StartFrom>,
    /// Commit interval (from the config unless overridden).
    pub commit_interval: Duration,
    /// Abort every k-th transaction (test hook).
    pub abort_every: Option<NonZeroU32>,
    /// Minimum duration of every partition restore (test hook, see [`AggregateArgs`]).
    pub restore_min_duration: Option<Duration>,
    /// Committed-offset fetches still to fail (test hook, see [`AggregateArgs`]);
    /// shared by every clone of these settings, so it counts across incarnations.
    pub fail_offset_fetches: Arc<AtomicU32>,
    /// Restore threads panic (test hook, see [`AggregateArgs`]).
    pub panic_restores: bool,
    /// Exit once every partition settled for this long (see [`AggregateArgs`]).
    pub exit_after_idle: Option<Duration>,
    /// Liveness and readiness, reported by the loop (shared by every clone of these
    /// settings): a beat per poll-loop iteration and per restore poll; restoring while
    /// an assignment is taken, running after it; see `tally_core::health`.
    pub health: Health,
}

impl AggregatorSettings {
    /// Settings with the config's values and no test hooks.
    pub fn new(
        config: Config,
        contracts: Contracts,
        instance_id: impl Into<String>,
    ) -> AggregatorSettings {
        let commit_interval = duration_ms(config.aggregator.commit_interval_ms);
        AggregatorSettings {
            config,
            contracts,
            instance_id: instance_id.into(),
            start_from: None,
            commit_interval,
            abort_every: None,
            restore_min_duration: None,
            fail_offset_fetches: Arc::new(AtomicU32::new(0)),
            panic_restores: false,
            exit_after_idle: None,
            health: Health::new(),
        }
    }

    /// Settings from the command line: loads the contracts file (the argument's, else
    /// `aggregator.contracts_path`).
    pub fn from_args(
        config: Config,
        args: &AggregateArgs,
    ) -> Result<AggregatorSettings, AggregatorError> {
        let path = args
            .contracts
            .clone()
            .unwrap_or_else(|| PathBuf::from(&config.aggregator.contracts_path));
        let text =
            std::fs::read_to_string(&path).map_err(|source| AggregatorError::ContractsFile {
                path: path.clone(),
                source,
            })?;
        let window = WindowSize::new(config.aggregator.window_ms)
            .map_err(|error| AggregatorError::Settings(format!("aggregator.window_ms: {error}")))?;
        let contracts = Contracts::load(&text, window)
            .map_err(|source| AggregatorError::Contracts { path, source })?;
        let mut settings = AggregatorSettings::new(config, contracts, args.instance_id.clone());
        settings.start_from = args.start_from;
        if let Some(ms) = args.commit_interval_ms {
            settings.commit_interval = Duration::from_millis(ms);
        }
        settings.abort_every = args.abort_every.and_then(NonZeroU32::new);
        settings.restore_min_duration = args.restore_min_duration_ms.map(Duration::from_millis);
        settings.fail_offset_fetches =
            Arc::new(AtomicU32::new(args.fail_offset_fetches.unwrap_or(0)));
        settings.panic_restores = args.panic_restores;
        settings.exit_after_idle = args.exit_after_idle_ms.map(Duration::from_millis);
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what the config check cannot see (the command line, the contracts' window).
    pub fn validate(&self) -> Result<(), AggregatorError> {
        self.config
            .validate()
            .map_err(|error| AggregatorError::Settings(error.to_string()))?;
        if self.instance_id.trim().is_empty() {
            return Err(AggregatorError::Settings(
                "--instance-id must not be empty".to_owned(),
            ));
        }
        if self.abort_every.is_some_and(|k| k.get() < 2) {
            return Err(AggregatorError::Settings(
                "--abort-every must be at least 2".to_owned(),
            ));
        }
        if self.commit_interval.is_zero() {
            return Err(AggregatorError::Settings(
                "the commit interval must be positive".to_owned(),
            ));
        }
        let transaction_timeout = duration_ms(self.config.aggregator.transaction_timeout_ms);
        if self.commit_interval >= transaction_timeout {
            return Err(AggregatorError::Settings(format!(
                "the commit interval ({} ms) must be shorter than aggregator.transaction_timeout_ms ({} ms)",
                self.commit_interval.as_millis(),
                transaction_timeout.as_millis()
            )));
        }
        if self.contracts.window().as_ms() != self.config.aggregator.window_ms {
            return Err(AggregatorError::Settings(format!(
                "the contracts were loaded for {} ms windows, aggregator.window_ms is {}",
                self.contracts.window().as_ms(),
                self.config.aggregator.window_ms
            )));
        }
        // No accepted event may make a row larger than the aggregates topic takes.
        self.config
            .check_contracts(&self.contracts)
            .map_err(|error| AggregatorError::Settings(error.to_string()))?;
        self.partition_params(0)
            .validate()
            .map_err(|error| AggregatorError::Settings(format!("aggregator: {error}")))?;
        Ok(())
    }

    /// The state-machine parameters of one input partition.
    pub fn partition_params(&self, partition: i32) -> PartitionParams {
        let aggregator = &self.config.aggregator;
        PartitionParams {
            window: self.contracts.window(),
            max_out_of_orderness_ms: aggregator.max_out_of_orderness_ms,
            allowed_lateness_ms: aggregator.allowed_lateness_ms,
            correction_horizon_ms: aggregator.correction_horizon_ms,
            dedupe_horizon_ms: aggregator.dedupe_horizon_ms,
            source_topic: self.config.topics.usage_events.clone(),
            partition,
        }
    }

    /// Plausibility bounds.
    pub fn limits(&self) -> ValidationLimits {
        ValidationLimits::from(self.config.validation)
    }

    /// The transactional id of this instance.
    pub fn transactional_id(&self) -> String {
        format!("tally-aggregator-{}", self.instance_id)
    }

    /// `transaction.timeout.ms`.
    pub fn transaction_timeout(&self) -> Duration {
        duration_ms(self.config.aggregator.transaction_timeout_ms)
    }

    /// Threads processing partitions in parallel (`aggregator.worker_threads`, 0 = one
    /// per available core).
    pub fn worker_threads(&self) -> usize {
        match self.config.aggregator.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            threads => usize::try_from(threads).unwrap_or(1),
        }
    }

    /// Idle time at a partition's end before a tick is written.
    pub fn idle_timeout(&self) -> Duration {
        duration_ms(self.config.aggregator.idle_timeout_ms)
    }
}

fn duration_ms(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_start_positions() {
        assert_eq!("earliest".parse(), Ok(StartFrom::Earliest));
        assert_eq!("latest".parse(), Ok(StartFrom::Latest));
        assert_eq!(
            "1735689600000".parse(),
            Ok(StartFrom::Timestamp(1_735_689_600_000))
        );
        assert!("yesterday".parse::<StartFrom>().is_err());
        assert!("-5".parse::<StartFrom>().is_err());
    }
}
