//! Fault scenarios over the whole pipeline (store → outbox → relay → broker
//! → projection), each printing committed, published, applied, lost,
//! duplicated, out-of-order and dead-lettered counts. Lost and out of order
//! must be 0. Sizes grow with `TIDINGS_FAULT_SCALE`.
//!
//! PostgreSQL restarting is in `faults_postgres.rs`, a test binary of its
//! own, since it disturbs every database of the server.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use tidings::kafka::KafkaConfig;
use tidings::projection::{Runner, RunnerConfig};
use tidings::relay::{Relay, RelayConfig};
use tidings::{RawEnvelope, Store};
use tidings_tests::pipeline::{
    Counter, CounterView, committed, figures, scale, settle, wait_applied, write,
};
use tidings_tests::{
    OwnBroker, TestDb, brokers, consume_from, outbox_depth, prefixed_store, published, tidings_bin,
};
use tokio::sync::watch;

struct Stopper(watch::Sender<bool>);

impl Stopper {
    fn new() -> Self {
        Stopper(watch::channel(false).0)
    }
    fn signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }
    fn stop(&self) {
        let _ = self.0.send(true);
    }
}

fn prefix_of(store: &Store) -> String {
    store
        .topic_of::<Counter>()
        .trim_end_matches("counters")
        .to_owned()
}

fn runner(db: &TestDb, store: &Store, brokers: &str) -> Runner<CounterView> {
    let config = RunnerConfig::new(KafkaConfig::new(brokers))
        .topic_prefix(prefix_of(store))
        .max_backoff(Duration::from_secs(2));
    Runner::new(db.pool.clone(), CounterView, config).unwrap()
}

