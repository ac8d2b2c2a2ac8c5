//! Kafka client settings shared by every command: the one builder lives in
//! [`tally_aggregator::kafka::client_config`], which the aggregator's own clients
//! and the sink's consumer start from too.
//!
//! Before a command talks to Kafka, [`check_authentication`] connects once with that
//! config: a cluster that refuses the login (a wrong SASL password or user) or the TLS
//! handshake (an unknown CA) stops the command within about one connection attempt,
//! with exit code [`EXIT_KAFKA_AUTHENTICATION`], instead of librdkafka retrying
//! forever. A cluster that does not answer at all is left to the command's own
//! timeouts, as before.

use std::time::Duration;

use anyhow::Context;
use rdkafka::error::KafkaError;
use tally_aggregator::kafka::{KafkaCheckError, is_authentication_failure};
use tally_core::config::Config;

pub(crate) use tally_aggregator::kafka::client_config;

/// Exit code of a command stopped because the Kafka cluster refused its credentials
/// or TLS handshake (sysexits' `EX_CONFIG`: the config must change, a restart alone
/// does not help).
pub(crate) const EXIT_KAFKA_AUTHENTICATION: u8 = 78;

/// How long [`check_authentication`] waits for the cluster's first answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects with the shared client config and fails on an authentication or TLS
/// failure (see the module docs).
pub(crate) async fn check_authentication(config: &Config) -> anyhow::Result<()> {
    let kafka = config.kafka.clone();
    tokio::task::spawn_blocking(move || {
        tally_aggregator::kafka::check_authentication(&kafka, CHECK_TIMEOUT)
    })
    .await
    .context("kafka connection check failed")??;
    Ok(())
}

/// Whether `error` stopped a command because Kafka refused its credentials or TLS
/// handshake, wherever in the command it happened.
pub(crate) fn is_authentication_error(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<KafkaCheckError>(),
            Some(KafkaCheckError::Authentication { .. })
        ) || cause
            .downcast_ref::<KafkaError>()
            .is_some_and(is_authentication_failure)
    })
}

#[cfg(test)]
mod tests {
    use rdkafka::error::RDKafkaErrorCode;

    use super::*;

    #[test]
    fn authentication_errors_are_found_anywhere_in_the_chain() {
        let checked = anyhow::Error::new(KafkaCheckError::Authentication {
            bootstrap_servers: "127.0.0.1:9093".to_owned(),
            reason: "invalid credentials".to_owned(),
            source: Box::new(KafkaError::Global(RDKafkaErrorCode::Authentication)),
        });
        assert!(is_authentication_error(&checked));

        let later = anyhow::Error::new(KafkaError::MessageConsumption(RDKafkaErrorCode::SSL))
            .context("sink failed");
        assert!(is_authentication_error(&later));

        let unreachable = anyhow::Error::new(KafkaError::Global(RDKafkaErrorCode::AllBrokersDown))
            .context("sink failed");
        assert!(!is_authentication_error(&unreachable));
        assert!(!is_authentication_error(&anyhow::anyhow!("config invalid")));
    }
}
