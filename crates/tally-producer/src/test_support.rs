//! Scaffolding for the tests that run against librdkafka's in-process mock cluster
//! (this crate's and `tally-gen`'s `tests/mock_cluster.rs`): random topic names, a
//! client config for the cluster, and a consumer that reads a topic back.
//!
//! Not part of the producer's API: it is compiled only with the `test-support` feature,
//! which only dev-dependencies enable, and is hidden from the docs. It panics on any
//! failure, as a test helper does.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, Timestamp};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Bound of [`consume_all`]'s wait for the records it expects.
pub const CONSUME_TIMEOUT: Duration = Duration::from_secs(30);

/// A topic name no other test uses.
pub fn rand_test_topic() -> String {
    format!("usage.events-{:08x}", rand::random::<u32>())
}

/// A client config pointing at `bootstrap` (the mock cluster's address).
pub fn client_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    config
}

/// A consumed record: partition, key, value, create time.
pub type Consumed = (i32, Option<Vec<u8>>, Vec<u8>, i64);

/// Reads `expected` records from every partition of `topic`, from the beginning, or
/// what arrived within [`CONSUME_TIMEOUT`]. The consumer is assigned the partitions
/// (no group membership, no commits).
pub fn consume_all(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    expected: usize,
) -> Vec<Consumed> {
    let consumer: BaseConsumer = client_config(bootstrap)
        .set("group.id", "tally-mock-cluster-test")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .expect("assignment");
    }
    consumer.assign(&assignment).expect("assign");
    let deadline = Instant::now() + CONSUME_TIMEOUT;
    let mut records = Vec::new();
    while records.len() < expected && Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.expect("consume");
        let Timestamp::CreateTime(timestamp) = message.timestamp() else {
            panic!("records carry their create time");
        };
        records.push((
            message.partition(),
            message.key().map(<[u8]>::to_vec),
            message.payload().unwrap_or_default().to_vec(),
            timestamp,
        ));
    }
    records
}
