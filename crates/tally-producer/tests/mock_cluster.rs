//! The producer against librdkafka's in-process mock cluster (tier 2: wiring, not a
//! proof of Kafka's guarantees).

use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use tally_core::codec::{Decoded, decode_record};
use tally_core::event::{TickOrigin, UsageTick};
use tally_producer::test_support::{client_config, consume_all, rand_test_topic};
use tally_producer::{ProduceError, ProducerOptions, UsageProducer};

#[test]
fn sends_ticks_to_the_partition_asked_for() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let bootstrap = cluster.bootstrap_servers();
    let topic = rand_test_topic();
    cluster.create_topic(&topic, 2, 1).expect("create topic");
    let producer = UsageProducer::new(&client_config(&bootstrap), ProducerOptions::new(&topic))
        .expect("producer");
    let tick = UsageTick {
        tick_time_ms: 1_735_689_660_000,
        origin: TickOrigin::Gateway,
    };
    producer
        .send_tick(1, &tick, 1_735_689_661_000)
        .expect("send tick");
    producer
        .flush_blocking(Duration::from_secs(10))
        .expect("flush");
    let consumed = consume_all(&bootstrap, &topic, 2, 1);
    assert_eq!(consumed.len(), 1);
    let (partition, key, value, timestamp) = &consumed[0];
    assert_eq!(
        (*partition, key.is_none(), *timestamp),
        (1, true, 1_735_689_661_000)
    );
    assert_eq!(decode_record(value), Ok(Decoded::Tick(tick)));
}

#[test]
fn flush_reports_records_that_could_not_be_delivered() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let topic = rand_test_topic();
    cluster.create_topic(&topic, 1, 1).expect("create topic");
    cluster.broker_down(1).expect("broker down");
    let mut base = client_config(&cluster.bootstrap_servers());
    base.set("message.timeout.ms", "500");
    let producer = UsageProducer::new(&base, ProducerOptions::new(&topic)).expect("producer");
    producer
        .send_raw(Some(b"tenant-00001"), b"payload", 1_735_689_600_000)
        .expect("enqueue");
    let error = producer
        .flush_blocking(Duration::from_secs(20))
        .expect_err("delivery failed");
    assert!(
        matches!(
            error,
            ProduceError::Delivery {
                failed: 1,
                enqueued: 1,
                ..
            }
        ),
        "{error:?}"
    );
    // Failures are sticky: a later flush with nothing in flight still reports them.
    assert!(matches!(
        producer.flush_blocking(Duration::from_secs(1)),
        Err(ProduceError::Delivery { .. })
    ));
}

#[test]
fn send_waits_for_room_in_a_full_queue_then_gives_up() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let topic = rand_test_topic();
    cluster.create_topic(&topic, 1, 1).expect("create topic");
    cluster.broker_down(1).expect("broker down");
    let mut options = ProducerOptions::new(&topic);
    options.max_queued_messages = 10;
    options.queue_full_timeout = Duration::from_millis(300);
    let producer = UsageProducer::new(&client_config(&cluster.bootstrap_servers()), options)
        .expect("producer");
    for _ in 0..10 {
        producer
            .send_raw(Some(b"tenant-00001"), b"payload", 0)
            .expect("room in the queue");
    }
    let started = Instant::now();
    let error = producer
        .send_raw(Some(b"tenant-00001"), b"payload", 0)
        .expect_err("queue full");
    let waited = started.elapsed();
    assert!(matches!(error, ProduceError::QueueFull { .. }), "{error:?}");
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "waited {waited:?}"
    );
}
