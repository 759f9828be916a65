//! Projections against real PostgreSQL and the real broker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use sqlx::PgConnection;
use tidings::kafka::KafkaConfig;
use tidings::projection::{
    ApplyError, Projection, Runner, RunnerConfig, RunnerStats, redrive, replay,
};
use tidings::relay::{Relay, RelayConfig};
use tidings::{Envelope, RawEnvelope};
use tidings_examples::orders::{Order, OrderCommand, OrderEvent, OrderStatus};
use tidings_examples::summary::OrderSummary;
use tidings_tests::{
    TestDb, brokers, consume, kafka_config, store_with_prefix, unique, wait_until as wait_for,
};
use tokio::sync::oneshot;

struct Running {
    stop: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<tidings::Result<()>>,
    stats: Arc<RunnerStats>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.handle.await.unwrap().unwrap();
    }
}

fn start<P: Projection>(db: &TestDb, projection: P, prefix: &str) -> Running {
    start_configured(db, projection, prefix, |c| c)
}

/// [`start`] with settings of the test's own on top.
fn start_configured<P: Projection>(
    db: &TestDb,
    projection: P,
    prefix: &str,
    configure: impl FnOnce(RunnerConfig) -> RunnerConfig,
) -> Running {
    let config = configure(
        RunnerConfig::new(KafkaConfig::new(brokers()))
            .topic_prefix(prefix)
            .batch_size(100)
            .max_backoff(Duration::from_millis(500)),
    );
    let runner = Runner::new(db.pool.clone(), projection, config).unwrap();
    let stats = runner.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(runner.run(async move {
        let _ = stopped.await;
    }));
    Running {
        stop,
        handle,
        stats,
    }
}

fn start_relay(
    db: &TestDb,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<tidings::Result<()>>,
) {
    let relay = Relay::new(
        db.pool.clone(),
        RelayConfig::new(KafkaConfig::new(brokers())),
    )
    .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    (
        stop,
        tokio::spawn(relay.run(async move {
            let _ = stopped.await;
        })),
    )
}

