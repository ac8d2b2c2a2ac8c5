//! Kafka clients: the one place client configs are built, and the client contexts.
//!
//! Every Kafka client of tally starts from [`client_config`]: the pass-through
//! `kafka.client` settings, then `bootstrap.servers`. The binary's commands (topic
//! admin, the traffic producer) call it directly; the aggregator's three clients add
//! their role on top of it:
//! - the transactional producer ([`producer_config`]): `transactional.id`, idempotence,
//!   the transaction timeout, murmur2 partitioning, a message size that fits a side
//!   record of the largest input record;
//! - the group consumer ([`consumer_config`]): read_committed, no auto commit or
//!   offset store, no offset reset (a missing offset is decided by `--start-from`),
//!   cooperative-sticky assignment, partition ends reported;
//! - the restore consumer ([`restore_config`]): group-less (assign, never subscribe,
//!   never commits), read_committed, partition ends reported.
//!
//! Settings tally needs for correctness override the pass-through map; the fetch
//! back-off is only a default ([`default_fetch_backoff`]).
//!
//! # Authentication failures
//! librdkafka retries a refused SASL login or a failed TLS handshake forever, like any
//! broker connection failure: it reports each attempt to the client's error callback
//! (code `Authentication` or `SSL`) and nothing else happens — a transactional
//! producer's `init_transactions` just times out, a producer's messages wait for
//! `message.timeout.ms`, an admin request times out. No retry fixes a wrong password
//! or certificate, so tally stops instead:
//! - every command that talks to Kafka first runs [`check_authentication`], which
//!   returns [`KafkaCheckError::Authentication`] once the cluster refused a login and
//!   no connection got through for [`AUTHENTICATION_GRACE`] (about 3 s in all);
//! - the aggregator's and the sink's consumers stop when `poll` reports such an error
//!   later ([`is_authentication_failure`]), e.g. after a password rotation. librdkafka
//!   also reports a broker that drops a connection in the middle of its SASL handshake
//!   this way, so a broker restarting at that moment can stop a process too; the
//!   process is exactly-once and resumes from its committed state when restarted.
//!
//! The binary exits with its own exit code for these errors, so supervisors and tests
//! tell them from other failures without reading logs.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use tally_core::config::{KafkaConfig, SIDE_TOPIC_EXTRA_BYTES};
use tracing::{debug, error, info, warn};

use crate::settings::AggregatorSettings;

/// A client config with the bootstrap servers and the pass-through settings: the base
/// of every Kafka client tally creates.
pub fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (key, value) in &kafka.client {
        config.set(key, value);
    }
    config.set("bootstrap.servers", &kafka.bootstrap_servers);
    config
}

/// Whether a client error means the cluster refused tally's credentials or the TLS
/// handshake failed: a refused SASL login (librdkafka's `Authentication`, the broker's
/// `SaslAuthenticationFailed`) or a TLS failure (`SSL`: an unknown CA, a host name
/// that does not match the certificate). librdkafka retries these forever; tally
/// stops (see the module docs).
pub fn is_authentication_failure(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::SSL
        )
    )
}

/// Why [`check_authentication`] failed.
#[derive(Debug, thiserror::Error)]
pub enum KafkaCheckError {
    /// The client could not be created (an invalid `kafka.client` setting, an
    /// unreadable `ssl.ca.location`, ...).
    #[error("cannot create a kafka client from the kafka config")]
    Client(#[source] Box<KafkaError>),
    /// The cluster refused the login, or the TLS handshake failed.
    #[error(
        "kafka at {bootstrap_servers} refused the connection's credentials or TLS handshake \
         ({reason}); check kafka.client's security.protocol, sasl.* and ssl.* settings and \
         kafka.sasl_password_file"
    )]
    Authentication {
        /// `kafka.bootstrap_servers`.
        bootstrap_servers: String,
        /// librdkafka's description of the failure.
        reason: String,
        /// librdkafka's error (code `Authentication`, `SaslAuthenticationFailed` or `SSL`).
        #[source]
        source: Box<KafkaError>,
    },
}

/// What [`check_authentication`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaReachability {
    /// A broker answered a metadata request: the connection and its login work.
    Connected,
    /// No broker answered within the timeout, and none refused the login. The
    /// command goes on and its own timeouts and retries apply, as without the check.
    NoAnswer,
}

/// How long [`check_authentication`] keeps trying after the first refused login
/// before it calls the credentials wrong. librdkafka also reports a broker that drops
/// the connection in the middle of the SASL handshake (e.g. while it restarts) as an
/// authentication failure; a later connection that gets through within this time
/// shows the failure was not the credentials'. (librdkafka reports an identical
/// failure of the same broker only once per 30 s, so waiting for a second report
/// would take that long.)
pub const AUTHENTICATION_GRACE: Duration = Duration::from_secs(2);

