//! Command-line arguments of `tally produce`, and the time parser they use.
//!
//! [`GeneratorArgs`] is a clap `Args` group the binary flattens into its `produce`
//! subcommand; [`GeneratorArgs::to_config`] turns it into a validated
//! [`GeneratorConfig`]. Fractions name record classes; the share not given to a named
//! class is on time. Times are RFC 3339 (`2025-01-01T00:00:00Z`, offsets allowed) or
//! UNIX epoch milliseconds; [`parse_time_ms`] is a small hand parser so no date crate is
//! needed.

use std::num::NonZeroU64;
use std::path::PathBuf;

use crate::generator::{
    ClassFractions, DEFAULT_START_TIME_MS, GeneratorConfig, GeneratorConfigError,
};
use crate::run::ProduceOptions;

/// Default records when neither `--count` nor `--duration-secs` is given.
pub const DEFAULT_COUNT: u64 = 100_000;

/// Arguments of the traffic generator.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct GeneratorArgs {
    /// Seed of the random stream: the same arguments and seed give the same records.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Records to produce (all classes). Default 100000.
    #[arg(long, conflicts_with = "duration_secs")]
    pub count: Option<u64>,
    /// Simulated seconds to produce: count = duration × rate.
    #[arg(long)]
    pub duration_secs: Option<u64>,
    /// Simulated records per second of send time.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// Simulated send time of the first record: RFC 3339 or epoch ms.
    /// Default 2025-01-01T00:00:00Z.
    #[arg(long, value_parser = parse_time_arg)]
    pub start_time: Option<i64>,
    /// Partition count of the topic (checked against the broker). Default: the config file's `topics.partitions`.
    #[arg(long)]
    pub partitions: Option<u32>,
    /// Number of tenants (Zipf-distributed volume).
    #[arg(long, default_value_t = 200)]
    pub tenants: u32,
    /// The aggregator's window size, ms. Default: the config file's `aggregator.window_ms`.
    #[arg(long)]
    pub window_ms: Option<i64>,
    /// The aggregator's max out-of-orderness, ms. Default: from the config file.
    #[arg(long)]
    pub max_out_of_orderness_ms: Option<i64>,
    /// The aggregator's allowed lateness, ms. Default: from the config file.
    #[arg(long)]
    pub allowed_lateness_ms: Option<i64>,
    /// The aggregator's correction horizon, ms (corrections need at least 4 windows). Default: from the config file.
    #[arg(long)]
    pub correction_horizon_ms: Option<i64>,
    /// Share of all records that are on time; if given it must equal 1 minus the other
    /// class fractions.
    #[arg(long, visible_alias = "on-time")]
    pub on_time_fraction: Option<f64>,
    /// Share of on-time events sent out of order.
    #[arg(long, default_value_t = 0.10)]
    pub out_of_order_fraction: f64,
    /// Share of records that correct a closed window.
    #[arg(long, default_value_t = 0.03)]
    pub correction_fraction: f64,
    /// Share of records beyond the correction horizon.
    #[arg(long, default_value_t = 0.02)]
    pub too_late_fraction: f64,
    /// Share of records that re-send an earlier event.
    #[arg(long, default_value_t = 0.03)]
    pub duplicate_fraction: f64,
    /// Share of duplicates that change the payload under the same event id.
    #[arg(long, default_value_t = 0.10)]
    pub conflicting_duplicate_fraction: f64,
    /// Share of records that are malformed or invalid.
    #[arg(long, default_value_t = 0.02)]
    pub rejected_fraction: f64,
    /// UsageEvent schema version for valid events (1 or 2).
    #[arg(long, default_value_t = 1)]
    pub schema_version: u8,
    /// Real records per second to hold (default: as fast as possible).
    #[arg(long)]
    pub real_rate: Option<NonZeroU64>,
    /// Where to write the ground truth (pretty JSON).
    #[arg(long)]
    pub truth: Option<PathBuf>,
    /// Keep serving `/metrics`, `/healthz` and `/readyz` this long after the run
    /// ended (the ground truth written, `/readyz` 503), so a scraper sees the final
    /// counts of a short run.
    #[arg(long, default_value_t = 0)]
    pub metrics_linger_ms: u64,
}

/// Why generator arguments are unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GeneratorArgsError {
    /// `--on-time-fraction` disagrees with the other fractions.
    #[error(
        "--on-time-fraction {given} must equal 1 minus the other class fractions ({remainder})"
    )]
    OnTimeMismatch {
        /// The value given.
        given: f64,
        /// 1 minus the other fractions.
        remainder: f64,
    },
    /// `--duration-secs × --rate` overflows.
    #[error("--duration-secs × --rate overflows the record count")]
    CountOverflow,
    /// The resulting config is invalid (the field is named in the error).
    #[error("invalid generator arguments")]
    Config(#[from] GeneratorConfigError),
}

