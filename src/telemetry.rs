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
//! One HTTP/1.1 listener per process, on `metrics.listen` (an empty value disables it),
//! serves:
//! - `GET /metrics`: every metric in the Prometheus text format (rendered from the
//!   exporter's handle; histograms with the explicit buckets each process passes in);
//! - `GET /healthz`: liveness, from the process's [`Health`] handle. 200
//!   `{"status":"alive",...}` while the process's loop polled within the liveness bound
//!   (longer than `transaction.timeout.ms`), 503 `{"status":"stalled",...}` otherwise.
//!   Never asks Kafka or the database;
//! - `GET /readyz`: readiness. 200 `{"status":"ready","phase":"running"}` while the
//!   process is running (and, for the sink, its database answers), 503
//!   `{"status":"not ready","phase":...,"reason":...}` while starting, restoring,
//!   stopping or without its database;
//! - anything else: 404.
//!
//! The listener is bound before the process connects to anything, so probes and
//! scrapes answer from the first second of start-up.
//!
//! Every log event that passes the filter is also counted in [`LOG_EVENTS`]
//! (`tally_log_events_total{level}`, level one of `error`, `warn`, `info`, `debug`,
//! `trace`), from the moment the metrics endpoint is up: an alert on `level="error"`
//! needs no log pipeline, and tests assert that a clean run logged no error without
//! matching log text.

use std::convert::Infallible;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics::{Unit, counter, describe_counter};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tally_core::health::{Health, Phase};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{Event, Level, Subscriber, debug, info, warn};
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

/// How often the exporter's upkeep (draining histogram samples) runs.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// What `/healthz` and `/readyz` report on.
#[derive(Debug, Clone)]
pub(crate) struct HealthProbe {
    /// The process's handle, set by its loop.
    pub(crate) health: Health,
    /// `/healthz` fails when the loop has not polled for longer than this.
    pub(crate) liveness_bound: Duration,
}

impl HealthProbe {
    /// The liveness bound of a process whose longest blocking call is a Kafka
    /// transaction call: twice `transaction.timeout.ms`, at least a minute.
    pub(crate) fn new(health: Health, transaction_timeout_ms: i64) -> HealthProbe {
        let twice = u64::try_from(transaction_timeout_ms)
            .unwrap_or(0)
            .saturating_mul(2);
        HealthProbe {
            health,
            liveness_bound: Duration::from_millis(twice.max(60_000)),
        }
    }
}

/// Starts the HTTP listener on `listen` (a `host:port`; an empty string disables it)
/// serving `/metrics`, `/healthz` and `/readyz` (see the module docs), and installs the
/// Prometheus recorder. `histograms` gives explicit buckets per histogram name.
/// Without `probe`, `/healthz` and `/readyz` answer 200 while the process serves.
/// Must be called from inside a tokio runtime.
pub(crate) fn init_telemetry(
    listen: &str,
    histograms: &[(&str, &[f64])],
    probe: Option<HealthProbe>,
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
    // Bind first, so a taken port fails the start before a recorder is installed.
    let listener = std::net::TcpListener::bind(address)
        .with_context(|| format!("cannot serve metrics on {address} (metrics.listen)"))?;
    listener
        .set_nonblocking(true)
        .context("cannot make the metrics listener non-blocking")?;
    let listener = TcpListener::from_std(listener).context("cannot register the listener")?;
    let bound = listener.local_addr().unwrap_or(address);
    let handle = builder
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    describe_counter!(
        LOG_EVENTS,
        Unit::Count,
        "Log events that passed the log filter, by level."
    );
    for level in ["error", "warn", "info", "debug", "trace"] {
        counter!(LOG_EVENTS, "level" => level).increment(0);
    }
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP_EVERY).await;
            upkeep.run_upkeep();
        }
    });
    let endpoint = Arc::new(Endpoint { handle, probe });
    tokio::spawn(accept_loop(listener, endpoint));
    Ok(Some(bound))
}