/// Connects to the cluster with the shared client config and waits, at most
/// `timeout`, for the first metadata answer or a lasting authentication failure
/// (one not followed by a successful connection within [`AUTHENTICATION_GRACE`]).
/// Blocking: call it off the async workers.
pub fn check_authentication(
    kafka: &KafkaConfig,
    timeout: Duration,
) -> Result<KafkaReachability, KafkaCheckError> {
    /// Bound of one metadata request; the error callback is served between them.
    const STEP: Duration = Duration::from_millis(250);
    let producer: BaseProducer<AuthenticationProbe> = client_config(kafka)
        .create_with_context(AuthenticationProbe {
            failure: Mutex::new(None),
        })
        .map_err(|error| KafkaCheckError::Client(Box::new(error)))?;
    let deadline = Instant::now() + timeout;
    let mut refused: Option<(Instant, KafkaError, String)> = None;
    loop {
        let answered = producer.client().fetch_metadata(None, STEP).is_ok();
        // Serves the error events queued meanwhile (the probe's callback records them).
        producer.poll(Duration::ZERO);
        if let Some((source, reason)) = producer.context().take_failure() {
            refused.get_or_insert((Instant::now(), source, reason));
        }
        if answered {
            return Ok(KafkaReachability::Connected);
        }
        let now = Instant::now();
        let lasting = refused
            .as_ref()
            .is_some_and(|(since, _, _)| now.duration_since(*since) >= AUTHENTICATION_GRACE);
        if (lasting || now >= deadline)
            && let Some((_, source, reason)) = refused
        {
            return Err(KafkaCheckError::Authentication {
                bootstrap_servers: kafka.bootstrap_servers.clone(),
                reason,
                source: Box::new(source),
            });
        }
        if now >= deadline {
            warn!(
                bootstrap_servers = %kafka.bootstrap_servers,
                timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                "no kafka broker answered yet"
            );
            return Ok(KafkaReachability::NoAnswer);
        }
        std::thread::sleep(STEP.min(deadline.saturating_duration_since(now)));
    }
}

/// The context of [`check_authentication`]'s client: records the first
/// authentication failure.
struct AuthenticationProbe {
    failure: Mutex<Option<(KafkaError, String)>>,
}

impl AuthenticationProbe {
    fn take_failure(&self) -> Option<(KafkaError, String)> {
        self.failure.lock().ok().and_then(|mut slot| slot.take())
    }
}

impl ClientContext for AuthenticationProbe {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka("connection check", level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error("connection check", &error, reason);
        if is_authentication_failure(&error)
            && let Ok(mut slot) = self.failure.lock()
        {
            slot.get_or_insert((error, reason.to_owned()));
        }
    }
}

impl ProducerContext for AuthenticationProbe {
    type DeliveryOpaque = ();

    fn delivery(&self, _result: &DeliveryResult<'_>, _opaque: ()) {}
}

/// The aggregator's transactional producer.
pub(crate) fn producer_config(settings: &AggregatorSettings) -> ClientConfig {
    let max_message_bytes = settings
        .config
        .topics
        .max_message_bytes
        .saturating_add(SIDE_TOPIC_EXTRA_BYTES);
    let mut config = client_config(&settings.config.kafka);
    config
        .set("transactional.id", settings.transactional_id())
        .set("enable.idempotence", "true")
        .set(
            "transaction.timeout.ms",
            settings.transaction_timeout().as_millis().to_string(),
        )
        .set("partitioner", "murmur2_random")
        .set("message.max.bytes", max_message_bytes.to_string());
    config
}

/// The aggregator's group consumer of the input topic.
pub(crate) fn consumer_config(settings: &AggregatorSettings) -> ClientConfig {
    let mut config = client_config(&settings.config.kafka);
    config
        .set("group.id", &settings.config.aggregator.group_id)
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "error")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("group.protocol", "classic")
        .set("enable.partition.eof", "true");
    default_fetch_backoff(&mut config);
    config
}

/// The consumer that re-reads a partition's input on restore.
pub(crate) fn restore_config(settings: &AggregatorSettings) -> ClientConfig {
    let mut config = client_config(&settings.config.kafka);
    config
        // Never joins the group (assign, not subscribe) and never commits.
        .set(
            "group.id",
            format!("{}.restore", settings.config.aggregator.group_id),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "error");
    default_fetch_backoff(&mut config);
    config
}