impl GeneratorArgs {
    /// The validated generator config; arguments not given on the command line take
    /// [`GeneratorConfig::default`]'s values.
    pub fn to_config(&self) -> Result<GeneratorConfig, GeneratorArgsError> {
        self.to_config_with(&GeneratorConfig::default())
    }

    /// The validated generator config; the partition count and the aggregator's
    /// event-time parameters not given on the command line come from `defaults`
    /// (normally the pipeline's config file, so the truth matches what the aggregator
    /// will decide).
    pub fn to_config_with(
        &self,
        defaults: &GeneratorConfig,
    ) -> Result<GeneratorConfig, GeneratorArgsError> {
        let count = match (self.count, self.duration_secs) {
            (Some(count), _) => count,
            (None, Some(seconds)) => seconds
                .checked_mul(self.rate)
                .ok_or(GeneratorArgsError::CountOverflow)?,
            (None, None) => DEFAULT_COUNT,
        };
        let fractions = ClassFractions {
            out_of_order: self.out_of_order_fraction,
            correction: self.correction_fraction,
            too_late: self.too_late_fraction,
            duplicate: self.duplicate_fraction,
            conflicting_duplicate: self.conflicting_duplicate_fraction,
            rejected: self.rejected_fraction,
        };
        let config = GeneratorConfig {
            seed: self.seed,
            count,
            start_time_ms: self.start_time.unwrap_or(DEFAULT_START_TIME_MS),
            rate_per_sec: self.rate,
            partitions: self.partitions.unwrap_or(defaults.partitions),
            tenants: self.tenants,
            window_ms: self.window_ms.unwrap_or(defaults.window_ms),
            max_out_of_orderness_ms: self
                .max_out_of_orderness_ms
                .unwrap_or(defaults.max_out_of_orderness_ms),
            allowed_lateness_ms: self
                .allowed_lateness_ms
                .unwrap_or(defaults.allowed_lateness_ms),
            correction_horizon_ms: self
                .correction_horizon_ms
                .unwrap_or(defaults.correction_horizon_ms),
            fractions,
            schema_version: self.schema_version,
        };
        config.validate()?;
        if let Some(given) = self.on_time_fraction {
            let remainder = fractions.on_time();
            if !(0.0..=1.0).contains(&given) {
                return Err(GeneratorConfigError::FractionOutOfRange {
                    field: "on_time",
                    value: given,
                }
                .into());
            }
            if (given - remainder).abs() > 1e-9 {
                return Err(GeneratorArgsError::OnTimeMismatch { given, remainder });
            }
        }
        Ok(config)
    }

    /// Run options from the arguments (`--real-rate`); other options keep their defaults.
    pub fn produce_options(&self) -> ProduceOptions {
        ProduceOptions {
            real_rate_per_sec: self.real_rate,
            ..ProduceOptions::default()
        }
    }
}

/// Why a time could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid time {text:?}: expected RFC 3339 (2025-01-01T00:00:00Z) or epoch milliseconds ({problem})"
)]
pub struct TimeParseError {
    /// The text given.
    pub text: String,
    /// What was wrong.
    pub problem: &'static str,
}

fn parse_time_arg(text: &str) -> Result<i64, TimeParseError> {
    parse_time_ms(text)
}