fn relay(db: &TestDb, brokers: &str) -> Relay {
    let config =
        RelayConfig::new(KafkaConfig::new(brokers)).delivery_timeout(Duration::from_secs(3));
    Relay::new(db.pool.clone(), config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_killed_repeatedly_while_commands_stream_in() {
    let db = TestDb::new().await;
    CounterView::create_table(&db.pool).await;
    let store = prefixed_store(&db);
    let stopper = Stopper::new();
    let projection = tokio::spawn(runner(&db, &store, &brokers()).run(stopper.signal()));
    let spawn = || {
        std::process::Command::new(tidings_bin())
            .args(["relay", "--batch-size", "20"])
            .env("DATABASE_URL", db.url())
            .env("KAFKA_BROKERS", brokers())
            .env("RUST_LOG", "error")
            .spawn()
            .map(tidings_tests::Spawned::from)
            .unwrap()
    };
    let writer = {
        let store = store.clone();
        tokio::spawn(
            async move { write(&store, 30, 4, 600 * scale(), Duration::from_millis(2)).await },
        )
    };
    let mut child = spawn();
    let mut kills = 0;
    // Commands written after the main writer finished, so that every kill
    // lands while commands still stream in.
    let mut extra: Option<tokio::task::JoinHandle<_>> = None;
    while !writer.is_finished() || kills < 3 {
        // Each kill lands mid-run: this relay published since it started,
        // and rows are waiting or commands are still being written (a relay
        // that keeps up leaves the outbox empty between two commands).
        let at_spawn = published(&db.pool).await;
        let started = std::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(20 + fastrand::u64(0..100))).await;
            let streaming =
                !writer.is_finished() || extra.as_ref().is_some_and(|w| !w.is_finished());
            if published(&db.pool).await > at_spawn
                && (streaming || outbox_depth(&db.pool).await > 0)
            {
                break;
            }
            if !streaming {
                if let Some(done) = extra.take() {
                    done.await.unwrap();
                }
                let store = store.clone();
                extra = Some(tokio::spawn(async move {
                    write(&store, 30, 2, 60, Duration::from_millis(2)).await
                }));
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the relay published nothing after it started"
            );
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the relay exited on its own before the kill: {:?}",
            child.try_wait()
        );
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        child = spawn();
    }
    writer.await.unwrap();
    if let Some(extra) = extra {
        extra.await.unwrap();
    }
    let figures = settle(&store, &brokers()).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the last relay exited on its own: {:?}",
        child.try_wait()
    );
    child.kill().unwrap();
    child.wait().unwrap();
    figures.assert_sound(&format!(
        "relay SIGKILLed {kills} times, each while publishing with rows waiting"
    ));
    stopper.stop();
    projection.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_stopped_and_restarted_under_the_whole_pipeline() {
    let mut broker = OwnBroker::start().await;
    let db = TestDb::new().await;
    CounterView::create_table(&db.pool).await;
    let store = prefixed_store(&db);
    let stopper = Stopper::new();
    let relay = relay(&db, &broker.address);
    let stats = relay.stats();
    let relay_task = tokio::spawn(relay.run(stopper.signal()));
    let runner_task = tokio::spawn(runner(&db, &store, &broker.address).run(stopper.signal()));
    let writer = {
        let store = store.clone();
        tokio::spawn(
            async move { write(&store, 20, 2, 400 * scale(), Duration::from_millis(5)).await },
        )
    };
    use std::sync::atomic::Ordering::Relaxed;
    let started = std::time::Instant::now();
    while stats.published.load(Relaxed) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "nothing published"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!writer.is_finished(), "the stop lands mid-run");
    broker.kill();
    // Away until deliveries failed (past the 3 s delivery timeout).
    let started = std::time::Instant::now();
    while stats.failed.load(Relaxed) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no delivery failed with the broker down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.resume();
    writer.await.unwrap();
    settle(&store, &broker.address)
        .await
        .assert_sound("broker killed and restarted");
    stopper.stop();
    relay_task.await.unwrap().unwrap();
    runner_task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_storm_on_few_aggregates() {
    let db = TestDb::new().await;
    CounterView::create_table(&db.pool).await;
    let store = Store::with_config(
        db.pool.clone(),
        tidings::StoreConfig::default()
            .topic_prefix(prefix_of(&prefixed_store(&db)))
            .max_conflict_retries(1000),
    );
    let stopper = Stopper::new();
    let relay_task = tokio::spawn(relay(&db, &brokers()).run(stopper.signal()));
    let runner_task = tokio::spawn(runner(&db, &store, &brokers()).run(stopper.signal()));
    write(&store, 3, 24, 240 * scale(), Duration::ZERO).await;
    let conflicts = store
        .stats()
        .conflicts
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(conflicts > 0, "24 writers on 3 aggregates must conflict");
    let total = committed(&db.pool).await;
    assert_eq!(total as usize, 240 * scale(), "every command landed once");
    settle(&store, &brokers())
        .await
        .assert_sound(&format!("conflict storm ({conflicts} conflicts retried)"));
    stopper.stop();
    relay_task.await.unwrap().unwrap();
    runner_task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_a_topic_is_dead_lettered_without_blocking_anyone() {
    let db = TestDb::new().await;
    CounterView::create_table(&db.pool).await;
    let store = prefixed_store(&db);
    let topic = store.topic_of::<Counter>();
    let stopper = Stopper::new();
    // An unknown type is skipped by default (tests/tests/evolution.rs);
    // here it is bad input to dead-letter like the rest.
    let config = RunnerConfig::new(KafkaConfig::new(brokers()))
        .topic_prefix(prefix_of(&store))
        .max_message_bytes(64 * 1024)
        .unknown_types(tidings::projection::UnknownTypes::DeadLetter);
    let runner_task = tokio::spawn(
        Runner::new(db.pool.clone(), CounterView, config)
            .unwrap()
            .run(stopper.signal()),
    );
    let relay_task = tokio::spawn(relay(&db, &brokers()).run(stopper.signal()));
    tidings::kafka::ensure_topics(
        &KafkaConfig::new(brokers()),
        &[topic.clone()].into(),
        &Default::default(),
    )
    .await
    .unwrap();

    let envelope =
        |id: &str, event_type: &str, version: u32, payload: serde_json::Value| RawEnvelope {
            event_type: event_type.into(),
            event_version: version,
            event_id: uuid::Uuid::now_v7(),
            timestamp: tidings::now_micros(),
            aggregate_type: "counter".into(),
            aggregate_id: id.into(),
            sequence: 1,
            correlation_id: None,
            causation_id: None,
            metadata: BTreeMap::new(),
            payload,
        };
    let random: Vec<u8> = (0..512).map(|_| fastrand::u8(..)).collect();
    let bad: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        ("BAD-RANDOM", "counter", random, "malformed envelope"),
        (
            "BAD-TRUNCATED",
            "counter",
            br#"{"event_type":"Added","event_version":1,"event_id":"#.to_vec(),
            "malformed envelope",
        ),
        (
            "BAD-SHAPE",
            "counter",
            br#"{"hello": ["valid", "json", "wrong", "shape"]}"#.to_vec(),
            "malformed envelope",
        ),
        (
            "BAD-PAYLOAD",
            "counter",
            envelope("BAD-PAYLOAD", "Added", 1, json!({"amount": "ten"}))
                .to_json()
                .into_bytes(),
            "payload does not match",
        ),
        (
            "BAD-TYPE",
            "counter",
            envelope("BAD-TYPE", "Subtracted", 1, json!({}))
                .to_json()
                .into_bytes(),
            "unknown event type",
        ),
        (
            "BAD-FUTURE",
            "counter",
            envelope("BAD-FUTURE", "Added", 7, json!({"amount": 1}))
                .to_json()
                .into_bytes(),
            "newer than the current version",
        ),
        (
            "BAD-HUGE",
            "counter",
            envelope(
                "BAD-HUGE",
                "Added",
                1,
                json!({"amount": 1, "pad": "x".repeat(70_000)}),
            )
            .to_json()
            .into_bytes(),
            "exceeds the limit",
        ),
    ];
    let producer: FutureProducer = tidings_tests::kafka_config()
        .set("message.max.bytes", "2000000")
        .create()
        .unwrap();
    for (key, aggregate_type, value, _) in &bad {
        let headers = OwnedHeaders::new().insert(Header {
            key: "aggregate_type",
            value: Some(*aggregate_type),
        });
        producer
            .send(
                FutureRecord::to(&topic)
                    .key(*key)
                    .payload(value)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    // Wrong headers on a good event: the envelope decides, the event applies.
    let good = envelope("GOOD-HEADERS", "Added", 1, json!({"amount": 5})).to_json();
    let wrong = OwnedHeaders::new()
        .insert(Header {
            key: "aggregate_type",
            value: Some("something-else"),
        })
        .insert(Header {
            key: "event_type",
            value: Some("Nonsense"),
        });
    producer
        .send(
            FutureRecord::to(&topic)
                .key("GOOD-HEADERS")
                .payload(&good)
                .headers(wrong),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    // Meanwhile, commands on other aggregates keep flowing.
    write(&store, 5, 1, 50, Duration::ZERO).await;
    let committed: i64 = sqlx::query_scalar("SELECT count(*) FROM tidings_events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    wait_applied(&db.pool, committed as u64 + 1, Duration::from_secs(60)).await;

    let mut parked = Vec::new();
    for _ in 0..100 {
        parked = tidings::projection::list_parked(&db.pool, Some("counter_view"))
            .await
            .unwrap();
        if parked.len() == bad.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(parked.len(), bad.len(), "{parked:#?}");
    for (key, _, _, reason) in &bad {
        let p = parked
            .iter()
            .find(|p| p.aggregate_id == *key)
            .unwrap_or_else(|| panic!("{key} not dead-lettered"));
        assert!(
            p.dead_letter && p.reason.contains(reason),
            "{key}: {}",
            p.reason
        );
    }
    let messages = consume_from(
        &brokers(),
        &topic,
        committed as usize,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    // GOOD-HEADERS was produced directly, not through the store: check it,
    // then leave it out of the figures.
    let good: i64 =
        sqlx::query_scalar("DELETE FROM counter_view WHERE id = 'GOOD-HEADERS' RETURNING total")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(good, 5, "wrong headers: the envelope decides");
    let figures = figures(&store, &messages).await;
    figures.assert_sound("bad input on a topic");
    assert_eq!(figures.dead_lettered, bad.len() as u64);
    stopper.stop();
    relay_task.await.unwrap().unwrap();
    runner_task.await.unwrap().unwrap();
}

#[tokio::test]
async fn bad_input_at_the_edges_gets_clear_errors() {
    let db = TestDb::new().await;
    let config = RunnerConfig::new(KafkaConfig::new(brokers()));
    struct Named(&'static str);
    #[async_trait::async_trait]
    impl tidings::projection::Projection for Named {
        type Event = tidings_tests::pipeline::CounterEvent;
        fn name(&self) -> &str {
            self.0
        }
        async fn apply(
            &self,
            _: &mut sqlx::PgConnection,
            _: &tidings::Envelope<Self::Event>,
        ) -> Result<(), tidings::projection::ApplyError> {
            Ok(())
        }
        async fn reset(
            &self,
            _: &mut sqlx::PgConnection,
        ) -> Result<(), tidings::projection::ApplyError> {
            Ok(())
        }
    }
    let error = Runner::new(db.pool.clone(), Named("order summary!"), config.clone()).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("invalid projection name `order summary!`"),
        "{error}"
    );
    let error = Runner::new(
        db.pool.clone(),
        Named("ok"),
        config.clone().topic_prefix("bad prefix "),
    )
    .unwrap_err();
    assert!(error.to_string().contains("invalid topic name"), "{error}");
    let error = Runner::new(
        db.pool.clone(),
        Named("ok"),
        RunnerConfig::new(KafkaConfig::new(" ")),
    )
    .unwrap_err();
    assert!(
        matches!(error, tidings::Error::Config(_)) && error.to_string().contains("KAFKA_BROKERS"),
        "a blank broker list is refused naming the setting: {error}"
    );
    let error = Relay::new(db.pool.clone(), RelayConfig::new(KafkaConfig::new(" "))).unwrap_err();
    assert!(error.to_string().contains("KAFKA_BROKERS"), "{error}");
    let unmigrated = TestDb::empty().await;
    let error = tidings::store::outbox_status(&unmigrated.pool)
        .await
        .unwrap_err();
    assert!(matches!(error, tidings::Error::NotMigrated), "{error}");
    let error = KafkaConfig::new("").client_config().unwrap_err();
    assert!(error.to_string().contains("KAFKA_BROKERS"), "{error}");
}
