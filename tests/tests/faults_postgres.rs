//! PostgreSQL restarted under a running pipeline. A test binary of its own:
//! cargo runs test binaries one at a time, so no other test sees the restart.

use std::time::Duration;

use tidings::kafka::KafkaConfig;
use tidings::projection::{Runner, RunnerConfig};
use tidings::relay::{Relay, RelayConfig};
use tidings_tests::pipeline::{Counter, CounterView, scale, settle, write};
use tidings_tests::{TestDb, brokers, prefixed_store};

/// Restarts the local cluster the way `scripts/dev.sh` starts it.
fn restart_postgres() {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("a local PostgreSQL cluster (pg_ctlcluster) is needed for this scenario")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .max()
        .expect("a cluster version");
    let status = std::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "restart"])
        .status()
        .expect("running pg_ctlcluster");
    assert!(status.success(), "restarting PostgreSQL failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_run_relay_and_runner_reconnect_by_themselves() {
    let db = TestDb::new().await;
    CounterView::create_table(&db.pool).await;
    let store = prefixed_store(&db);
    let prefix = store
        .topic_of::<Counter>()
        .trim_end_matches("counters")
        .to_owned();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let relay = Relay::new(
        db.pool.clone(),
        RelayConfig::new(KafkaConfig::new(brokers())),
    )
    .unwrap();
    let relay_stats = relay.stats();
    let relay_task = tokio::spawn(relay.run(until(stopped.clone())));
    let config = RunnerConfig::new(KafkaConfig::new(brokers()))
        .topic_prefix(&prefix)
        .max_backoff(Duration::from_secs(2));
    let runner = Runner::new(db.pool.clone(), CounterView, config).unwrap();
    let runner_stats = runner.stats();
    let runner_task = tokio::spawn(runner.run(until(stopped.clone())));

    let writer = {
        let store = store.clone();
        tokio::spawn(
            async move { write(&store, 20, 2, 300 * scale(), Duration::from_millis(10)).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    tokio::task::spawn_blocking(restart_postgres).await.unwrap();
    writer.await.unwrap();

    let figures = settle(&store, &brokers()).await;
    let errors = relay_stats
        .errors
        .load(std::sync::atomic::Ordering::Relaxed)
        + runner_stats
            .retries
            .load(std::sync::atomic::Ordering::Relaxed);
    figures.assert_sound(&format!(
        "PostgreSQL restarted ({errors} errors retried by relay and runner)"
    ));
    stop.send(true).unwrap();
    relay_task.await.unwrap().unwrap();
    runner_task.await.unwrap().unwrap();
}