/// Sets `fetch.queue.backoff.ms` unless the config does. Once a partition's prefetch
/// queue passes `queued.min.messages` or `queued.max.messages.kbytes`, librdkafka waits
/// this long (default 1 s) before fetching it again; a consumer that drains its queue
/// within that second then sits idle. `benches/e2e_throughput.rs` measured 117 k events/s
/// with the default and 315 k with 10 ms.
pub fn default_fetch_backoff(config: &mut ClientConfig) {
    if config.get("fetch.queue.backoff.ms").is_none() {
        config.set("fetch.queue.backoff.ms", "10");
    }
}

/// Producer callbacks: counts failed deliveries (an aborted transaction purges its
/// messages, which report as failures).
pub(crate) struct ProducerCallbacks {
    failed_deliveries: AtomicU64,
}

impl ProducerCallbacks {
    pub(crate) fn new() -> ProducerCallbacks {
        ProducerCallbacks {
            failed_deliveries: AtomicU64::new(0),
        }
    }
}

impl ClientContext for ProducerCallbacks {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka("producer", level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error("producer", &error, reason);
    }
}

/// Logs a client-level error reported by librdkafka with structured fields.
///
/// librdkafka reports every consumer error event here *and* returns it from `poll`,
/// partition ends included (`enable.partition.eof`), which the default context logs as
/// "Global error: PartitionEOF" at ERROR. A partition end is routine: DEBUG. Fatal
/// errors put data at risk (the process stops): ERROR. Anything else librdkafka
/// retries by itself, and the caller decides whether it matters: WARN.
pub(crate) fn log_client_error(client: &'static str, error: &KafkaError, reason: &str) {
    let code = error.rdkafka_error_code();
    match client_error_level(error) {
        ClientErrorLevel::Routine => debug!(client, reason, "partition end reached"),
        ClientErrorLevel::Fatal => {
            error!(client, code = ?code, %error, reason, "fatal kafka client error");
        }
        ClientErrorLevel::Transient => {
            warn!(client, code = ?code, %error, reason, "kafka client error");
        }
        ClientErrorLevel::Misconfigured => {
            error!(client, code = ?code, %error, reason, "kafka client cannot authenticate");
        }
    }
}

/// How serious a client-level error is (see [`log_client_error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientErrorLevel {
    /// A partition end: logged at DEBUG.
    Routine,
    /// librdkafka retries it; the caller decides whether it matters: WARN.
    Transient,
    /// The client cannot go on and the process stops: ERROR.
    Fatal,
    /// Authentication or TLS failed: librdkafka retries, but no retry fixes a wrong
    /// password or certificate, so nothing is processed until the config changes: ERROR.
    Misconfigured,
}

pub(crate) fn client_error_level(error: &KafkaError) -> ClientErrorLevel {
    match (error, error.rdkafka_error_code()) {
        (KafkaError::PartitionEOF(_), _) | (_, Some(RDKafkaErrorCode::PartitionEOF)) => {
            ClientErrorLevel::Routine
        }
        (_, Some(RDKafkaErrorCode::Fatal | RDKafkaErrorCode::Fenced)) => ClientErrorLevel::Fatal,
        (_, Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)) => {
            ClientErrorLevel::Misconfigured
        }
        _ => ClientErrorLevel::Transient,
    }
}

/// Forwards a librdkafka log line to `tracing` with structured fields, keeping
/// librdkafka's level, except for lines whose error reaches tally another way, which
/// are a WARN:
/// - transaction errors (`TXNERR`): the engine receives every one of them as a return
///   value, aborts and redoes the work, and logs the fatal ones at ERROR itself;
/// - broker connection failures (`FAIL`: connection refused, disconnected, transport
///   failures, all brokers down): librdkafka reconnects by itself and sends the same
///   failure, with its error code, to [`log_client_error`], which keeps authentication
///   and TLS failures at ERROR. A broker restart is not data at risk.
pub(crate) fn log_librdkafka(
    client: &'static str,
    level: RDKafkaLogLevel,
    facility: &str,
    message: &str,
) {
    match librdkafka_level(level, facility) {
        tracing::Level::ERROR => {
            error!(target: "librdkafka", client, facility, message, "librdkafka log");
        }
        tracing::Level::WARN => {
            warn!(target: "librdkafka", client, facility, message, "librdkafka log");
        }
        tracing::Level::INFO => {
            info!(target: "librdkafka", client, facility, message, "librdkafka log");
        }
        _ => debug!(target: "librdkafka", client, facility, message, "librdkafka log"),
    }
}

