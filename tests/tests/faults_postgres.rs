//! PostgreSQL restarted, and crashed, under a running pipeline. A test
//! binary of its own: cargo runs test binaries one at a time, so no other
//! test sees the restart; within this binary the scenarios take turns.

use std::time::{Duration, Instant};

use sqlx::Connection;
use tidings::kafka::KafkaConfig;
use tidings::projection::{Runner, RunnerConfig};
use tidings::relay::{Relay, RelayConfig};
use tidings_tests::pipeline::{Counter, CounterView, committed, scale, settle, write};
use tidings_tests::{TestDb, brokers, prefixed_store};

/// One scenario at a time: both stop the server.
static SERVER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The local cluster (`pg_ctlcluster` version and name) that serves
/// `DATABASE_URL`: found by its data directory, so the scenario never
/// disturbs (and passes on) another server than the one under test.
async fn cluster_of(db: &TestDb) -> (String, String, String) {
    let data: String = sqlx::query_scalar("SHOW data_directory")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let out = std::process::Command::new("pg_lsclusters")
        .arg("-h")
        .output()
        .expect("pg_lsclusters: the scenario needs the server of DATABASE_URL on this machine");
    let listing = String::from_utf8_lossy(&out.stdout);
    let line = listing
        .lines()
        .find(|l| l.split_whitespace().nth(5) == Some(data.as_str()))
        .unwrap_or_else(|| {
            panic!("the server of DATABASE_URL (data directory {data}) is not a local cluster:\n{listing}")
        });
    let mut fields = line.split_whitespace();
    let version = fields.next().unwrap().to_owned();
    let name = fields.next().unwrap().to_owned();
    (version, name, data)
}

async fn started_at(db: &TestDb) -> String {
    sqlx::query_scalar("SELECT pg_postmaster_start_time()::text")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

fn pg_ctlcluster(version: &str, name: &str, action: &str) -> bool {
    std::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", version, name, action])
        .status()
        .expect("running pg_ctlcluster")
        .success()
}

/// A clean restart (a fast shutdown: sessions terminated, then start).
fn restart(version: &str, name: &str, _data: &str) {
    assert!(
        pg_ctlcluster(version, name, "restart"),
        "restarting PostgreSQL failed"
    );
}

/// A crash: the postmaster and every server process SIGKILLed at once (as
/// at a power loss), then a start, which recovers from the WAL.
fn crash(version: &str, name: &str, data: &str) {
    let pid_file = std::fs::read_to_string(format!("{data}/postmaster.pid")).unwrap();
    let postmaster: i32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
    let children: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("PPid:").map(|p| p.trim().to_owned()))
                })
                .is_some_and(|p| p == postmaster.to_string())
        })
        .collect();
    let status = std::process::Command::new("kill")
        .arg("-KILL")
        .arg(postmaster.to_string())
        .args(children.iter().map(i32::to_string))
        .status()
        .unwrap();
    assert!(status.success(), "SIGKILL of the server processes failed");
    // The processes' shared memory goes with the last of them.
    let started = Instant::now();
    while !pg_ctlcluster(version, name, "start") {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "PostgreSQL did not start after the crash"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

async fn scenario(what: &str, fault: fn(&str, &str, &str)) {
    let _turn = SERVER.lock().await;
    let db = TestDb::new().await;
    CounterView::create_table(&db.pool).await;
    let (version, name, data) = cluster_of(&db).await;
    let before = started_at(&db).await;
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
    let relay_task = tokio::spawn(relay.run(until(stopped.clone())));
    let config = RunnerConfig::new(KafkaConfig::new(brokers()))
        .topic_prefix(&prefix)
        .max_backoff(Duration::from_secs(2));
    let runner = Runner::new(db.pool.clone(), CounterView, config).unwrap();
    let runner_task = tokio::spawn(runner.run(until(stopped.clone())));
    // A session held across the fault: it must be broken by it.
    let mut held = sqlx::PgConnection::connect_with(&db.connect_options())
        .await
        .unwrap();

    let commands = 300 * scale();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move { write(&store, 20, 2, commands, Duration::from_millis(10)).await })
    };
    // The fault lands mid-run: some commands committed, more to come.
    let started = Instant::now();
    while committed(&db.pool).await < (commands / 4) as u64 {
        assert!(started.elapsed() < Duration::from_secs(60), "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !writer.is_finished() && committed(&db.pool).await < commands as u64,
        "{what}: the writer finished before the fault"
    );
    tokio::task::spawn_blocking(move || fault(&version, &name, &data))
        .await
        .unwrap();
    assert!(
        sqlx::query("SELECT 1").execute(&mut held).await.is_err(),
        "{what}: a session open before it survived: the server was not disturbed"
    );
    let after = loop {
        match sqlx::query_scalar::<_, String>("SELECT pg_postmaster_start_time()::text")
            .fetch_one(&db.pool)
            .await
        {
            Ok(t) => break t,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert_ne!(
        before, after,
        "{what}: the server of DATABASE_URL did not restart"
    );
    writer.await.unwrap();

    let figures = settle(&store, &brokers()).await;
    // Every command the writer saw succeed committed (a command whose
    // commit answer was lost may have committed too, and then again when
    // retried: more, never fewer).
    assert!(
        figures.committed >= commands as u64,
        "{what}: {} commands acknowledged, {} events committed",
        commands,
        figures.committed
    );
    figures.assert_sound(what);
    stop.send(true).unwrap();
    for task in [relay_task, runner_task] {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("stops")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_run_relay_and_runner_reconnect_by_themselves() {
    scenario("PostgreSQL restarted mid-run", restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crashed_mid_run_and_recovered_loses_nothing_committed() {
    scenario(
        "PostgreSQL crashed (every server process SIGKILLed) and recovered mid-run",
        crash,
    )
    .await;
}
