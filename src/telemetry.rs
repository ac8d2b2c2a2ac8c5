//! Logs and metrics setup shared by every command.
//!
//! Logs go to stderr through `tracing`, as text or JSON lines (`TALLY_LOG_FORMAT=json`),
//! filtered by `RUST_LOG` (default `info`). Metrics are served in the Prometheus text
//! format on `metrics.listen` at `/metrics`.

use std::net::SocketAddr;

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber.
pub(crate) fn init_logs() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("TALLY_LOG_FORMAT").is_ok_and(|format| format == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
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
    Ok(Some(address))
}