/// The level a librdkafka log line is logged at (see [`log_librdkafka`]).
pub(crate) fn librdkafka_level(level: RDKafkaLogLevel, facility: &str) -> tracing::Level {
    let reported_elsewhere = facility == "TXNERR" || facility == "FAIL";
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error
            if reported_elsewhere =>
        {
            tracing::Level::WARN
        }
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::Level::ERROR,
        RDKafkaLogLevel::Warning => tracing::Level::WARN,
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => tracing::Level::INFO,
        RDKafkaLogLevel::Debug => tracing::Level::DEBUG,
    }
}

/// The context of the restore consumer: quiet partition ends, structured errors.
pub(crate) struct RestoreContext;

impl ClientContext for RestoreContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka("restore consumer", level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error("restore consumer", &error, reason);
    }
}

impl ConsumerContext for RestoreContext {}

impl ProducerContext for ProducerCallbacks {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _opaque: ()) {
        if let Err((error, _message)) = result {
            self.failed_deliveries.fetch_add(1, Ordering::Relaxed);
            debug!(error = %error, "delivery failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_ends_are_routine_and_only_fatal_client_errors_are_errors() {
        assert_eq!(
            client_error_level(&KafkaError::Global(RDKafkaErrorCode::PartitionEOF)),
            ClientErrorLevel::Routine
        );
        assert_eq!(
            client_error_level(&KafkaError::PartitionEOF(3)),
            ClientErrorLevel::Routine
        );
        assert_eq!(
            client_error_level(&KafkaError::Global(RDKafkaErrorCode::Fatal)),
            ClientErrorLevel::Fatal
        );
        assert_eq!(
            client_error_level(&KafkaError::Global(RDKafkaErrorCode::Fenced)),
            ClientErrorLevel::Fatal
        );
        assert_eq!(
            client_error_level(&KafkaError::Global(
                RDKafkaErrorCode::BrokerTransportFailure
            )),
            ClientErrorLevel::Transient
        );
        assert_eq!(
            client_error_level(&KafkaError::MessageConsumption(
                RDKafkaErrorCode::UnknownTopicOrPartition
            )),
            ClientErrorLevel::Transient
        );
        assert_eq!(
            client_error_level(&KafkaError::Global(RDKafkaErrorCode::AllBrokersDown)),
            ClientErrorLevel::Transient
        );
        assert_eq!(
            client_error_level(&KafkaError::Global(RDKafkaErrorCode::Authentication)),
            ClientErrorLevel::Misconfigured
        );
    }

    #[test]
    fn refused_logins_and_tls_failures_are_authentication_failures_and_nothing_else() {
        for code in [
            RDKafkaErrorCode::Authentication,
            RDKafkaErrorCode::SaslAuthenticationFailed,
            RDKafkaErrorCode::SSL,
        ] {
            assert!(is_authentication_failure(&KafkaError::Global(code)));
            assert!(is_authentication_failure(&KafkaError::MessageConsumption(
                code
            )));
        }
        for code in [
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::OperationTimedOut,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::Fatal,
            RDKafkaErrorCode::PartitionEOF,
        ] {
            assert!(!is_authentication_failure(&KafkaError::Global(code)));
        }
        assert!(!is_authentication_failure(&KafkaError::PartitionEOF(1)));
    }

    #[test]
    fn broker_connection_failures_and_transaction_errors_log_as_warnings() {
        use tracing::Level;
        // librdkafka logs a refused or dropped broker connection as FAIL at LOG_ERR;
        // FAIL and TXNERR are reported through the error callbacks too, so their log
        // lines are warnings at any severity from LOG_ERR up. Other facilities keep
        // librdkafka's severity.
        let cases = [
            (RDKafkaLogLevel::Error, "FAIL", Level::WARN),
            (RDKafkaLogLevel::Error, "TXNERR", Level::WARN),
            (RDKafkaLogLevel::Critical, "FAIL", Level::WARN),
            (RDKafkaLogLevel::Emerg, "TXNERR", Level::WARN),
            (RDKafkaLogLevel::Error, "SSL", Level::ERROR),
            (RDKafkaLogLevel::Error, "SASL", Level::ERROR),
            (RDKafkaLogLevel::Alert, "SASL", Level::ERROR),
            (RDKafkaLogLevel::Warning, "FAIL", Level::WARN),
            (RDKafkaLogLevel::Notice, "FAIL", Level::INFO),
            (RDKafkaLogLevel::Info, "FAIL", Level::INFO),
            (RDKafkaLogLevel::Debug, "FAIL", Level::DEBUG),
        ];
        for (level, facility, expected) in cases {
            assert_eq!(
                librdkafka_level(level, facility),
                expected,
                "{level:?} {facility}"
            );
        }
    }
}
