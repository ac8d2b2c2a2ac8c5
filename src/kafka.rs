//! Kafka client settings shared by every command.

use rdkafka::ClientConfig;
use tally_core::config::KafkaConfig;

/// A client config with the bootstrap servers and the pass-through settings.
pub(crate) fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (key, value) in &kafka.client {
        config.set(key, value);
    }
    config.set("bootstrap.servers", &kafka.bootstrap_servers);
    config
}
