//! Plumbing: a fresh database with the migrations applied, and keyed messages
//! through the real broker with the idempotent producer and a consumer group.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tidings_tests::{TestDb, create_topic, kafka_config, unique};

#[tokio::test]
async fn migrations_create_the_tidings_tables() {
    let db = TestDb::new().await;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_name LIKE 'tidings_%' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        tables,
        [
            "tidings_checkpoints",
            "tidings_dlq_skipped",
            "tidings_events",
            "tidings_outbox",
            "tidings_outbox_dead",
            "tidings_parked",
            "tidings_projection_ignored",
            "tidings_projection_streams",
            "tidings_projections",
            "tidings_snapshots"
        ]
    );
}

#[tokio::test]
async fn the_broker_keeps_pipelined_idempotent_sends_in_order_per_key() {
    let topic = create_topic("smoke", 3).await;
    let producer: FutureProducer = kafka_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .unwrap();

    let keys = ["ORD-1", "ORD-2", "ORD-3", "ORD-4", "ORD-5"];
    let per_key = 20;
    // Pipelined, as the relay sends: many messages in flight per partition
    // at once, so order rests on the broker honouring the idempotent
    // producer's sequence numbers, not on one send at a time.
    let values: Vec<(&str, String)> = (0..per_key)
        .flat_map(|i| keys.iter().map(move |key| (*key, format!("{key}:{i}"))))
        .collect();
    let mut deliveries = Vec::new();
    for (key, value) in &values {
        deliveries.push(producer.send(
            FutureRecord::to(&topic).key(*key).payload(value),
            Duration::from_secs(10),
        ));
    }
    for delivery in futures::future::join_all(deliveries).await {
        delivery.map_err(|(e, _)| e).expect("delivery");
    }

    let consumer: StreamConsumer = kafka_config()
        .set("group.id", unique("smoke_group"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();

    let mut seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut partition_of: BTreeMap<String, i32> = BTreeMap::new();
    let total = keys.len() * per_key;
    let mut received = 0;
    while received < total {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("all messages consumed within 30 s")
            .expect("a message");
        let key = std::str::from_utf8(message.key().unwrap())
            .unwrap()
            .to_owned();
        let value = std::str::from_utf8(message.payload().unwrap()).unwrap();
        let (value_key, index) = value.split_once(':').unwrap();
        assert_eq!(value_key, key, "the value travels with its key");
        let previous = partition_of.insert(key.clone(), message.partition());
        assert!(
            previous.is_none_or(|p| p == message.partition()),
            "one key, one partition"
        );
        seen.entry(key).or_default().push(index.parse().unwrap());
        received += 1;
    }
    consumer
        .commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
        .unwrap();

    for key in keys {
        assert_eq!(
            seen[key],
            (0..per_key).collect::<Vec<_>>(),
            "order of key {key}"
        );
    }
}

#[test]
fn a_listening_socket_is_told_apart_by_its_process() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    assert!(tidings_tests::listens_on(std::process::id(), port));
    // Another process (here: PID 1) does not hold it.
    assert!(!tidings_tests::listens_on(1, port));
    drop(listener);
    assert!(!tidings_tests::listens_on(std::process::id(), port));
}
