//! Producers and consumers deploy apart: a projection built with the
//! gauge events up to version 2 keeps running while the producer starts
//! emitting a new event type and a version 3 of one it knows; events its
//! enum retired or split are read as what they stand for today.

use std::time::Duration;

use serde_json::{Value, json};
use tidings::Envelope;
use tidings::RawEnvelope;
use tidings::kafka::KafkaConfig;
use tidings::projection::ApplyError;
use tidings::projection::{
    IgnoredEvents, NewerVersions, Projection, Runner, RunnerConfig, UnknownTypes, projection_status,
};
use tidings_tests::gauges::{
    GaugeEvent, GaugeView, GaugeWith, create_gauge_view, gauge_runner, one_partition_topic,
    produce, spawn_runner,
};
use tidings_tests::{TestDb, brokers, wait_until};

fn envelope(id: &str, sequence: u64, event_type: &str, version: u32, payload: Value) -> String {
    RawEnvelope {
        event_type: event_type.into(),
        event_version: version,
        event_id: uuid::Uuid::now_v7(),
        timestamp: tidings::now_micros(),
        aggregate_type: "gauge".into(),
        aggregate_id: id.into(),
        sequence,
        correlation_id: None,
        causation_id: None,
        metadata: Default::default(),
        payload,
    }
    .to_json()
}

/// g-1 gets a new event type between two known events; g-2 a version 3
/// between two version 2 events.
async fn produce_mixed(topic: &str, producer: &rdkafka::producer::FutureProducer) {
    for (id, sequence, event_type, version, payload) in [
        ("g-1", 1, "Set", 2, json!({"value": 5})),
        ("g-2", 1, "Set", 2, json!({"value": 1})),
        ("g-1", 2, "Calibrated", 1, json!({"offset": 0.5})),
        ("g-2", 2, "Set", 3, json!({"value": 2, "unit": "kW"})),
        ("g-1", 3, "Set", 2, json!({"value": 7})),
        ("g-2", 3, "Set", 2, json!({"value": 3})),
    ] {
        let value = envelope(id, sequence, event_type, version, payload);
        produce(producer, topic, id, &value).await;
    }
}

async fn gauge(db: &TestDb, id: &str) -> Option<(i64, i64)> {
    sqlx::query_as("SELECT value, events FROM gauge_view WHERE id = $1")
        .bind(id)
        .fetch_optional(&db.pool)
        .await
        .unwrap()
}