/// [`init_telemetry`] without a health handle, for commands without a loop to report.
#[allow(
    dead_code,
    reason = "every long-running command reports its health today"
)]
pub(crate) fn init_metrics(
    listen: &str,
    histograms: &[(&str, &[f64])],
) -> anyhow::Result<Option<SocketAddr>> {
    init_telemetry(listen, histograms, None)
}

struct Endpoint {
    handle: PrometheusHandle,
    probe: Option<HealthProbe>,
}

/// Turns the first SIGTERM or Ctrl-C into the returned shutdown flag, for a process
/// whose work runs on a blocking thread that polls the flag: logs the signal with
/// `then` (what the process does now), reports `stopping` on `/readyz`, and sets the
/// flag.
pub(crate) fn shutdown_on_signal(
    health: Health,
    then: &'static str,
) -> anyhow::Result<Arc<AtomicBool>> {
    let shutdown = Arc::new(AtomicBool::new(false));
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let flag = Arc::clone(&shutdown);
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => info!("sigterm received, {then}"),
            _ = tokio::signal::ctrl_c() => info!("interrupt received, {then}"),
        }
        health.set_phase(Phase::Stopping);
        flag.store(true, Ordering::Release);
    });
    Ok(shutdown)
}

async fn accept_loop(listener: TcpListener, endpoint: Arc<Endpoint>) {
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => serve_connection(stream, Arc::clone(&endpoint)),
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %error, "cannot accept a metrics connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn serve_connection(stream: TcpStream, endpoint: Arc<Endpoint>) {
    tokio::spawn(async move {
        let service = service_fn(move |request: Request<Incoming>| {
            let endpoint = Arc::clone(&endpoint);
            async move { Ok::<_, Infallible>(endpoint.respond(&request).await) }
        });
        if let Err(error) = http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await
        {
            debug!(error = %error, "metrics connection ended with an error");
        }
    });
}

impl Endpoint {
    async fn respond(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        match request.uri().path() {
            "/metrics" => {
                let handle = self.handle.clone();
                match tokio::task::spawn_blocking(move || handle.render()).await {
                    Ok(text) => response(StatusCode::OK, "text/plain; version=0.0.4", text),
                    Err(error) => response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        format!("cannot render metrics: {error}\n"),
                    ),
                }
            }
            "/healthz" => self.healthz(),
            "/readyz" => self.readyz(),
            _ => response(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /metrics, /healthz or /readyz\n".to_owned(),
            ),
        }
    }

    fn healthz(&self) -> Response<Full<Bytes>> {
        let Some(probe) = &self.probe else {
            return json_response(StatusCode::OK, &json!({ "status": "alive" }));
        };
        let liveness = probe.health.liveness(probe.liveness_bound);
        let (status, word) = if liveness.alive {
            (StatusCode::OK, "alive")
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "stalled")
        };
        json_response(
            status,
            &json!({
                "status": word,
                "since_last_poll_ms": liveness.since_beat_ms,
                "bound_ms": liveness.bound_ms,
            }),
        )
    }

    fn readyz(&self) -> Response<Full<Bytes>> {
        let Some(probe) = &self.probe else {
            return json_response(StatusCode::OK, &json!({ "status": "ready" }));
        };
        let readiness = probe.health.readiness();
        match readiness.reason {
            None => json_response(
                StatusCode::OK,
                &json!({ "status": "ready", "phase": readiness.phase.as_str() }),
            ),
            Some(reason) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({
                    "status": "not ready",
                    "phase": readiness.phase.as_str(),
                    "reason": reason,
                }),
            ),
        }
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    response(status, "application/json", format!("{body}\n"))
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_bound_is_twice_the_transaction_timeout_and_at_least_a_minute() {
        let bound = |timeout_ms| HealthProbe::new(Health::new(), timeout_ms).liveness_bound;
        assert_eq!(bound(45_000), Duration::from_secs(90));
        assert_eq!(bound(30_000), Duration::from_secs(60));
        assert_eq!(bound(10_000), Duration::from_secs(60));
        assert_eq!(bound(-1), Duration::from_secs(60));
    }
}
