//! Generated traffic through the producer against librdkafka's in-process mock cluster
//! (tier 2: wiring, not a proof of Kafka's guarantees).

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, Timestamp};
use rdkafka::mocking::MockCluster;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tally_gen::generator::{Generator, GeneratorConfig};
use tally_gen::{GenError, ProduceOptions, produce_blocking};
use tally_producer::{ProducerOptions, UsageProducer};

fn rand_test_topic() -> String {
    format!("usage.events-{:08x}", rand::random::<u32>())
}

fn client_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    config
}

/// A consumed record: partition, key, value, create time.
type Consumed = (i32, Option<Vec<u8>>, Vec<u8>, i64);

/// Reads `expected` records from every partition of `topic`, from the beginning.
fn consume_all(bootstrap: &str, topic: &str, partitions: i32, expected: usize) -> Vec<Consumed> {
    let consumer: BaseConsumer = client_config(bootstrap)
        .set("group.id", "tally-gen-test")
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
    let deadline = Instant::now() + Duration::from_secs(30);
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

#[test]
fn generated_records_land_in_their_partitions_with_their_timestamps() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let bootstrap = cluster.bootstrap_servers();
    let topic = rand_test_topic();
    cluster.create_topic(&topic, 4, 1).expect("create topic");
    let producer = UsageProducer::new(&client_config(&bootstrap), ProducerOptions::new(&topic))
        .expect("producer");
    let config = GeneratorConfig {
        count: 3_000,
        partitions: 4,
        tenants: 20,
        ..GeneratorConfig::default()
    };

    let mut reports = Vec::new();
    let truth = produce_blocking(
        config.clone(),
        &producer,
        &ProduceOptions::default(),
        |report| reports.push(*report),
    )
    .expect("produce");
    assert!(truth.complete && truth.is_conserved());
    assert_eq!(truth.produced, 3_000);
    let last = reports.last().expect("a final report");
    assert!(last.finished && last.produced == 3_000 && last.delivered == 3_000 && last.failed == 0);

    let consumed = consume_all(&bootstrap, &topic, 4, 3_000);
    assert_eq!(consumed.len(), 3_000);
    let generated: Vec<_> = Generator::new(config).expect("valid config").collect();
    for partition in 0..4_u32 {
        let expected: Vec<_> = generated
            .iter()
            .filter(|record| record.partition == partition)
            .map(|record| {
                (
                    record.key.clone(),
                    record.value.clone(),
                    record.timestamp_ms,
                )
            })
            .collect();
        let actual: Vec<_> = consumed
            .iter()
            .filter(|(p, ..)| *p == partition as i32)
            .map(|(_, key, value, timestamp)| (key.clone(), value.clone(), *timestamp))
            .collect();
        assert_eq!(
            actual, expected,
            "partition {partition}: murmur2 routing and per-partition order"
        );
    }
}

#[test]
fn refuses_a_topic_whose_partition_count_differs() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let topic = rand_test_topic();
    cluster.create_topic(&topic, 3, 1).expect("create topic");
    let producer = UsageProducer::new(
        &client_config(&cluster.bootstrap_servers()),
        ProducerOptions::new(&topic),
    )
    .expect("producer");
    let config = GeneratorConfig {
        count: 10,
        partitions: 4,
        ..GeneratorConfig::default()
    };
    let error = produce_blocking(config, &producer, &ProduceOptions::default(), |_| {})
        .expect_err("mismatch");
    assert!(
        matches!(
            error,
            GenError::PartitionCountMismatch {
                expected: 4,
                actual: 3,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(producer.delivery_stats().enqueued, 0, "nothing produced");
}