async fn parked_of(db: &TestDb, id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tidings_parked WHERE aggregate_id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

fn runner(
    db: &TestDb,
    prefix: &str,
    config: impl FnOnce(RunnerConfig) -> RunnerConfig,
) -> Runner<GaugeView> {
    let config = config(RunnerConfig::new(KafkaConfig::new(brokers())).topic_prefix(prefix));
    Runner::new(db.pool.clone(), GaugeView, config).unwrap()
}

/// The projection's status shows one event skipped unread (of
/// `event_type` v`version`, for `reason`), one dead letter and one event
/// parked behind it.
async fn assert_status(db: &TestDb, topic: &str, event_type: &str, version: i32, reason: &str) {
    let status = projection_status(
        &db.pool,
        &KafkaConfig::new(brokers()),
        GaugeView.name(),
        &[topic.to_owned()],
    )
    .await
    .unwrap();
    assert_eq!(
        status.ignored,
        vec![IgnoredEvents {
            event_type: event_type.into(),
            event_version: version,
            reason: reason.into(),
            events: 1,
        }]
    );
    assert_eq!((status.dead_lettered, status.parked), (1, 1), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_event_type_parks_no_stream_and_a_newer_version_parks_its_own() {
    let db = TestDb::new().await;
    create_gauge_view(&db).await;
    let (prefix, topic, producer) = one_partition_topic().await;
    let (stop, task) = spawn_runner(runner(&db, &prefix, |c| c));
    produce_mixed(&topic, &producer).await;

    wait_until(
        "g-1 past its unknown event, g-2 parked",
        Duration::from_secs(60),
        async || gauge(&db, "g-1").await == Some((7, 2)) && parked_of(&db, "g-2").await == 2,
    )
    .await;
    assert_eq!(
        parked_of(&db, "g-1").await,
        0,
        "the new type parked its stream"
    );
    assert_eq!(
        gauge(&db, "g-2").await,
        Some((1, 1)),
        "g-2 went past its version 3"
    );
    assert_status(&db, &topic, "Calibrated", 1, "unknown type").await;
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policies_turned_around_dead_letter_the_new_type_and_skip_the_newer_version() {
    let db = TestDb::new().await;
    create_gauge_view(&db).await;
    let (prefix, topic, producer) = one_partition_topic().await;
    let (stop, task) = spawn_runner(runner(&db, &prefix, |c| {
        c.unknown_types(UnknownTypes::DeadLetter)
            .newer_versions(NewerVersions::Skip)
    }));
    produce_mixed(&topic, &producer).await;

    wait_until(
        "g-2 past its version 3, g-1 parked",
        Duration::from_secs(60),
        async || gauge(&db, "g-2").await == Some((3, 2)) && parked_of(&db, "g-1").await == 2,
    )
    .await;
    assert_eq!(gauge(&db, "g-1").await, Some((5, 1)));
    assert_eq!(parked_of(&db, "g-2").await, 0);
    assert_status(&db, &topic, "Set", 3, "newer version").await;
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_event_is_skipped_and_a_split_one_applies_as_its_parts_in_order() {
    let db = TestDb::new().await;
    create_gauge_view(&db).await;
    let (prefix, topic, producer) = one_partition_topic().await;
    let (stop, task) = spawn_runner(runner(&db, &prefix, |c| c));
    for (id, sequence, event_type, version, payload) in [
        ("g-1", 1, "Set", 2, json!({"value": 5})),
        ("g-1", 2, "SetTwice", 1, json!({"first": 6, "second": 8})),
        ("g-1", 3, "Reset", 1, json!({})),
        ("g-2", 1, "SetTwice", 1, json!({"first": 1, "second": 2})),
        ("g-1", 4, "Set", 2, json!({"value": 9})),
    ] {
        let value = envelope(id, sequence, event_type, version, payload);
        produce(&producer, &topic, id, &value).await;
    }

    // g-1: 5, then 6 and 8 from the split, the reset dropped, then 9: four
    // events applied; g-2 ends on the split's second value.
    wait_until(
        "both gauges past their split and retired events",
        Duration::from_secs(60),
        async || gauge(&db, "g-1").await == Some((9, 4)) && gauge(&db, "g-2").await == Some((2, 2)),
    )
    .await;
    assert_eq!(parked_of(&db, "g-1").await + parked_of(&db, "g-2").await, 0);
    let last: i64 = sqlx::query_scalar(
        "SELECT last_sequence FROM tidings_projection_streams WHERE projection = $1 AND aggregate_id = 'g-1'",
    )
    .bind(GaugeView.name())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(last, 4, "positions count stored events, not the parts read");
    let status = projection_status(
        &db.pool,
        &KafkaConfig::new(brokers()),
        GaugeView.name(),
        std::slice::from_ref(&topic),
    )
    .await
    .unwrap();
    assert_eq!(
        status.ignored,
        vec![IgnoredEvents {
            event_type: "Reset".into(),
            event_version: 1,
            reason: "retired".into(),
            events: 1,
        }]
    );
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// A split event whose second part the projection refuses (or panics on):
/// the whole stored event is dead-lettered, none of its parts applied,
/// what follows it in its stream parked; other streams go on.
async fn a_refused_part_dead_letters_its_whole_split_event(refuse: fn() -> Result<(), ApplyError>) {
    let db = TestDb::new().await;
    create_gauge_view(&db).await;
    let (prefix, topic, producer) = one_partition_topic().await;
    let projection = GaugeWith(
        move |envelope: &Envelope<GaugeEvent>| match envelope.payload {
            GaugeEvent::Set { value: 8 } => refuse(),
            _ => Ok(()),
        },
    );
    let (stop, task) = gauge_runner(&db, &prefix, projection);
    for (id, sequence, event_type, version, payload) in [
        ("g-1", 1, "Set", 2, json!({"value": 5})),
        ("g-1", 2, "SetTwice", 1, json!({"first": 6, "second": 8})),
        ("g-2", 1, "SetTwice", 1, json!({"first": 1, "second": 2})),
        ("g-1", 3, "Set", 2, json!({"value": 9})),
    ] {
        let value = envelope(id, sequence, event_type, version, payload);
        produce(&producer, &topic, id, &value).await;
    }
    wait_until(
        "g-1's split dead-lettered, the event after it parked, g-2 applied",
        Duration::from_secs(60),
        async || parked_of(&db, "g-1").await == 2 && gauge(&db, "g-2").await == Some((2, 2)),
    )
    .await;
    assert_eq!(
        gauge(&db, "g-1").await,
        Some((5, 1)),
        "no part of the refused split was applied"
    );
    let parked: Vec<(i64, bool)> = sqlx::query_as(
        "SELECT sequence, dead_letter FROM tidings_parked WHERE aggregate_id = 'g-1' ORDER BY sequence",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(parked, [(2, true), (3, false)]);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_part_of_a_split_event_dead_letters_the_whole_stored_event() {
    a_refused_part_dead_letters_its_whole_split_event(|| Err(ApplyError::permanent("refused")))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_a_part_of_a_split_event_dead_letters_the_whole_stored_event() {
    a_refused_part_dead_letters_its_whole_split_event(|| panic!("a part it cannot take")).await;
}
