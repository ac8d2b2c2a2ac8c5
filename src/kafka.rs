//! Kafka client settings shared by every command: the one builder lives in
//! [`tally_aggregator::kafka::client_config`], which the aggregator's own clients
//! start from too.

pub(crate) use tally_aggregator::kafka::client_config;
