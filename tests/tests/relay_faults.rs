//! The relay under the faults of a real deployment: a broker that freezes
//! past the delivery deadline, rows the broker refuses for good, topics the
//! relay may not create, deletes that fail, identity values reused after a
//! lost commit, two installations in one database, a database or a broker
//! that goes silent. Real PostgreSQL and the real broker throughout.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use tidings::kafka::{KafkaConfig, TopicSpec};
use tidings::relay::{Relay, RelayConfig, RelayStats};
use tidings::{Aggregate, Event, Store, StoreConfig};
use tidings_tests::proxy::Proxy;
use tidings_tests::{TestDb, brokers, check_streams, consume, consume_from, unique};
use tokio::sync::oneshot;

/// A journal of notes: whatever text a command carries is one event.
#[derive(Debug, Clone, PartialEq, Event)]
#[event(topic = "journal")]
enum JournalEvent {
    Noted { text: String },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Journal {
    notes: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl Aggregate for Journal {
    const TYPE: &'static str = "journal";
    type Event = JournalEvent;
    type Command = String;
    type Error = Never;

    fn handle(&self, text: String) -> Result<Vec<JournalEvent>, Never> {
        Ok(vec![JournalEvent::Noted { text }])
    }

    fn apply(&mut self, _: &JournalEvent) {
        self.notes += 1;
    }
}

/// A second aggregate type on a topic of its own.
#[derive(Debug, Clone, PartialEq, Event)]
#[event(topic = "ledger")]
enum LedgerEvent {
    Booked { amount: i64 },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Ledger;

impl Aggregate for Ledger {
    const TYPE: &'static str = "ledger";
    type Event = LedgerEvent;
    type Command = i64;
    type Error = Never;

    fn handle(&self, amount: i64) -> Result<Vec<LedgerEvent>, Never> {
        Ok(vec![LedgerEvent::Booked { amount }])
    }

    fn apply(&mut self, _: &LedgerEvent) {}
}

/// Scale of long scenarios: `TIDINGS_FAULT_SCALE` (default 1).
fn scale() -> u32 {
    tidings_tests::pipeline::scale() as u32
}

/// A deadline that grows with the scale.
fn deadline(seconds: u64) -> Duration {
    tidings_tests::scaled(Duration::from_secs(seconds))
}

/// A store with a topic prefix of its own.
fn store(pool: &sqlx::PgPool) -> Store {
    Store::with_config(
        pool.clone(),
        StoreConfig::default().topic_prefix(format!("{}.", unique("t"))),
    )
}

struct Running {
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<tidings::Result<()>>,
    stats: std::sync::Arc<RelayStats>,
}

impl Running {
    fn start(pool: &sqlx::PgPool, config: RelayConfig) -> Running {
        // RUST_LOG=tidings=debug shows what the relays do.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let relay = Relay::new(pool.clone(), config).expect("relay");
        let stats = relay.stats();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(relay.run(async move {
            let _ = stopped.await;
        }));
        Running {
            stop: Some(stop),
            handle,
            stats,
        }
    }

    /// Asks the relay to stop and returns how long it took, failing the
    /// test if it took longer than `limit`.
    async fn stop_within(mut self, limit: Duration) -> Duration {
        let started = Instant::now();
        let _ = self.stop.take().expect("running").send(());
        tokio::time::timeout(limit, &mut self.handle)
            .await
            .unwrap_or_else(|_| panic!("the relay did not stop within {limit:?}"))
            .expect("the relay task")
            .expect("the relay ended without error");
        started.elapsed()
    }
}

fn config(brokers: &str) -> RelayConfig {
    RelayConfig::new(KafkaConfig::new(brokers)).poll_interval(Duration::from_millis(100))
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Waits until `sql` (a count) reaches `want`, failing after `within`.
async fn wait_count(pool: &sqlx::PgPool, sql: &str, want: i64, within: Duration) {
    let started = Instant::now();
    loop {
        let got = count(pool, sql).await;
        if got == want {
            return;
        }
        assert!(
            started.elapsed() < within,
            "`{sql}` is {got}, not {want}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks order and completeness of what the topic delivered and prints the
/// scenario's row of FAULTS.md (the check fails the test on any loss or
/// reorder, so both columns are 0 whenever a row is printed).
fn report(
    scenario: &str,
    received: &[tidings_tests::Received],
    expected: &BTreeMap<String, u64>,
) -> usize {
    let duplicates = check_streams(received, expected);
    let committed: u64 = expected.values().sum();
    println!(
        "| {scenario} | {committed} | {} | 0 | {duplicates} | 0 |",
        received.len() - duplicates
    );
    duplicates
}

async fn note(store: &Store, id: &str, text: String) {
    store.execute::<Journal>(id, text).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_frozen_past_the_delivery_deadline_leaves_no_key_out_of_order() {
    let broker = tidings_tests::OwnBroker::start().await;
    let db = TestDb::new().await;
    let store = store(&db.pool);
    let topic = store.topic_of::<Journal>();
    let timeout = Duration::from_secs(2);
    let relay = Running::start(
        &db.pool,
        config(&broker.address)
            .delivery_timeout(timeout)
            // Many small batches in flight, enqueued over a second or more
            // as commits arrive: some expire while later ones still wait.
            .pipeline_depth(40),
    );
    let aggregates = 10u64;
    let rounds = 80 * u64::from(scale());
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for round in 0..rounds {
                for i in 0..aggregates {
                    note(&store, &format!("J-{i:02}"), format!("{round}")).await;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    // A steady load, then the broker freezes for three delivery deadlines.
    wait_count(
        &db.pool,
        "SELECT (count(*) >= 50)::int::int8 FROM tidings_events",
        1,
        deadline(30),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    broker.freeze();
    tokio::time::sleep(timeout * 3).await;
    // Come back right after a delivery failed, while the batches enqueued
    // after it are still waiting: the moment a gap could open.
    let failed_before = relay.stats.failed.load(Ordering::Relaxed);
    let started = Instant::now();
    while relay.stats.failed.load(Ordering::Relaxed) == failed_before
        && started.elapsed() < deadline(20)
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    broker.thaw();
    writer.await.unwrap();
    wait_count(
        &db.pool,
        "SELECT count(*) FROM tidings_outbox",
        0,
        deadline(120),
    )
    .await;
    let purges = relay.stats.purges.load(Ordering::Relaxed);
    let failed = relay.stats.failed.load(Ordering::Relaxed);
    relay.stop_within(Duration::from_secs(15)).await;
    assert!(failed > 0, "deliveries failed during the freeze");

    let total = (aggregates * rounds) as usize;
    let received = consume_from(
        &broker.address,
        &topic,
        total,
        Duration::from_secs(3),
        deadline(90),
    )
    .await;
    let expected: BTreeMap<String, u64> = (0..aggregates)
        .map(|i| (format!("J-{i:02}"), rounds))
        .collect();
    // Every key: 1, 2, 3, … in first-seen order, no gap.
    report(
        &format!(
            "broker frozen (SIGSTOP) for {:?}, 3× the delivery deadline, under load ({failed} deliveries failed, {purges} purges)",
            timeout * 3
        ),
        &received,
        &expected,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_refused_for_good_is_set_aside_and_holds_only_its_aggregate() {
    let db = TestDb::new().await;
    let store = store(&db.pool);
    let topic = store.topic_of::<Journal>();
    // J-A's second note is larger than the producer may send.
    note(&store, "J-A", "first".into()).await;
    note(&store, "J-A", "x".repeat(200_000)).await;
    note(&store, "J-A", "third".into()).await;
    let others = 20u64;
    for round in 0..5 {
        for i in 0..others {
            note(&store, &format!("J-{i:02}"), format!("{round}")).await;
        }
    }
    // Two rows no broker could take: an invalid topic, unreadable headers.
    sqlx::query(
        "INSERT INTO tidings_outbox (lane, topic, message_key, aggregate_type, aggregate_id, \
         sequence, event_id, headers, envelope) \
         VALUES (0, 'not a topic!', 'J-T', 'journal', 'J-T', 1, gen_random_uuid(), '{}', '{}'), \
                (0, $1, 'J-H', 'journal', 'J-H', 1, gen_random_uuid(), '{\"n\": 1}', '{}')",
    )
    .bind(&topic)
    .execute(&db.pool)
    .await
    .unwrap();

    let limited = config(&brokers())
        .batch_size(10)
        .max_backoff(Duration::from_secs(1));
    let mut limited = limited;
    limited.kafka = limited.kafka.set("message.max.bytes", "100000");
    let relay = Running::start(&db.pool, limited);
    // Every other aggregate flows; J-A's third row waits behind its second.
    wait_count(
        &db.pool,
        "SELECT count(*) FROM tidings_outbox_dead",
        3,
        deadline(60),
    )
    .await;
    wait_count(
        &db.pool,
        "SELECT count(*) FROM tidings_outbox",
        1,
        deadline(60),
    )
    .await;
    let held: (String, i64) = sqlx::query_as("SELECT aggregate_id, sequence FROM tidings_outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        held,
        ("J-A".to_owned(), 3),
        "only the refused row's aggregate is held"
    );
    assert_eq!(
        relay.stats.dead.load(Ordering::Relaxed),
        3,
        "counted in the metrics"
    );
    let status = tidings::store::outbox_status(&db.pool).await.unwrap();
    assert_eq!((status.depth, status.dead), (1, 3));
    let dead = tidings::relay::dead_rows(&db.pool).await.unwrap();
    let reason = |id: &str| {
        dead.iter()
            .find(|r| r.aggregate_id == id)
            .map(|r| r.reason.clone())
            .unwrap_or_else(|| panic!("{id} is dead"))
    };
    assert!(
        reason("J-A").to_lowercase().contains("too large"),
        "{}",
        reason("J-A")
    );
    assert!(
        reason("J-T").contains("invalid topic name"),
        "{}",
        reason("J-T")
    );
    assert!(reason("J-H").contains("not a string"), "{}", reason("J-H"));
    assert_eq!(
        dead.iter().find(|r| r.aggregate_id == "J-A").unwrap().held,
        1
    );
    assert!(!relay.handle.is_finished(), "the relay keeps running");
    relay.stop_within(Duration::from_secs(15)).await;

    // The cause fixed (no size limit), the row retried: J-A resumes in order.
    sqlx::query("DELETE FROM tidings_outbox_dead WHERE aggregate_id <> 'J-A'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        tidings::relay::retry_dead_rows(&db.pool, None)
            .await
            .unwrap(),
        1
    );
    let relay = Running::start(&db.pool, config(&brokers()));
    wait_count(
        &db.pool,
        "SELECT count(*) FROM tidings_outbox",
        0,
        deadline(60),
    )
    .await;
    relay.stop_within(Duration::from_secs(15)).await;
    let total = 3 + (others * 5) as usize;
    let received = consume(&topic, total, Duration::from_secs(2), deadline(60)).await;
    let mut expected: BTreeMap<String, u64> =
        (0..others).map(|i| (format!("J-{i:02}"), 5)).collect();
    expected.insert("J-A".into(), 3);
    report(
        "a row too large for the producer, one with an invalid topic, one with unreadable headers: set aside, the rest flows; retried in order",
        &received,
        &expected,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_that_exist_are_published_whatever_topic_creation_fails_on() {
    let db = TestDb::new().await;
    let store = store(&db.pool);
    let existing = store.topic_of::<Journal>();
    tidings_tests::create_topic_named(&existing, 3).await;
    for i in 0..10 {
        note(&store, &format!("J-{i}"), "hello".into()).await;
        store.execute::<Ledger>(&format!("L-{i}"), 5).await.unwrap();
    }
    // A spec no broker accepts: the ledger topic, missing, cannot be made.
    let mut spec = TopicSpec::default();
    spec.partitions = 0;
    let relay = Running::start(
        &db.pool,
        config(&brokers())
            .create_topics(Some(spec))
            .max_backoff(Duration::from_millis(500)),
    );
    wait_count(
        &db.pool,
        "SELECT count(*) FROM tidings_outbox WHERE aggregate_type = 'journal'",
        0,
        deadline(60),
    )
    .await;
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM tidings_outbox WHERE aggregate_type = 'ledger'"
        )
        .await,
        10,
        "the rows of the topic that cannot be created wait"
    );
    assert!(
        relay.stats.errors.load(Ordering::Relaxed) > 0,
        "creation did fail"
    );
    relay.stop_within(Duration::from_secs(15)).await;
    let received = consume(&existing, 10, Duration::from_secs(2), deadline(60)).await;
    let expected: BTreeMap<String, u64> = (0..10).map(|i| (format!("J-{i}"), 1)).collect();
    report(
        "a topic that cannot be created beside one that exists (only the missing topic's rows wait)",
        &received,
        &expected,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_never_removes_a_row_that_reuses_a_published_id() {
    let db = TestDb::new().await;
    let store = store(&db.pool);
    let topic = store.topic_of::<Journal>();
    // Deletes fail while `blocked` has a row (each attempt is counted).
    sqlx::raw_sql(
        "CREATE TABLE blocked (x int); INSERT INTO blocked VALUES (1); \
         CREATE SEQUENCE delete_attempts; \
         CREATE FUNCTION refuse_delete() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN PERFORM nextval('delete_attempts'); \
           IF EXISTS (SELECT 1 FROM blocked) THEN RAISE EXCEPTION 'deletes are blocked'; END IF; \
           RETURN OLD; END $$; \
         CREATE TRIGGER refuse_delete BEFORE DELETE ON tidings_outbox \
           FOR EACH ROW EXECUTE FUNCTION refuse_delete();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    note(&store, "J-1", "published".into()).await;
    let (id, published): (i64, uuid::Uuid) =
        sqlx::query_as("SELECT id, event_id FROM tidings_outbox")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let relay = Running::start(&db.pool, config(&brokers()));
    // Published, and its delete failed at least once.
    let started = Instant::now();
    while count(&db.pool, "SELECT last_value FROM delete_attempts").await < 2 {
        assert!(
            started.elapsed() < deadline(60),
            "the relay never tried to delete"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The commit of that row is lost and the identity goes back: a new,
    // unpublished event gets the same id.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("ALTER TABLE tidings_outbox DISABLE TRIGGER refuse_delete")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("DELETE FROM tidings_outbox WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await
        .unwrap();
    let fresh = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO tidings_outbox (id, lane, topic, message_key, aggregate_type, aggregate_id, \
         sequence, event_id, event_type, event_version, envelope) OVERRIDING SYSTEM VALUE \
         SELECT $1, $2, $3, 'J-2', 'journal', 'J-2', 1, $4, 'Noted', 1, $5",
    )
    .bind(id)
    .bind(tidings::store::lane_of("journal", "J-2"))
    .bind(&topic)
    .bind(fresh)
    .bind(
        serde_json::json!({
            "event_type": "Noted", "event_version": 1, "event_id": fresh,
            "timestamp": "2026-12-01T10:00:00Z", "aggregate_type": "journal",
            "aggregate_id": "J-2", "sequence": 1, "correlation_id": null,
            "causation_id": null, "metadata": {}, "payload": {"text": "unpublished"}
        })
        .to_string(),
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("ALTER TABLE tidings_outbox ENABLE TRIGGER refuse_delete")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("DELETE FROM blocked")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // The pending delete of the published row must not take the new one.
    let received = consume(&topic, 2, Duration::from_secs(3), deadline(60)).await;
    relay.stop_within(Duration::from_secs(15)).await;
    let ids: Vec<uuid::Uuid> = received
        .iter()
        .filter_map(|m| m.envelope.as_ref().map(|e| e.event_id))
        .collect();
    assert!(ids.contains(&published));
    assert!(
        ids.contains(&fresh),
        "the row that reused the id was published, not deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_use_the_pools_own_connection_settings() {
    let db = TestDb::empty().await;
    // The tables live in a schema only the pool's after_connect selects.
    sqlx::query("CREATE SCHEMA app")
        .execute(&db.pool)
        .await
        .unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query("SET search_path = app").execute(conn).await?;
                Ok(())
            })
        })
        .connect_with(db.connect_options())
        .await
        .unwrap();
    tidings::MIGRATOR.run(&pool).await.unwrap();
    let store = store(&pool);
    let topic = store.topic_of::<Journal>();
    for i in 0..20 {
        note(&store, &format!("J-{i}"), "once".into()).await;
    }
    let relay = Running::start(&pool, config(&brokers()));
    wait_count(
        &pool,
        "SELECT count(*) FROM tidings_outbox",
        0,
        deadline(30),
    )
    .await;
    // Long enough for a republishing loop to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay.stop_within(Duration::from_secs(15)).await;
    let received = consume(&topic, 20, Duration::from_secs(2), deadline(60)).await;
    let expected: BTreeMap<String, u64> = (0..20).map(|i| (format!("J-{i}"), 1)).collect();
    let duplicates = report(
        "tables in a schema only the pool's after_connect selects (deletes on the same pool)",
        &received,
        &expected,
    );
    assert_eq!(duplicates, 0, "each row published once: the deletes worked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_installations_in_one_database_each_publish_every_row() {
    let db = TestDb::empty().await;
    let mut pools = Vec::new();
    for schema in ["tenant_a", "tenant_b"] {
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&db.pool)
            .await
            .unwrap();
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(db.connect_options().options([("search_path", schema)]))
            .await
            .unwrap();
        tidings::MIGRATOR.run(&pool).await.unwrap();
        pools.push(pool);
    }
    let mut topics = Vec::new();
    for pool in &pools {
        let store = store(pool);
        topics.push(store.topic_of::<Journal>());
        for i in 0..40 {
            note(&store, &format!("J-{i}"), "hello".into()).await;
        }
    }
    let relays: Vec<Running> = pools
        .iter()
        .map(|pool| Running::start(pool, config(&brokers())))
        .collect();
    for pool in &pools {
        wait_count(pool, "SELECT count(*) FROM tidings_outbox", 0, deadline(30)).await;
    }
    for relay in relays {
        assert_eq!(
            relay.stats.lanes.load(Ordering::Relaxed),
            tidings::store::OUTBOX_LANES as u64,
            "each installation's relay owns all of its lanes"
        );
        relay.stop_within(Duration::from_secs(15)).await;
    }
    for topic in &topics {
        let received = consume(topic, 40, Duration::from_secs(2), deadline(60)).await;
        let expected: BTreeMap<String, u64> = (0..40).map(|i| (format!("J-{i}"), 1)).collect();
        report(
            "two installations in two schemas of one database, a relay each",
            &received,
            &expected,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_time_while_postgres_is_a_black_hole() {
    let db = TestDb::new().await;
    let server = format!(
        "{}:{}",
        db.connect_options().get_host(),
        db.connect_options().get_port()
    );
    let proxy = Proxy::start(&server).await;
    let port: u16 = proxy.address.rsplit(':').next().unwrap().parse().unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(db.connect_options().host("127.0.0.1").port(port))
        .await
        .unwrap();
    let store = store(&pool);
    for i in 0..20 {
        note(&store, &format!("J-{i}"), "hello".into()).await;
    }
    let relay = Running::start(&pool, config(&brokers()));
    wait_count(
        &db.pool,
        "SELECT count(*) FROM tidings_outbox",
        0,
        deadline(30),
    )
    .await;
    // More rows, then the network to PostgreSQL goes silent.
    for i in 0..20 {
        note(&store, &format!("J-{i}"), "again".into()).await;
    }
    proxy.black_hole();
    tokio::time::sleep(Duration::from_millis(200)).await; // writes under way land
    let forwarded = proxy.forwarded();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let took = relay.stop_within(Duration::from_secs(15)).await;
    assert!(
        proxy.forwarded() == forwarded,
        "nothing passed the black hole"
    );
    println!("shutdown with PostgreSQL silent took {took:?}");
    assert!(
        took <= Duration::from_secs(11),
        "within the 10 s shutdown deadline: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_cannot_reach_the_broker_gives_its_lanes_up() {
    let db = TestDb::new().await;
    let store = store(&db.pool);
    let topic = store.topic_of::<Journal>();
    tidings_tests::create_topic_named(&topic, 3).await;
    // Relay A's credentials are wrong: it reaches PostgreSQL, never Kafka.
    let mut broken = config(&brokers())
        .delivery_timeout(Duration::from_secs(1))
        .stall_timeout(Duration::from_secs(3))
        .max_backoff(Duration::from_millis(500))
        .create_topics(None);
    broken.kafka = broken
        .kafka
        .set("security.protocol", "sasl_plaintext")
        .set("sasl.mechanism", "PLAIN")
        .set("sasl.username", "nobody")
        .set("sasl.password", "wrong");
    let a = Running::start(&db.pool, broken);
    let started = Instant::now();
    while a.stats.lanes.load(Ordering::Relaxed) < tidings::store::OUTBOX_LANES as u64 {
        assert!(
            started.elapsed() < deadline(30),
            "relay A never took its lanes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b = Running::start(&db.pool, config(&brokers()));
    for i in 0..40 {
        note(&store, &format!("J-{i}"), "hello".into()).await;
    }
    wait_count(
        &db.pool,
        "SELECT count(*) FROM tidings_outbox",
        0,
        deadline(60),
    )
    .await;
    assert!(
        a.stats.stalls.load(Ordering::Relaxed) > 0,
        "A gave its lanes up"
    );
    assert_eq!(
        a.stats.published.load(Ordering::Relaxed),
        0,
        "A never published"
    );
    assert!(
        !a.stats.healthy.load(Ordering::Relaxed),
        "A reports itself unhealthy"
    );
    a.stop_within(Duration::from_secs(15)).await;
    b.stop_within(Duration::from_secs(15)).await;
    let received = consume(&topic, 40, Duration::from_secs(2), deadline(60)).await;
    let expected: BTreeMap<String, u64> = (0..40).map(|i| (format!("J-{i}"), 1)).collect();
    report(
        "one of two relays cannot reach the broker (wrong credentials): it gives its lanes up",
        &received,
        &expected,
    );
}

#[tokio::test]
async fn settings_the_relay_owns_are_refused_not_overridden() {
    let db = TestDb::new().await;
    for (key, value) in [
        ("message.timeout.ms", "5000"),
        ("enable.gapless.guarantee", "false"),
        ("partitioner", "random"),
    ] {
        let mut relay = config(&brokers());
        relay.kafka = relay.kafka.set(key, value);
        let error = Relay::new(db.pool.clone(), relay).unwrap_err();
        assert!(
            matches!(error, tidings::Error::Config(_)) && error.to_string().contains(key),
            "{key}: {error}"
        );
    }
}

/// The interleaving that a librdkafka message timeout turns into a gap: a
/// partition's leader is away across the expiry of one message and back
/// before the expiry of the next. librdkafka's in-process mock cluster
/// serves here because it can take a broker down and up at exact instants
/// (the real broker's freeze above covers the same path end to end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_back_between_two_expiries_leaves_no_gap() {
    let mock = rdkafka::mocking::MockCluster::new(1).expect("a mock cluster");
    let db = TestDb::new().await;
    let store = store(&db.pool);
    let topic = store.topic_of::<Journal>();
    mock.create_topic(&topic, 1, 1).expect("creating the topic");
    let servers = mock.bootstrap_servers();
    let relay = Running::start(
        &db.pool,
        config(&servers)
            .delivery_timeout(Duration::from_secs(3))
            .create_topics(None),
    );
    note(&store, "J-1", "before".into()).await;
    wait_count(
        &db.pool,
        "SELECT count(*) FROM tidings_outbox",
        0,
        deadline(30),
    )
    .await;

    mock.broker_down(1).expect("taking the broker down");
    let t0 = Instant::now();
    note(&store, "J-1", "expires while the leader is away".into()).await;
    tokio::time::sleep_until((t0 + Duration::from_secs(2)).into()).await;
    note(&store, "J-1", "still queued when the leader is back".into()).await;
    // After the first message's 3 s (and librdkafka's 1 s timeout scan),
    // before the second's.
    tokio::time::sleep_until((t0 + Duration::from_millis(4200)).into()).await;
    mock.broker_up(1).expect("bringing the broker back");
    wait_count(
        &db.pool,
        "SELECT count(*) FROM tidings_outbox",
        0,
        deadline(60),
    )
    .await;
    let failed = relay.stats.failed.load(Ordering::Relaxed);
    relay.stop_within(Duration::from_secs(15)).await;
    assert!(
        failed > 0,
        "the first delivery failed while the leader was away"
    );
    let received = consume_from(&servers, &topic, 3, Duration::from_secs(2), deadline(60)).await;
    let expected = BTreeMap::from([("J-1".to_owned(), 3)]);
    report(
        "leader away across one message's deadline and back before the next's (mock cluster)",
        &received,
        &expected,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_time_while_the_broker_is_frozen_with_batches_in_flight() {
    let broker = tidings_tests::OwnBroker::start().await;
    let db = TestDb::new().await;
    let store = store(&db.pool);
    // The default delivery deadline (30 s) is far beyond the shutdown's.
    let relay = Running::start(&db.pool, config(&broker.address));
    note(&store, "J-0", "first".into()).await;
    wait_count(
        &db.pool,
        "SELECT count(*) FROM tidings_outbox",
        0,
        deadline(30),
    )
    .await;
    broker.freeze();
    for i in 0..20 {
        note(&store, &format!("J-{i}"), "in flight".into()).await;
    }
    // Read and handed to the producer, never acknowledged.
    let started = Instant::now();
    while relay.stats.batch_rows.load(Ordering::Relaxed) < 2 {
        assert!(started.elapsed() < deadline(30), "the relay read nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let took = relay.stop_within(Duration::from_secs(40)).await;
    println!("shutdown with the broker frozen took {took:?}");
    broker.thaw();
    assert!(
        took <= Duration::from_secs(11),
        "within the 10 s shutdown deadline: {took:?}"
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM tidings_outbox").await,
        20,
        "what was not acknowledged stays for the next relay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_loses_its_lock_session_mid_run_leaves_nothing_missing_or_out_of_order() {
    let db = TestDb::new().await;
    let store = store(&db.pool);
    let topic = store.topic_of::<Journal>();
    let relays = [
        Running::start(&db.pool, config(&brokers())),
        Running::start(&db.pool, config(&brokers())),
    ];
    let aggregates = 40;
    let per = 30;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for round in 0..per {
                for i in 0..aggregates {
                    note(&store, &format!("J-{i:02}"), format!("{round}")).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Mid-run, the session holding the most lane locks is terminated (as a
    // failover or an administrator would): its relay loses its lanes at once.
    let started = Instant::now();
    while relays
        .iter()
        .map(|r| r.stats.published.load(Ordering::Relaxed))
        .sum::<u64>()
        < 100
    {
        assert!(started.elapsed() < deadline(30), "nothing published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let terminated: Option<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks \
         WHERE locktype = 'advisory' AND granted \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         GROUP BY pid ORDER BY count(*) DESC LIMIT 1",
    )
    .fetch_optional(&db.pool)
    .await
    .unwrap();
    assert_eq!(terminated, Some(true), "a lane-lock session was terminated");
    assert!(!writer.is_finished(), "mid-run");
    writer.await.unwrap();
    wait_count(
        &db.pool,
        "SELECT count(*) FROM tidings_outbox",
        0,
        deadline(60),
    )
    .await;
    let owned: u64 = relays
        .iter()
        .map(|r| r.stats.lanes.load(Ordering::Relaxed))
        .sum();
    assert_eq!(
        owned,
        u64::from(tidings::store::OUTBOX_LANES),
        "every lane owned again"
    );
    let total = aggregates * per;
    let received = consume(&topic, total, Duration::from_secs(2), deadline(60)).await;
    let expected: BTreeMap<String, u64> = (0..aggregates)
        .map(|i| (format!("J-{i:02}"), per as u64))
        .collect();
    let duplicates = check_streams(&received, &expected);
    println!(
        "lock session lost mid-run: {total} events, none missing or out of order, {duplicates} duplicates"
    );
    for relay in relays {
        relay.stop_within(deadline(15)).await;
    }
}