/// Parses RFC 3339 (`YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`) or integer epoch
/// milliseconds into UTC milliseconds. Fractions below a millisecond are truncated.
pub fn parse_time_ms(text: &str) -> Result<i64, TimeParseError> {
    let trimmed = text.trim();
    let digits = trimmed.strip_prefix('-').unwrap_or(trimmed);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return trimmed.parse::<i64>().map_err(|_| TimeParseError {
            text: text.to_owned(),
            problem: "epoch milliseconds out of range",
        });
    }
    tally_core::timefmt::parse_rfc3339_ms(trimmed).ok_or_else(|| TimeParseError {
        text: text.to_owned(),
        problem: "not an RFC 3339 time",
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        generator: GeneratorArgs,
    }

    fn parse(args: &[&str]) -> Result<GeneratorArgs, clap::Error> {
        let mut argv = vec!["tally-produce"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|cli| cli.generator)
    }

    #[test]
    fn parses_rfc3339_and_epoch_millis() {
        assert_eq!(
            parse_time_ms("2025-01-01T00:00:00Z"),
            Ok(DEFAULT_START_TIME_MS)
        );
        assert_eq!(parse_time_ms("1970-01-01T00:00:00.25Z"), Ok(250));
        assert_eq!(
            parse_time_ms("2025-01-01T02:00:00+02:00"),
            Ok(DEFAULT_START_TIME_MS)
        );
        assert_eq!(
            parse_time_ms("2024-02-29T12:30:00.123456-01:30"),
            Ok(1_709_215_200_123)
        );
        assert_eq!(parse_time_ms("1735689600000"), Ok(DEFAULT_START_TIME_MS));
        assert_eq!(parse_time_ms("-1000"), Ok(-1000));
    }

    #[test]
    fn rejects_impossible_times() {
        for text in [
            "2025-02-29T00:00:00Z",
            "2025-13-01T00:00:00Z",
            "2025-01-01T24:00:00Z",
            "2025-01-01",
            "yesterday",
            "2025-01-01T00:00:00",
        ] {
            assert!(parse_time_ms(text).is_err(), "{text}");
        }
    }

    #[test]
    fn duration_times_rate_gives_the_count() {
        let args = parse(&[
            "--duration-secs",
            "60",
            "--rate",
            "500",
            "--start-time",
            "2025-06-01T00:00:00Z",
        ])
        .expect("parses");
        let config = args.to_config().expect("valid");
        assert_eq!(config.count, 30_000);
        assert_eq!(
            config.start_time_ms,
            parse_time_ms("2025-06-01T00:00:00Z").expect("valid time")
        );
    }

    #[test]
    fn count_and_duration_conflict() {
        assert!(parse(&["--count", "10", "--duration-secs", "5"]).is_err());
    }

    #[test]
    fn rejects_fractions_that_leave_no_room_for_on_time() {
        let args =
            parse(&["--correction-fraction", "0.6", "--rejected-fraction", "0.5"]).expect("parses");
        assert!(matches!(
            args.to_config(),
            Err(GeneratorArgsError::Config(
                GeneratorConfigError::FractionsExceedOne { .. }
            ))
        ));
        let args = parse(&["--duplicate-fraction", "1.5"]).expect("parses");
        assert!(matches!(
            args.to_config(),
            Err(GeneratorArgsError::Config(
                GeneratorConfigError::FractionOutOfRange {
                    field: "duplicate",
                    ..
                }
            ))
        ));
    }

    #[test]
    fn on_time_fraction_must_match_the_remainder() {
        let args = parse(&["--on-time", "0.90"]).expect("parses");
        assert!(args.to_config().is_ok());
        let args = parse(&["--on-time-fraction", "0.5"]).expect("parses");
        assert!(matches!(
            args.to_config(),
            Err(GeneratorArgsError::OnTimeMismatch { .. })
        ));
    }

    #[test]
    fn defaults_match_the_config_defaults() {
        let config = parse(&[]).expect("parses").to_config().expect("valid");
        assert_eq!(config, GeneratorConfig::default());
    }

    #[test]
    fn event_time_defaults_are_the_aggregators_config_defaults() {
        let aggregator = tally_core::config::AggregatorConfig::default();
        let config = parse(&[]).expect("parses").to_config().expect("valid");
        assert_eq!(
            (
                config.window_ms,
                config.max_out_of_orderness_ms,
                config.allowed_lateness_ms,
                config.correction_horizon_ms,
            ),
            (
                aggregator.window_ms,
                aggregator.max_out_of_orderness_ms,
                aggregator.allowed_lateness_ms,
                aggregator.correction_horizon_ms,
            )
        );
    }

    #[test]
    fn unset_flags_take_the_loaded_aggregator_config_and_flags_win() {
        let aggregator = tally_core::config::AggregatorConfig {
            window_ms: 300_000,
            max_out_of_orderness_ms: 10_000,
            allowed_lateness_ms: 120_000,
            correction_horizon_ms: 7_200_000,
            ..tally_core::config::AggregatorConfig::default()
        };
        let defaults = GeneratorConfig::for_aggregator(&aggregator);
        let config = parse(&[])
            .expect("parses")
            .to_config_with(&defaults)
            .expect("valid");
        assert_eq!(
            (
                config.window_ms,
                config.max_out_of_orderness_ms,
                config.allowed_lateness_ms,
                config.correction_horizon_ms,
            ),
            (300_000, 10_000, 120_000, 7_200_000)
        );
        let config = parse(&["--allowed-lateness-ms", "45000"])
            .expect("parses")
            .to_config_with(&defaults)
            .expect("valid");
        assert_eq!(
            (config.window_ms, config.allowed_lateness_ms),
            (300_000, 45_000)
        );
    }
}
