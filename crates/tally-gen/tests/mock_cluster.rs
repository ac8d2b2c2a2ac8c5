//! Generated traffic through the producer against librdkafka's in-process mock cluster
//! (tier 2: wiring, not a proof of Kafka's guarantees).

use rdkafka::mocking::MockCluster;
use tally_gen::generator::{Generator, GeneratorConfig};
use tally_gen::{GenError, ProduceOptions, produce_blocking};
use tally_producer::test_support::{client_config, consume_all, rand_test_topic};
use tally_producer::{ProducerOptions, UsageProducer};

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
