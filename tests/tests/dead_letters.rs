//! Dead letters, bad input, transient errors and fencing, against real
//! PostgreSQL and the real broker: dead letters sent after their batch
//! committed, refused copies recorded, faithful copies; bad input
//! dead-lettered rather than skipped or parked wrongly; a transient error
//! retried on its partition alone; a runner on a replaced generation fenced.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use tidings::Envelope;
use tidings::kafka::KafkaConfig;
use tidings::projection::ApplyError;
use tidings::projection::{Runner, RunnerConfig, list_parked, redrive_stream};
use tidings_tests::gauges::{
    GaugeEvent, GaugeView, GaugeWith, create_gauge_view, gauge_runner, one_partition_topic,
    produce, spawn_runner, v1, v1_padded,
};
use tidings_tests::{TestDb, brokers, consume, create_topic_named, wait_until};

async fn events_of(db: &TestDb, id: &str) -> i64 {
    sqlx::query_scalar("SELECT events FROM gauge_view WHERE id = $1")
        .bind(id)
        .fetch_optional(&db.pool)
        .await
        .unwrap()
        .unwrap_or(0)
}

/// A v1 envelope of gauge `id` whose value makes the upcaster panic, with
/// `pad` bytes of metadata.
fn poison(id: &str, sequence: u64, pad: usize) -> String {
    v1_padded(id, sequence, "not a number", pad)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_the_topic_refuses_for_good_is_recorded_and_holds_up_nothing() {
    let db = TestDb::new().await;
    create_gauge_view(&db).await;
    let (prefix, topic, producer) = one_partition_topic().await;
    produce(&producer, &topic, "g-1", &poison("g-1", 1, 3000)).await;
    for sequence in 1..=3 {
        produce(&producer, &topic, "g-2", &v1("g-2", sequence, "7")).await;
    }
    // The dead letter producer may send at most 2,000 bytes: the copy of
    // the poison (over 3,000) is refused by the client, for good.
    let kafka = KafkaConfig::new(brokers()).set("message.max.bytes", "2000");
    let runner = Runner::new(
        db.pool.clone(),
        GaugeView,
        RunnerConfig::new(kafka).topic_prefix(&prefix),
    )
    .unwrap();
    let stats = runner.stats();
    let (stop, task) = spawn_runner(runner);
    wait_until(
        "the events behind the poison apply",
        Duration::from_secs(30),
        async || events_of(&db, "g-2").await == 3,
    )
    .await;
    wait_until(
        "the refusal is recorded",
        Duration::from_secs(30),
        async || stats.dead_letter_failures.load(Relaxed) == 1,
    )
    .await;
    let parked = list_parked(&db.pool, Some("gauge_view")).await.unwrap();
    assert_eq!(parked.len(), 1, "{parked:#?}");
    let error = parked[0].dlq_error.as_deref().unwrap_or_default();
    assert!(error.contains("too large"), "{error}");
    let status = tidings::projection::projection_status(
        &db.pool,
        &KafkaConfig::new(brokers()),
        "gauge_view",
        &[],
    )
    .await
    .unwrap();
    assert_eq!((status.dead_lettered, status.undeliverable), (1, 1));
    assert_eq!(status.lag(), 0, "the partition moved past it");
    // Not retried: the counter stays at one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(stats.dead_letter_failures.load(Relaxed), 1);
    assert_eq!(stats.dead_letters_sent.load(Relaxed), 0);
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_waiting_for_its_topic_holds_up_nothing_and_arrives_byte_for_byte() {
    let db = TestDb::new().await;
    create_gauge_view(&db).await;
    let (prefix, topic, producer) = one_partition_topic().await;
    // Headers no text column could keep: binary, and a repeated key.
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "bin",
            value: Some(&[0xff, 0x00, 0xfe][..]),
        })
        .insert(Header {
            key: "dup",
            value: Some("a"),
        })
        .insert(Header {
            key: "dup",
            value: Some("b"),
        });
    let value = poison("g-1", 1, 0);
    producer
        .send(
            FutureRecord::to(&topic)
                .key("g-1")
                .payload(&value)
                .headers(headers),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    for sequence in 1..=3 {
        produce(&producer, &topic, "g-2", &v1("g-2", sequence, "7")).await;
    }
    // The dead letter topic does not exist and the runner may not create
    // it: no copy can be delivered for now.
    let config = RunnerConfig::new(KafkaConfig::new(brokers()))
        .topic_prefix(&prefix)
        .create_topics(false);
    let runner = Runner::new(db.pool.clone(), GaugeView, config).unwrap();
    let stats = runner.stats();
    let (stop, task) = spawn_runner(runner);
    wait_until(
        "the events behind the poison apply",
        Duration::from_secs(20),
        async || events_of(&db, "g-2").await == 3,
    )
    .await;
    let unsent: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tidings_parked WHERE dead_letter AND dlq_sent_at IS NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(unsent, 1, "recorded, waiting to be sent");
    assert_eq!(stats.dead_letters_sent.load(Relaxed), 0);

    let dlq = format!("{prefix}gauge_view.dlq");
    create_topic_named(&dlq, 1).await;
    let copies = consume(&dlq, 1, Duration::from_millis(500), Duration::from_secs(60)).await;
    assert_eq!(copies.len(), 1, "one copy");
    let copy = &copies[0];
    assert_eq!(copy.key, "g-1");
    assert_eq!(copy.value, value);
    assert_eq!(
        copy.raw_headers[..3],
        [
            ("bin".to_owned(), Some(vec![0xff, 0x00, 0xfe])),
            ("dup".to_owned(), Some(b"a".to_vec())),
            ("dup".to_owned(), Some(b"b".to_vec())),
        ],
        "the original headers, in order, byte for byte"
    );
    let header = |key: &str| {
        copy.headers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header("tidings.dlq.generation").as_deref(), Some("1"));
    assert_eq!(header("tidings.dlq.offset").as_deref(), Some("0"));
    assert!(
        header("tidings.dlq.reason").is_some_and(|r| r.contains("panicked")),
        "{:?}",
        copy.headers
    );
    wait_until(
        "the copy is marked sent",
        Duration::from_secs(10),
        async || stats.dead_letters_sent.load(Relaxed) == 1,
    )
    .await;
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_of_zero_or_beyond_i64_are_dead_lettered_not_skipped() {
    let db = TestDb::new().await;
    create_gauge_view(&db).await;
    let (prefix, topic, producer) = one_partition_topic().await;
    produce(&producer, &topic, "g-1", &v1("g-1", 0, "1")).await;
    produce(&producer, &topic, "g-2", &v1("g-2", u64::MAX, "1")).await;
    produce(&producer, &topic, "g-3", &v1("g-3", 1, "1")).await;
    let (stop, task) = gauge_runner(&db, &prefix, GaugeView);
    wait_until("g-3 applies", Duration::from_secs(30), async || {
        events_of(&db, "g-3").await == 1
    })
    .await;
    let parked = list_parked(&db.pool, Some("gauge_view")).await.unwrap();
    let dead: Vec<_> = parked
        .iter()
        .filter(|p| p.dead_letter && p.reason.contains("invalid sequence"))
        .map(|p| p.aggregate_id.as_str())
        .collect();
    assert_eq!(dead, ["g-1", "g-2"], "{parked:#?}");
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applied_duplicate_that_no_longer_decodes_does_not_park_its_stream() {
    let db = TestDb::new().await;
    create_gauge_view(&db).await;
    let (prefix, topic, producer) = one_partition_topic().await;
    produce(&producer, &topic, "g-1", &v1("g-1", 1, "5")).await;
    // Sequence 1 again, as the relay republishes it, but unreadable now.
    produce(&producer, &topic, "g-1", &poison("g-1", 1, 0)).await;
    produce(&producer, &topic, "g-1", &v1("g-1", 2, "6")).await;
    let (stop, task) = gauge_runner(&db, &prefix, GaugeView);
    wait_until(
        "g-1's second event applies",
        Duration::from_secs(30),
        async || events_of(&db, "g-1").await == 2,
    )
    .await;
    let parked = list_parked(&db.pool, Some("gauge_view")).await.unwrap();
    assert!(parked.is_empty(), "{parked:#?}");
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

/// The gauges, panicking while applying gauge `g-1`.
fn panicky() -> GaugeWith<impl Fn(&Envelope<GaugeEvent>) -> Result<(), ApplyError> + Send + Sync> {
    GaugeWith(|envelope: &Envelope<GaugeEvent>| {
        assert_ne!(envelope.aggregate_id, "g-1", "g-1 is not supported");
        Ok(())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_catches_a_panic_and_keeps_the_event_parked_with_why() {
    let db = TestDb::new().await;
    create_gauge_view(&db).await;
    let (prefix, topic, producer) = one_partition_topic().await;
    produce(&producer, &topic, "g-1", &v1("g-1", 1, "5")).await;
    produce(&producer, &topic, "g-1", &v1("g-1", 2, "6")).await;
    let (stop, task) = gauge_runner(&db, &prefix, panicky());
    wait_until("both parked", Duration::from_secs(30), async || {
        list_parked(&db.pool, Some("gauge_view"))
            .await
            .unwrap()
            .len()
            == 2
    })
    .await;
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    let report = redrive_stream(&db.pool, &panicky(), "gauge", "g-1")
        .await
        .expect("a panic while re-driving is the event's reason, not the re-drive's end");
    assert_eq!((report.applied, report.still_parked), (0, 2));
    let parked = list_parked(&db.pool, Some("gauge_view")).await.unwrap();
    assert!(
        parked[0].dead_letter
            && parked[0].reason.contains("applying panicked")
            && parked[0].reason.contains("g-1 is not supported"),
        "{parked:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_gap_is_dead_lettered_and_its_stream_parked() {
    let db = TestDb::new().await;
    create_gauge_view(&db).await;
    let (prefix, topic, producer) = one_partition_topic().await;
    produce(&producer, &topic, "g-1", &v1("g-1", 1, "1")).await;
    produce(&producer, &topic, "g-1", &v1("g-1", 3, "3")).await; // 2 is missing
    produce(&producer, &topic, "g-1", &v1("g-1", 4, "4")).await;
    produce(&producer, &topic, "g-2", &v1("g-2", 1, "1")).await;
    let (stop, task) = gauge_runner(&db, &prefix, GaugeView);
    wait_until("g-2 applies", Duration::from_secs(30), async || {
        events_of(&db, "g-2").await == 1
    })
    .await;
    wait_until("the gap is parked", Duration::from_secs(30), async || {
        list_parked(&db.pool, Some("gauge_view"))
            .await
            .unwrap()
            .len()
            == 2
    })
    .await;
    let parked = list_parked(&db.pool, Some("gauge_view")).await.unwrap();
    assert!(
        parked[0].dead_letter
            && parked[0].sequence == Some(3)
            && parked[0].reason.contains("sequence gap: expected 2"),
        "{parked:#?}"
    );
    assert!(!parked[1].dead_letter && parked[1].sequence == Some(4));
    assert_eq!(
        events_of(&db, "g-1").await,
        1,
        "nothing after the gap applied"
    );
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_to_copy_travels_without_its_value_and_says_so() {
    let db = TestDb::new().await;
    create_gauge_view(&db).await;
    let (prefix, topic, producer) = one_partition_topic().await;
    // 950 kB: under the runner's 1 MiB limit (it is read and refused), over
    // the 900 kB a copy carries.
    let value = poison("g-1", 1, 950_000);
    producer
        .send(
            FutureRecord::to(&topic).key("g-1").payload(&value),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let (stop, task) = gauge_runner(&db, &prefix, GaugeView);
    let dlq = format!("{prefix}gauge_view.dlq");
    let copies = consume(&dlq, 1, Duration::from_millis(500), Duration::from_secs(60)).await;
    assert_eq!(copies.len(), 1);
    assert!(copies[0].value.is_empty(), "the value was not copied");
    assert!(
        copies[0]
            .headers
            .iter()
            .any(|(k, v)| k == "tidings.dlq.value_omitted" && v.contains("tidings_parked")),
        "{:?}",
        copies[0].headers
    );
    let kept: Option<i32> = sqlx::query_scalar("SELECT length(value) FROM tidings_parked")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        kept,
        Some(value.len() as i32),
        "the value is kept in PostgreSQL"
    );
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_error_retries_its_partition_alone_and_applies_once_healed() {
    let db = TestDb::new().await;
    create_gauge_view(&db).await;
    let prefix = format!("{}.", tidings_tests::unique("t"));
    let topic = format!("{prefix}gauges");
    create_topic_named(&topic, 2).await;
    let producer: rdkafka::producer::FutureProducer =
        tidings_tests::kafka_config().create().unwrap();
    let send = async |partition: i32, id: &str, sequence: u64| {
        let value = v1(id, sequence, "1");
        producer
            .send(
                FutureRecord::to(&topic)
                    .partition(partition)
                    .key(id)
                    .payload(&value),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    };
    send(0, "g-1", 1).await;
    for sequence in 1..=5 {
        send(1, "g-2", sequence).await;
    }
    let healed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let config = RunnerConfig::new(KafkaConfig::new(brokers()))
        .topic_prefix(&prefix)
        .max_backoff(Duration::from_millis(300));
    // Fails transiently on gauge `g-1` until healed.
    let flaky = {
        let healed = std::sync::Arc::clone(&healed);
        GaugeWith(move |envelope: &Envelope<GaugeEvent>| {
            if envelope.aggregate_id == "g-1" && !healed.load(Relaxed) {
                return Err(ApplyError::Transient("the lock timed out".into()));
            }
            Ok(())
        })
    };
    let runner = Runner::new(db.pool.clone(), flaky, config).unwrap();
    let stats = runner.stats();
    let (stop, task) = spawn_runner(runner);
    wait_until(
        "the other partition goes on",
        Duration::from_secs(30),
        async || events_of(&db, "g-2").await == 5 && stats.retries.load(Relaxed) >= 2,
    )
    .await;
    assert_eq!(events_of(&db, "g-1").await, 0, "rolled back each time");
    for sequence in 6..=8 {
        send(1, "g-2", sequence).await;
    }
    wait_until("still going on", Duration::from_secs(30), async || {
        events_of(&db, "g-2").await == 8
    })
    .await;
    healed.store(true, Relaxed);
    wait_until(
        "g-1 applies once healed",
        Duration::from_secs(30),
        async || events_of(&db, "g-1").await == 1,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        events_of(&db, "g-1").await,
        1,
        "applied once, whatever the retries"
    );
    assert!(
        list_parked(&db.pool, Some("gauge_view"))
            .await
            .unwrap()
            .is_empty()
    );
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_left_on_a_replaced_generation_applies_nothing_and_rebuilds() {
    let db = TestDb::new().await;
    create_gauge_view(&db).await;
    let (prefix, topic, producer) = one_partition_topic().await;
    produce(&producer, &topic, "g-1", &v1("g-1", 1, "1")).await;
    // This runner would not notice a replay by itself for an hour: only
    // the fence (its batches checked against the generation) can stop it.
    let mut config = RunnerConfig::new(KafkaConfig::new(brokers())).topic_prefix(&prefix);
    config.generation_check = Duration::from_secs(3600);
    let runner = Runner::new(db.pool.clone(), GaugeView, config).unwrap();
    let stats = runner.stats();
    let (stop, task) = spawn_runner(runner);
    wait_until("g-1 applies", Duration::from_secs(30), async || {
        events_of(&db, "g-1").await == 1
    })
    .await;
    let generation = tidings::projection::replay(&db.pool, &GaugeView)
        .await
        .unwrap();
    assert_eq!(generation, 2);
    assert_eq!(events_of(&db, "g-1").await, 0, "reset");
    // The next message reaches the runner still on generation 1.
    produce(&producer, &topic, "g-2", &v1("g-2", 1, "1")).await;
    wait_until(
        "rebuilt under generation 2",
        Duration::from_secs(30),
        async || events_of(&db, "g-1").await == 1 && events_of(&db, "g-2").await == 1,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        (events_of(&db, "g-1").await, events_of(&db, "g-2").await),
        (1, 1),
        "each event once"
    );
    assert_eq!(
        stats.applied.load(Relaxed),
        3,
        "g-1 twice (once per generation), g-2 once"
    );
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}