fn expected_row(id: &str, order: &Order, sequence: u64) -> (String, String, String, i32) {
    let status = match order.status {
        OrderStatus::Paid => "paid",
        OrderStatus::Cancelled => "cancelled",
        _ => "created",
    };
    (
        id.to_owned(),
        status.to_owned(),
        order.currency.clone(),
        sequence as i32,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_model_matches_the_store_despite_duplicates_and_replays_identically() {
    let db = TestDb::new().await;
    let (store, prefix) = store_with_prefix(&db);
    let topic = store.topic_of::<Order>();
    let summary = OrderSummary::default();
    summary.create_table(&db.pool).await.unwrap();

    let ids: Vec<String> = (0..40).map(|i| format!("ORD-{i:02}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let amount = 10.0 + i as f64;
        store
            .execute::<Order>(
                id,
                OrderCommand::Create {
                    order_id: id.clone(),
                    user_id: format!("U{}", i % 3),
                    amount,
                    currency: "EUR".into(),
                },
            )
            .await
            .unwrap();
        match i % 3 {
            0 => {
                store
                    .execute::<Order>(
                        id,
                        OrderCommand::Pay {
                            payment_id: format!("P{i}"),
                            amount,
                        },
                    )
                    .await
                    .unwrap();
            }
            1 => {
                store
                    .execute::<Order>(
                        id,
                        OrderCommand::Cancel {
                            reason: "changed mind".into(),
                        },
                    )
                    .await
                    .unwrap();
            }
            _ => {}
        }
    }
    let (relay_stop, relay) = start_relay(&db);

    // Inject duplicates: the first 20 streams produced a second time.
    let producer: FutureProducer = kafka_config().create().unwrap();
    let mut duplicates = 0;
    for id in &ids[..20] {
        for envelope in store.read_stream("order", id).await.unwrap() {
            let value = envelope.to_json();
            producer
                .send(
                    FutureRecord::to(&topic).key(id.as_str()).payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
            duplicates += 1;
        }
    }

    let running = start(&db, summary.clone(), &prefix);
    let total: u64 = {
        let mut n = 0;
        for id in &ids {
            n += store.load::<Order>(id).await.unwrap().sequence;
        }
        n
    };
    let stats = Arc::clone(&running.stats);
    wait_for("every event applied", Duration::from_secs(60), async || {
        stats.applied.load(Ordering::Relaxed) >= total
            && stats.skipped.load(Ordering::Relaxed) >= duplicates
    })
    .await;

    let rows = summary.rows(&db.pool).await.unwrap();
    let mut expected = Vec::new();
    for id in &ids {
        let loaded = store.load::<Order>(id).await.unwrap();
        expected.push(expected_row(id, &loaded.state, loaded.sequence));
    }
    let got: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.order_id.clone(),
                r.status.clone(),
                r.currency.clone(),
                r.events_applied,
            )
        })
        .collect();
    assert_eq!(
        got, expected,
        "the read model equals the store, each event applied once"
    );
    assert_eq!(running.stats.applied.load(Ordering::Relaxed), total);

    let status = tidings::projection::projection_status(
        &db.pool,
        &KafkaConfig::new(brokers()),
        "order_summary",
        std::slice::from_ref(&topic),
    )
    .await
    .unwrap();
    assert_eq!(status.lag(), 0, "{status:?}");
    assert_eq!(status.generation, 1);

    // Replay: reset and rebuild from the beginning of the topic. The
    // read model is emptied and every event applied once more, under
    // generation 2 (a replay that only bumped the generation would leave
    // the rows as they were and apply nothing).
    let applied_before = running.stats.applied.load(Ordering::Relaxed);
    let generation = replay(&db.pool, &summary).await.unwrap();
    assert_eq!(generation, 2);
    let right_after = summary.rows(&db.pool).await.unwrap();
    assert!(
        right_after.len() < rows.len(),
        "the replay reset the read model ({} of {} rows right after it)",
        right_after.len(),
        rows.len()
    );
    wait_for(
        "the replay rebuilt the read model",
        Duration::from_secs(60),
        async || {
            stats.applied.load(Ordering::Relaxed) >= applied_before + total
                && summary.rows(&db.pool).await.unwrap() == rows
        },
    )
    .await;
    assert_eq!(
        running.stats.applied.load(Ordering::Relaxed),
        applied_before + total,
        "each event applied once more, no more"
    );
    let status = tidings::projection::projection_status(
        &db.pool,
        &KafkaConfig::new(brokers()),
        "order_summary",
        std::slice::from_ref(&topic),
    )
    .await
    .unwrap();
    assert_eq!((status.generation, status.lag()), (2, 0), "{status:?}");
    running.stop().await;
    relay_stop.send(()).unwrap();
    relay.await.unwrap().unwrap();
}

/// The summary, refusing payments `P-BAD` until fixed.
struct Strict {
    inner: OrderSummary,
    fixed: Arc<AtomicBool>,
}

#[async_trait]
impl Projection for Strict {
    type Event = OrderEvent;
    fn name(&self) -> &str {
        "strict_summary"
    }
    async fn apply(
        &self,
        conn: &mut PgConnection,
        envelope: &Envelope<OrderEvent>,
    ) -> Result<(), ApplyError> {
        if let OrderEvent::PaymentProcessed { payment_id, .. } = &envelope.payload
            && !self.fixed.load(Ordering::Relaxed)
        {
            if payment_id == "P-BAD" {
                return Err(ApplyError::permanent(
                    "payment P-BAD is not known to the ledger",
                ));
            }
            assert_ne!(payment_id, "P-PANIC", "a handler bug");
        }
        self.inner.apply(conn, envelope).await
    }
    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ApplyError> {
        self.inner.reset(conn).await
    }
}

fn raw(
    id: &str,
    sequence: u64,
    event_type: &str,
    version: u32,
    payload: serde_json::Value,
) -> RawEnvelope {
    RawEnvelope {
        event_type: event_type.into(),
        event_version: version,
        event_id: uuid::Uuid::now_v7(),
        timestamp: tidings::now_micros(),
        aggregate_type: "order".into(),
        aggregate_id: id.into(),
        sequence,
        correlation_id: None,
        causation_id: None,
        metadata: BTreeMap::new(),
        payload,
    }
}

async fn produce(producer: &FutureProducer, topic: &str, key: &str, value: &[u8]) {
    let headers = OwnedHeaders::new().insert(Header {
        key: "aggregate_type",
        value: Some("order"),
    });
    producer
        .send(
            FutureRecord::to(topic)
                .key(key)
                .payload(value)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_are_dead_lettered_their_streams_parked_then_redriven_in_order() {
    let db = TestDb::new().await;
    let prefix = format!("{}.", unique("t"));
    let topic = format!("{prefix}orders");
    tidings::kafka::ensure_topics(
        &KafkaConfig::new(brokers()),
        &[topic.clone()].into(),
        &tidings::kafka::TopicSpec::default(),
    )
    .await
    .unwrap();
    let summary = OrderSummary::default();
    summary.create_table(&db.pool).await.unwrap();
    let fixed = Arc::new(AtomicBool::new(false));
    let producer: FutureProducer = kafka_config().create().unwrap();

    let created = |id: &str| {
        raw(
            id,
            1,
            "OrderCreated",
            2,
            json!({"order_id": id, "user_id": "U", "amount": 5.0, "currency": "EUR"}),
        )
    };
    let paid = |id: &str, seq, payment: &str| {
        raw(
            id,
            seq,
            "PaymentProcessed",
            1,
            json!({"payment_id": payment, "amount": 5.0}),
        )
    };
    let mut messages: Vec<(String, Vec<u8>)> = vec![
        ("ORD-A".into(), created("ORD-A").to_json().into_bytes()),
        (
            "ORD-A".into(),
            paid("ORD-A", 2, "P-BAD").to_json().into_bytes(),
        ), // handler refuses
        (
            "ORD-A".into(),
            raw("ORD-A", 3, "OrderCancelled", 1, json!({"reason": "x"}))
                .to_json()
                .into_bytes(),
        ),
        ("ORD-B".into(), created("ORD-B").to_json().into_bytes()),
        (
            "ORD-B".into(),
            paid("ORD-B", 2, "P-OK").to_json().into_bytes(),
        ),
        ("ORD-F".into(), created("ORD-F").to_json().into_bytes()),
        // The handler panics on this one.
        (
            "ORD-F".into(),
            paid("ORD-F", 2, "P-PANIC").to_json().into_bytes(),
        ),
        (
            "ORD-C".into(),
            b"{\"event_type\": \"OrderCreated\", trunc".to_vec(),
        ), // truncated JSON
        (
            "ORD-D".into(),
            raw("ORD-D", 1, "OrderShipped", 1, json!({}))
                .to_json()
                .into_bytes(),
        ), // unknown type
        (
            "ORD-E".into(),
            raw("ORD-E", 1, "OrderCreated", 9, json!({}))
                .to_json()
                .into_bytes(),
        ), // future version
        // An old version still on the topic: OrderCreated v1 had no currency.
        (
            "ORD-OLD".into(),
            raw(
                "ORD-OLD",
                1,
                "OrderCreated",
                1,
                json!({"order_id": "ORD-OLD", "user_id": "U", "amount": 7.0}),
            )
            .to_json()
            .into_bytes(),
        ),
    ];
    // The same key always lands in the same partition, so order per stream holds.
    for (key, value) in messages.drain(..) {
        produce(&producer, &topic, &key, &value).await;
    }

    // Unknown types are skipped by default (tests/tests/evolution.rs); here
    // they are configured to be dead-lettered like any poison.
    let running = start_configured(
        &db,
        Strict {
            inner: summary.clone(),
            fixed: Arc::clone(&fixed),
        },
        &prefix,
        |c| c.unknown_types(tidings::projection::UnknownTypes::DeadLetter),
    );
    let stats = Arc::clone(&running.stats);
    wait_for(
        "good events applied, poison dead-lettered",
        Duration::from_secs(60),
        // ORD-A's third event is parked behind its poison: it may come in
        // a later batch than the counters above, so it is waited for too.
        async || {
            stats.applied.load(Ordering::Relaxed) >= 5
                && stats.dead_lettered.load(Ordering::Relaxed) >= 5
                && stats.parked.load(Ordering::Relaxed) >= 1
        },
    )
    .await;

    let rows: BTreeMap<String, (String, String, i32)> = summary
        .rows(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.order_id, (r.status, r.currency, r.events_applied)))
        .collect();
    assert_eq!(
        rows["ORD-A"],
        ("created".into(), "EUR".into(), 1),
        "ORD-A stops before its poison"
    );
    assert_eq!(
        rows["ORD-B"],
        ("paid".into(), "EUR".into(), 2),
        "other aggregates keep flowing"
    );
    assert_eq!(
        rows["ORD-OLD"],
        ("created".into(), "USD".into(), 1),
        "v1 from the topic arrives upcast"
    );

    let mut parked = tidings::projection::list_parked(&db.pool, Some("strict_summary"))
        .await
        .unwrap();
    parked.sort_by(|a, b| (&a.aggregate_id, a.id).cmp(&(&b.aggregate_id, b.id)));
    let summary_of: Vec<(&str, Option<i64>, bool)> = parked
        .iter()
        .map(|p| (p.aggregate_id.as_str(), p.sequence, p.dead_letter))
        .collect();
    assert_eq!(
        summary_of,
        [
            ("ORD-A", Some(2), true),
            ("ORD-A", Some(3), false),
            ("ORD-C", None, true),
            ("ORD-D", Some(1), true),
            ("ORD-E", Some(1), true),
            ("ORD-F", Some(2), true)
        ]
    );
    assert!(
        parked[0].reason.contains("P-BAD is not known"),
        "{}",
        parked[0].reason
    );
    assert!(
        parked[2].reason.contains("malformed envelope"),
        "{}",
        parked[2].reason
    );
    assert!(
        parked[3]
            .reason
            .contains("unknown event type `OrderShipped`"),
        "{}",
        parked[3].reason
    );
    assert!(
        parked[4].reason.contains("newer than the current version"),
        "{}",
        parked[4].reason
    );
    assert!(
        parked[5].reason.contains("the projection panicked"),
        "{}",
        parked[5].reason
    );

    // The dead letter topic carries each poison message with why and whence.
    let dead = consume(
        &format!("{prefix}strict_summary.dlq"),
        5,
        Duration::from_secs(1),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(dead.len(), 5);
    let dead_a = dead
        .iter()
        .find(|m| m.key == "ORD-A")
        .expect("ORD-A dead-lettered");
    let first: BTreeMap<_, _> = dead_a.headers.iter().cloned().collect();
    assert_eq!(first["tidings.dlq.projection"], "strict_summary");
    assert_eq!(first["tidings.dlq.topic"], topic);
    assert!(first["tidings.dlq.reason"].contains("P-BAD"));
    assert_eq!(first["tidings.dlq.offset"], parked[0].offset.to_string());
    assert_eq!(
        first["tidings.dlq.partition"],
        parked[0].partition.to_string()
    );

    // Fix the cause, re-drive: ORD-A's parked events apply in order; the
    // unreadable ones stay parked. A second re-drive changes nothing.
    fixed.store(true, Ordering::Relaxed);
    let strict = Strict {
        inner: summary.clone(),
        fixed: Arc::clone(&fixed),
    };
    let report = redrive(&db.pool, &strict).await.unwrap();
    assert_eq!((report.applied, report.still_parked), (3, 3), "{report:?}");
    let again = redrive(&db.pool, &strict).await.unwrap();
    assert_eq!((again.applied, again.still_parked), (0, 3));
    let a = summary
        .rows(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.order_id == "ORD-A")
        .unwrap();
    assert_eq!(
        (a.status.as_str(), a.payment_id.as_deref(), a.events_applied),
        ("cancelled", Some("P-BAD"), 3)
    );

    // ORD-A flows again: a new event is applied live.
    produce(
        &producer,
        &topic,
        "ORD-A",
        raw("ORD-A", 4, "OrderCancelled", 1, json!({"reason": "again"}))
            .to_json()
            .as_bytes(),
    )
    .await;
    let stats = Arc::clone(&running.stats);
    wait_for("ORD-A flows again", Duration::from_secs(30), async || {
        stats.applied.load(Ordering::Relaxed) >= 6
    })
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_partitions_and_a_killed_one_loses_and_repeats_nothing() {
    let orders = 60usize;
    let db = TestDb::new().await;
    let (store, prefix) = store_with_prefix(&db);
    let summary = OrderSummary::default();
    summary.create_table(&db.pool).await.unwrap();
    let (relay_stop, relay) = start_relay(&db);
    let logs = std::env::temp_dir().join(unique("runner_logs"));
    std::fs::create_dir_all(&logs).unwrap();

    let spawned = std::cell::Cell::new(0);
    let spawn = |name: &str| {
        spawned.set(spawned.get() + 1);
        let log =
            std::fs::File::create(logs.join(format!("{name}-{}.log", spawned.get()))).unwrap();
        std::process::Command::new(tidings_tests::example_bin("orders"))
            .args([
                "summary",
                "run",
                "-X",
                "session.timeout.ms=6000",
                "-X",
                "heartbeat.interval.ms=500",
            ])
            .env("DATABASE_URL", db.url())
            .env("KAFKA_BROKERS", brokers())
            .env("TIDINGS_TOPIC_PREFIX", &prefix)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .map(tidings_tests::Spawned::from)
            .expect("spawning the orders example")
    };
    let mut steady = spawn("steady");
    let mut victim = spawn("victim");

    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..orders {
                let id = format!("ORD-{i:03}");
                let amount = 1.0 + i as f64;
                let create = OrderCommand::Create {
                    order_id: id.clone(),
                    user_id: "U".into(),
                    amount,
                    currency: "EUR".into(),
                };
                store.execute::<Order>(&id, create).await.unwrap();
                store
                    .execute::<Order>(
                        &id,
                        OrderCommand::Pay {
                            payment_id: format!("P{i}"),
                            amount,
                        },
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        })
    };
    let mut kills = 0;
    let assigned_in = |name: &str| {
        std::fs::read_to_string(logs.join(name))
            .map(|log| log.contains("partitions assigned"))
            .unwrap_or(false)
    };
    while !writer.is_finished() || kills < 3 {
        tokio::time::sleep(Duration::from_millis(700 + fastrand::u64(0..600))).await;
        // Each kill lands on a victim that owns partitions.
        let victim_log = format!("victim-{}.log", spawned.get());
        let started = Instant::now();
        while !assigned_in(&victim_log) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the victim never got partitions (logs in {})",
                logs.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Neither instance died on its own (the survivor would hide it).
        for (who, child) in [("steady", &mut steady), ("victim", &mut victim)] {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the {who} instance exited on its own: {:?} (logs in {})",
                child.try_wait(),
                logs.display()
            );
        }
        victim.kill().unwrap(); // SIGKILL, whatever it was doing
        victim.wait().unwrap();
        kills += 1;
        victim = spawn("victim");
    }
    writer.await.unwrap();

    let expected: Vec<(String, String, String, i32)> = (0..orders)
        .map(|i| {
            (
                format!("ORD-{i:03}"),
                "paid".to_owned(),
                "EUR".to_owned(),
                2,
            )
        })
        .collect();
    wait_for(
        "both instances built the whole read model",
        Duration::from_secs(90),
        async || {
            let rows = summary.rows(&db.pool).await.unwrap();
            rows.iter()
                .map(|r| {
                    (
                        r.order_id.clone(),
                        r.status.clone(),
                        r.currency.clone(),
                        r.events_applied,
                    )
                })
                .collect::<Vec<_>>()
                == expected
        },
    )
    .await;
    for child in [&mut steady, &mut victim] {
        assert!(
            child.try_wait().unwrap().is_none(),
            "an instance exited on its own: {:?}",
            child.try_wait()
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
    // Each instance was given partitions at some point.
    let assigned = |prefix: &str| {
        std::fs::read_dir(&logs)
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| {
                e.file_name().to_string_lossy().starts_with(prefix)
                    && std::fs::read_to_string(e.path())
                        .unwrap()
                        .contains("partitions assigned")
            })
    };
    assert!(
        assigned("steady") && assigned("victim"),
        "both instances consumed (logs in {})",
        logs.display()
    );
    println!(
        "runner SIGKILLed {kills} times: {} events applied exactly once",
        orders * 2
    );
    std::fs::remove_dir_all(&logs).ok();
    relay_stop.send(()).unwrap();
    relay.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_downtime_rebuild_serves_the_old_version_until_the_new_one_caught_up() {
    let db = TestDb::new().await;
    let (store, prefix) = store_with_prefix(&db);
    let topic = store.topic_of::<Order>();
    let v1 = OrderSummary::new("summary_v1", "order_summary_v1");
    let v2 = OrderSummary::new("summary_v2", "order_summary_v2");
    v1.create_table(&db.pool).await.unwrap();
    v2.create_table(&db.pool).await.unwrap();
    sqlx::query("CREATE VIEW order_summary AS SELECT * FROM order_summary_v1")
        .execute(&db.pool)
        .await
        .unwrap();
    for i in 0..30 {
        let id = format!("ORD-{i:02}");
        let create = OrderCommand::Create {
            order_id: id.clone(),
            user_id: "U".into(),
            amount: 2.0,
            currency: "EUR".into(),
        };
        store.execute::<Order>(&id, create).await.unwrap();
    }
    let (relay_stop, relay) = start_relay(&db);
    let old = start(&db, v1.clone(), &prefix);
    let served = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM order_summary")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    wait_for("v1 serves", Duration::from_secs(60), async || {
        served().await == 30
    })
    .await;

    // Build v2 alongside; readers keep seeing v1 all along.
    let new = start(&db, v2.clone(), &prefix);
    let kafka = KafkaConfig::new(brokers());
    let switched = tidings::projection::switch_when_caught_up(
        &db.pool,
        &kafka,
        tidings::projection::Switch::new(
            "summary_v2",
            "CREATE OR REPLACE VIEW order_summary AS SELECT * FROM order_summary_v2",
        )
        .topics(std::slice::from_ref(&topic))
        .max_lag(0)
        .timeout(Duration::from_secs(60)),
    );
    // Readers sample the view for the whole wait: which version it shows
    // (its definition and its rows, read in one snapshot) and how many rows.
    let done = std::sync::atomic::AtomicBool::new(false);
    let sample = || async {
        let mut tx = db.pool.begin().await.unwrap();
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut *tx)
            .await
            .unwrap();
        let (definition, rows, events): (String, i64, i64) = sqlx::query_as(
            "SELECT pg_get_viewdef('order_summary'), count(*), coalesce(sum(events_applied), 0)::bigint \
             FROM order_summary",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        (definition.contains("order_summary_v2"), rows, events)
    };
    let (status, during) = tokio::join!(
        async {
            let status = switched.await;
            done.store(true, Ordering::Relaxed);
            status
        },
        async {
            let mut seen = Vec::new();
            while !done.load(Ordering::Relaxed) {
                seen.push(sample().await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        }
    );
    assert_eq!(status.unwrap().status.lag(), 0);
    let complete = |(_, rows, events): &(bool, i64, i64)| *rows == 30 && *events == 30;
    let old_samples = during.iter().filter(|s| !s.0).count();
    assert!(
        old_samples >= 10,
        "the wait was watched: {old_samples} samples of the old version"
    );
    assert!(
        during.iter().all(complete),
        "whichever version readers saw, it was complete: {during:?}"
    );
    // Once on v2, never back on v1.
    let first_new = during.iter().position(|s| s.0).unwrap_or(during.len());
    assert!(
        during[first_new..].iter().all(|s| s.0),
        "readers went back to the old version: {during:?}"
    );
    let definition: String = sqlx::query_scalar("SELECT pg_get_viewdef('order_summary')")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(definition.contains("order_summary_v2"), "{definition}");
    assert_eq!(
        v2.rows(&db.pool).await.unwrap(),
        v1.rows(&db.pool).await.unwrap()
    );
    assert_eq!(served().await, 30);
    old.stop().await;
    new.stop().await;
    relay_stop.send(()).unwrap();
    relay.await.unwrap().unwrap();
}
