//! Zero-downtime rebuilds against real PostgreSQL and the real broker: the
//! switch under a steady load, its refusal while the new version has dead
//! letters, and the retirement of the old version.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::PgConnection;
use tidings::kafka::KafkaConfig;
use tidings::projection::{
    ApplyError, Projection, Retire, Runner, RunnerConfig, Switch, switch_when_caught_up,
};
use tidings::relay::{Relay, RelayConfig};
use tidings::{Envelope, Error};
use tidings_tests::pipeline::{Counter, CounterEvent, committed, scale};
use tidings_tests::{TestDb, brokers, prefixed_store, wait_until};

/// One version of the counters' read model, in its own table; it refuses
/// (permanently) the amount `refuse`, if any.
struct Version {
    name: &'static str,
    refuse: Option<i64>,
}

impl Version {
    fn of(name: &'static str) -> Self {
        Version { name, refuse: None }
    }
}

#[async_trait]
impl Projection for Version {
    type Event = CounterEvent;

    fn name(&self) -> &str {
        self.name
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        envelope: &Envelope<CounterEvent>,
    ) -> Result<(), ApplyError> {
        let CounterEvent::Added { amount } = envelope.payload;
        if Some(amount) == self.refuse {
            return Err(ApplyError::permanent(format!(
                "{} refuses {amount}",
                self.name
            )));
        }
        sqlx::query(&format!(
            "INSERT INTO {} AS v (id, total, events) VALUES ($1, $2, 1) \
             ON CONFLICT (id) DO UPDATE SET total = v.total + $2, events = v.events + 1",
            self.name
        ))
        .bind(&envelope.aggregate_id)
        .bind(amount)
        .execute(conn)
        .await?;
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ApplyError> {
        sqlx::query(&format!("TRUNCATE {}", self.name))
            .execute(conn)
            .await?;
        Ok(())
    }
}

/// Creates the tables of both versions and the view readers query (on v1).
async fn create_versions(db: &TestDb) {
    for table in ["counts_v1", "counts_v2"] {
        sqlx::query(&format!(
            "CREATE TABLE {table} (id TEXT PRIMARY KEY, total BIGINT NOT NULL, events BIGINT NOT NULL)"
        ))
        .execute(&db.pool)
        .await
        .unwrap();
    }
    sqlx::query("CREATE VIEW counts AS SELECT * FROM counts_v1")
        .execute(&db.pool)
        .await
        .unwrap();
}

fn config(prefix: &str) -> RunnerConfig {
    RunnerConfig::new(KafkaConfig::new(brokers()))
        .topic_prefix(prefix)
        .max_backoff(Duration::from_secs(1))
}

type Task<T> = tokio::task::JoinHandle<tidings::Result<T>>;

fn spawn<P: Projection>(
    db: &TestDb,
    projection: P,
    prefix: &str,
) -> (tokio::sync::oneshot::Sender<()>, Task<()>) {
    let runner = Runner::new(db.pool.clone(), projection, config(prefix)).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(runner.run(async move {
        let _ = stopped.await;
    }));
    (stop, task)
}

fn spawn_relay(db: &TestDb) -> (tokio::sync::oneshot::Sender<()>, Task<()>) {
    let relay = Relay::new(
        db.pool.clone(),
        RelayConfig::new(KafkaConfig::new(brokers())),
    )
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    (stop, task)
}

fn prefix_of(store: &tidings::Store) -> String {
    store
        .topic_of::<Counter>()
        .trim_end_matches("counters")
        .to_owned()
}

async fn view_of(db: &TestDb) -> String {
    sqlx::query_scalar("SELECT pg_get_viewdef('counts')")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn applied(db: &TestDb, table: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT coalesce(sum(events), 0)::bigint FROM {table}"
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// Commands to 40 counters from 4 writers, each pausing `pause` between
/// commands, until `stop` is set; counts them in `written`.
fn steady_load(
    store: &tidings::Store,
    pause: Duration,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (store, stop, written) = (store.clone(), Arc::clone(&stop), Arc::clone(&written));
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("C-{w}{:01}", i % 10);
                    store.execute::<Counter>(&id, 1).await.unwrap();
                    written.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                    tokio::time::sleep(pause).await;
                }
            })
        })
        .collect();
    tokio::spawn(async move {
        for writer in writers {
            writer.await.unwrap();
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_happens_under_steady_load_and_retires_the_old_version() {
    let db = TestDb::new().await;
    create_versions(&db).await;
    let store = prefixed_store(&db);
    let prefix = prefix_of(&store);
    let (relay_stop, relay) = spawn_relay(&db);
    let stop_load = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    // Several hundred commands per second, each in flight for tens of
    // milliseconds: some partition almost always has a message on its way.
    let load = steady_load(
        &store,
        Duration::from_millis(1),
        Arc::clone(&stop_load),
        Arc::clone(&written),
    );
    let (v1_stop, v1) = spawn(&db, Version::of("counts_v1"), &prefix);
    wait_until("v1 serves", Duration::from_secs(60), async || {
        applied(&db, "counts").await > 100
    })
    .await;
    let (v2_stop, v2) = spawn(&db, Version::of("counts_v2"), &prefix);

    let kafka = KafkaConfig::new(brokers());
    let report = switch_when_caught_up(
        &db.pool,
        &kafka,
        Switch::new(
            "counts_v2",
            "DROP VIEW counts; CREATE VIEW counts AS SELECT * FROM counts_v2",
        )
        .max_lag(500)
        .window(Duration::from_secs(2))
        .timeout(Duration::from_secs(60 * scale() as u64))
        .retire(Retire::new("counts_v1", config(&prefix))),
    )
    .await
    .expect("the switch happens while the load goes on");
    let at_switch = written.load(Ordering::Relaxed);
    assert!(view_of(&db).await.contains("counts_v2"), "readers moved");
    assert!(
        report.status.lag() <= 500,
        "switched within the threshold: {:?}",
        report.status
    );

    // The old version's runner is fenced and stops with a clear error.
    let ended = tokio::time::timeout(Duration::from_secs(30), v1)
        .await
        .expect("the retired version's runner stops")
        .unwrap();
    assert!(
        matches!(ended, Err(Error::Retired { ref name, .. }) if name == "counts_v1"),
        "{ended:?}"
    );
    drop(v1_stop);
    let retired = report.retired.expect("a retirement report");
    assert!(retired.left.is_empty(), "nothing left: {:?}", retired.left);
    assert!(
        !retired.groups_deleted.is_empty(),
        "its consumer group was deleted"
    );
    assert!(retired.dead_letter_topic_deleted, "{retired:?}");
    for table in [
        "tidings_checkpoints",
        "tidings_projection_streams",
        "tidings_parked",
    ] {
        let left: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {table} WHERE projection = 'counts_v1'"
        ))
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(left, 0, "{table} rows of the retired version");
    }
    // Its dead letter topic is gone from the cluster.
    let dlq = format!("{prefix}counts_v1.dlq");
    let metadata = tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let client: BaseConsumer = tidings_tests::kafka_config().create().unwrap();
        let metadata = client
            .fetch_metadata(None, Duration::from_secs(10))
            .unwrap();
        metadata
            .topics()
            .iter()
            .any(|t| t.name() == dlq && t.error().is_none())
    })
    .await
    .unwrap();
    assert!(!metadata, "the retired version's dead letter topic exists");
    // A runner of the retired version started again refuses to run.
    let (_again_stop, again) = spawn(&db, Version::of("counts_v1"), &prefix);
    let again = tokio::time::timeout(Duration::from_secs(30), again)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(again, Err(Error::Retired { .. })), "{again:?}");

    // The load went on past the switch, and v2 has every event once.
    wait_until(
        "commands after the switch",
        Duration::from_secs(30),
        async || written.load(Ordering::Relaxed) > at_switch + 100,
    )
    .await;
    stop_load.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let total = committed(&db.pool).await as i64;
    wait_until(
        "v2 applied everything",
        Duration::from_secs(60),
        async || applied(&db, "counts").await == total,
    )
    .await;
    println!(
        "switched under load after {at_switch} commands, lag {} at the switch; {total} in all",
        report.status.lag()
    );
    v2_stop.send(()).unwrap();
    v2.await.unwrap().unwrap();
    relay_stop.send(()).unwrap();
    relay.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_is_refused_while_the_new_version_has_dead_letters_unless_allowed() {
    let db = TestDb::new().await;
    create_versions(&db).await;
    let store = prefixed_store(&db);
    let prefix = prefix_of(&store);
    for i in 0..40i64 {
        let amount = if i == 7 { 13 } else { 1 };
        store
            .execute::<Counter>(&format!("C-{:02}", i % 10), amount)
            .await
            .unwrap();
    }
    let (relay_stop, relay) = spawn_relay(&db);
    let (v1_stop, v1) = spawn(&db, Version::of("counts_v1"), &prefix);
    let (v2_stop, v2) = spawn(
        &db,
        Version {
            name: "counts_v2",
            refuse: Some(13),
        },
        &prefix,
    );
    wait_until(
        "both versions caught up",
        Duration::from_secs(60),
        async || applied(&db, "counts_v1").await == 40 && applied(&db, "counts_v2").await > 30,
    )
    .await;
    let kafka = KafkaConfig::new(brokers());
    let switch = || {
        Switch::new(
            "counts_v2",
            "DROP VIEW counts; CREATE VIEW counts AS SELECT * FROM counts_v2",
        )
        .window(Duration::from_millis(500))
        .timeout(Duration::from_secs(30))
    };
    let refused = switch_when_caught_up(&db.pool, &kafka, switch()).await;
    match refused {
        Err(Error::Refused(why)) => assert!(why.contains("1 dead letters"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        view_of(&db).await.contains("counts_v1"),
        "readers stay on v1"
    );
    let forced = switch_when_caught_up(&db.pool, &kafka, switch().allow_dead_letters())
        .await
        .expect("allowed explicitly, the switch happens");
    assert_eq!(forced.status.dead_lettered, 1);
    assert!(view_of(&db).await.contains("counts_v2"));
    for (stop, task) in [(v1_stop, v1), (v2_stop, v2), (relay_stop, relay)] {
        stop.send(()).unwrap();
        task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_that_never_catches_up_fails_after_its_timeout_switching_nothing() {
    let db = TestDb::new().await;
    create_versions(&db).await;
    let store = prefixed_store(&db);
    for i in 0..10 {
        store
            .execute::<Counter>(&format!("C-{i}"), 1)
            .await
            .unwrap();
    }
    let (relay_stop, relay) = spawn_relay(&db);
    let topic = store.topic_of::<Counter>();
    tidings_tests::wait_for_topic(&brokers(), &topic, Duration::from_secs(30)).await;
    // No runner of v2 ever runs: its lag stays at 10.
    let started = Instant::now();
    let result = switch_when_caught_up(
        &db.pool,
        &KafkaConfig::new(brokers()),
        Switch::new(
            "counts_v2",
            "DROP VIEW counts; CREATE VIEW counts AS SELECT * FROM counts_v2",
        )
        .topics(std::slice::from_ref(&topic))
        .max_lag(0)
        .timeout(Duration::from_secs(2)),
    )
    .await;
    let took = started.elapsed();
    match result {
        Err(Error::Refused(why)) => assert!(why.contains("did not stay caught up"), "{why}"),
        other => panic!("expected a refusal after the timeout, got {other:?}"),
    }
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "{took:?}"
    );
    assert!(view_of(&db).await.contains("counts_v1"), "nothing switched");
    relay_stop.send(()).unwrap();
    relay.await.unwrap().unwrap();
}
