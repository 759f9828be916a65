//! The testing helpers users get: `tidings::testing::{TestDatabase,
//! EmbeddedKafka}` run the whole pipeline (store, relay, projection,
//! replay) with no broker installed. Every feature is also tested against
//! the real broker elsewhere; this file proves the helpers themselves.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tidings::projection::{Runner, RunnerConfig, replay};
use tidings::relay::{Relay, RelayConfig};
use tidings::testing::{EmbeddedKafka, TestDatabase};
use tidings::{Store, StoreConfig};
use tidings_tests::pipeline::{Counter, CounterView};
use tidings_tests::{Watchdog, unique, wait_until};
use tokio::sync::oneshot;

async fn totals(db: &TestDatabase) -> Vec<(String, i64, i64)> {
    sqlx::query_as("SELECT id, total, events FROM counter_view ORDER BY id")
        .fetch_all(db.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_on_the_embedded_broker_and_a_throwaway_database() {
    let _watchdog = Watchdog::start();
    let db = TestDatabase::from_env().await.unwrap();
    let name = db.name().to_owned();
    CounterView::create_table(db.pool()).await;
    let kafka = EmbeddedKafka::start().unwrap();
    assert!(kafka.brokers().starts_with("127.0.0.1:"), "{kafka:?}");
    let prefix = format!("{}.", unique("embedded"));
    let store = Store::with_config(
        db.pool().clone(),
        StoreConfig::default().topic_prefix(&prefix),
    );
    for (id, amount) in [("c-1", 2), ("c-2", 10), ("c-1", 3)] {
        store.execute::<Counter>(id, amount).await.unwrap();
    }

    // The relay creates the topic on the embedded cluster and publishes.
    let relay = Relay::new(db.pool().clone(), RelayConfig::new(kafka.config())).unwrap();
    let relay_stats = relay.stats();
    let (stop_relay, stopped) = oneshot::channel::<()>();
    let relay = tokio::spawn(relay.run(async {
        stopped.await.ok();
    }));
    let runner = Runner::new(
        db.pool().clone(),
        CounterView,
        RunnerConfig::new(kafka.config()).topic_prefix(&prefix),
    )
    .unwrap();
    let runner_stats = runner.stats();
    let (stop_runner, stopped) = oneshot::channel::<()>();
    let runner = tokio::spawn(runner.run(async {
        stopped.await.ok();
    }));
    let expected = vec![("c-1".to_owned(), 5, 2), ("c-2".to_owned(), 10, 1)];
    wait_until("the read model", Duration::from_secs(60), async || {
        totals(&db).await == expected
    })
    .await;
    assert_eq!(relay_stats.published.load(Ordering::Relaxed), 3);

    // A replay rebuilds it from the embedded broker's topic.
    let applied = runner_stats.applied.load(Ordering::Relaxed);
    replay(db.pool(), &CounterView).await.unwrap();
    wait_until("the replay", Duration::from_secs(60), async || {
        runner_stats.applied.load(Ordering::Relaxed) >= applied + 3 && totals(&db).await == expected
    })
    .await;

    stop_runner.send(()).ok();
    runner.await.unwrap().unwrap();
    stop_relay.send(()).ok();
    relay.await.unwrap().unwrap();
    drop(kafka);
    // The database goes with its value.
    let pool = db.pool().clone();
    drop(db);
    pool.close().await;
    let server = tidings_tests::database_url();
    let admin = sqlx::PgPool::connect(&server).await.unwrap();
    let left: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&admin)
            .await
            .unwrap();
    assert!(!left, "the test database {name} was not dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_on_a_stopped_embedded_broker_fail_clearly() {
    let kafka = EmbeddedKafka::start().unwrap();
    let config = kafka.config();
    kafka.create_topic("made-before", 3).unwrap();
    kafka.create_topic("made-before", 3).unwrap();
    drop(kafka);
    let error = tidings::kafka::ensure_topics(
        &config,
        &["made-after".to_owned()].into(),
        &tidings::kafka::TopicSpec::default(),
    )
    .await
    .unwrap_err();
    assert!(
        error.to_string().contains("stopped") || error.to_string().contains("broker"),
        "{error}"
    );
}
