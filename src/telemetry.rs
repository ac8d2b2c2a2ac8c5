//! Logs and metrics setup shared by every command.
//!
//! Logs go to stderr through `tracing`, filtered by `RUST_LOG` (default `info`), in one
//! of two formats chosen by `--log-format` (or `TALLY_LOG_FORMAT`):
//! - `text` (the default): one human-readable line per event. ANSI colours only when
//!   stderr is a terminal and `NO_COLOR` is unset, so files, pipes and container log
//!   collectors never receive escape codes.
//! - `json`: one JSON object per line for log pipelines, never coloured. The event's
//!   fields are top-level keys next to `timestamp`, `level`, `target` and `message`.
//!
//! Metrics are served in the Prometheus text format on `metrics.listen` at `/metrics`.
//!
//! Every log event that passes the filter is also counted in [`LOG_EVENTS`]
//! (`tally_log_events_total{level}`, level one of `error`, `warn`, `info`, `debug`,
//! `trace`), from the moment the metrics endpoint is up: an alert on `level="error"`
//! needs no log pipeline, and tests assert that a clean run logged no error without
//! matching log text.

use std::io::IsTerminal;
use std::net::SocketAddr;

use anyhow::Context;
use metrics::{Unit, counter, describe_counter};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::{Context as LayerContext, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// Log events that passed the filter, by `level`.
pub(crate) const LOG_EVENTS: &str = "tally_log_events_total";

/// Counts every log event it sees in [`LOG_EVENTS`]; the label comes from the five
/// tracing levels only.
struct LogEventCounter;

impl<S: Subscriber> Layer<S> for LogEventCounter {
    fn on_event(&self, event: &Event<'_>, _context: LayerContext<'_, S>) {
        let level = match *event.metadata().level() {
            Level::ERROR => "error",
            Level::WARN => "warn",
            Level::INFO => "info",
            Level::DEBUG => "debug",
            Level::TRACE => "trace",
        };
        counter!(LOG_EVENTS, "level" => level).increment(1);
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines; coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Installs the global tracing subscriber; `default_level` applies when `RUST_LOG` is
/// unset.
pub(crate) fn init_logs(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_ansi(false)
            .finish()
            .with(LogEventCounter)
            .init(),
        LogFormat::Text => builder
            .with_ansi(colour_allowed())
            .finish()
            .with(LogEventCounter)
            .init(),
    }
}

/// Colour only for a person at a terminal who did not ask for none
/// (<https://no-color.org>).
fn colour_allowed() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Starts the Prometheus endpoint on `listen` (a `host:port`); an empty string disables it.
/// `histograms` gives explicit buckets per histogram name. Must be called from inside a
/// tokio runtime.
pub(crate) fn init_metrics(
    listen: &str,
    histograms: &[(&str, &[f64])],
) -> anyhow::Result<Option<SocketAddr>> {
    if listen.is_empty() {
        return Ok(None);
    }
    let address: SocketAddr = listen.parse().with_context(|| {
        format!("invalid config field `metrics.listen`: {listen:?} is not host:port")
    })?;
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in histograms {
        builder = builder
            .set_buckets_for_metric(Matcher::Full((*name).to_owned()), buckets)
            .with_context(|| format!("invalid buckets for {name}"))?;
    }
    builder
        .with_http_listener(address)
        .install()
        .with_context(|| format!("cannot serve metrics on {address}"))?;
    describe_counter!(
        LOG_EVENTS,
        Unit::Count,
        "Log events that passed the log filter, by level."
    );
    Ok(Some(address))
}
