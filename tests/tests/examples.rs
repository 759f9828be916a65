//! The examples and the command lines, run as a user would, against the
//! real services: output and exit codes.

use std::process::{Command, Output};

use tidings_tests::{SpawnedDb, TestDb, brokers, database_url, example_bin, tidings_bin, unique};

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs the quick start with `KAFKA_BROKERS` set to `brokers` and checks
/// every step; returns its output.
fn quick_start(brokers: &str) -> String {
    let db = SpawnedDb::new("quickstart");
    let output = Command::new(example_bin("quickstart"))
        .env("TIDINGS_EXAMPLE_DATABASE", &db.name)
        .env("DATABASE_URL", database_url())
        .env("KAFKA_BROKERS", brokers)
        .output()
        .expect("running the quick start");
    let all = text(&output);
    assert!(output.status.success(), "{all}");
    let migrated = format!("1. database {} migrated", db.name);
    for step in [
        migrated.as_str(),
        "4. order_summary read model:",
        "read model reset (0 rows left)",
        "identical to the original: true",
    ] {
        assert!(all.contains(step), "missing `{step}` in:\n{all}");
    }
    // The replay applied every event once more.
    let applied = all
        .split("projection applied ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the applied count");
    assert!(
        all.contains(&format!("applied again: {applied}\n")),
        "{all}"
    );
    all
}

#[test]
fn the_quick_start_runs_end_to_end_and_its_replay_is_identical() {
    let all = quick_start(&brokers());
    assert!(
        all.starts_with(&format!(
            "0. broker: Kafka at {} (KAFKA_BROKERS)",
            brokers()
        )),
        "{all}"
    );
}

#[test]
fn the_quick_start_runs_on_an_embedded_broker_and_says_so_first() {
    let all = quick_start("embedded");
    assert!(
        all.starts_with("0. broker: embedded Kafka broker (librdkafka's mock cluster, in this process) at 127.0.0.1:"),
        "{all}"
    );
}

fn run_example(name: &str) -> String {
    let db = SpawnedDb::new(name);
    let output = Command::new(example_bin(name))
        .env("TIDINGS_EXAMPLE_DATABASE", &db.name)
        .env("DATABASE_URL", database_url())
        .env("KAFKA_BROKERS", brokers())
        .output()
        .expect("running an example");
    let all = text(&output);
    assert!(output.status.success(), "example {name} failed:\n{all}");
    all
}

#[test]
fn the_auctions_example_keeps_every_bid_and_their_order() {
    let out = run_example("auctions");
    assert!(out.contains("bids strictly rising: true"), "{out}");
    assert!(out.contains("equal to the aggregate: true"), "{out}");
}

#[test]
fn the_reports_example_rebuilds_identical_daily_totals() {
    let out = run_example("reports");
    // One line per UTC day of the events (a run across midnight prints two).
    let (mut orders, mut worth, mut paid, mut cancelled) = (0u32, 0f64, 0f64, 0u32);
    for line in out.lines().filter(|l| l.starts_with("2. ")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        orders += words[2].parse::<u32>().unwrap();
        worth += words[5].trim_end_matches(',').parse::<f64>().unwrap();
        paid += words[6].parse::<f64>().unwrap();
        cancelled += words[8].parse::<u32>().unwrap();
    }
    assert_eq!((orders, cancelled), (25, 5), "{out}");
    assert!(
        (worth - 3250.0).abs() < 0.005 && (paid - 1950.0).abs() < 0.005,
        "{out}"
    );
    let events = out
        .split("25 orders: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the event count");
    assert!(
        out.contains(&format!(
            "(reset: true, applied again: {events}): identical: true"
        )),
        "{out}"
    );
}

#[tokio::test]
async fn commands_work_against_the_real_services_with_reliable_exit_codes() {
    let db = TestDb::empty().await;
    let prefix = format!("{}.", unique("t"));
    let orders = |args: &[&str]| {
        Command::new(example_bin("orders"))
            .args(args)
            .env("DATABASE_URL", db.url())
            .env("KAFKA_BROKERS", brokers())
            .env("TIDINGS_TOPIC_PREFIX", &prefix)
            .env("RUST_LOG", "warn")
            .output()
            .expect("running the orders example")
    };
    let tidings = |args: &[&str]| {
        Command::new(tidings_bin())
            .args(args)
            .env("DATABASE_URL", db.url())
            .env("KAFKA_BROKERS", brokers())
            .env("RUST_LOG", "warn")
            .output()
            .expect("running tidings")
    };

    // Before migrating: a clear error, exit code 1.
    let out = tidings(&["outbox", "status"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("run `tidings migrate`"),
        "{}",
        text(&out)
    );

    let out = tidings(&["migrate"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("migrations applied"));

    let out = orders(&["create", "ORD-9", "alice", "12.5"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("order ORD-9: sequence 1"));
    let out = orders(&["pay", "ORD-9", "PAY-9", "3"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a refused command fails (1); 2 is for invalid usage: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("does not match the order total"),
        "{}",
        text(&out)
    );

    let out = tidings(&["outbox", "status", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["depth"], 1);
    assert_eq!(status["topics"][format!("{prefix}orders")], 1);

    let out = tidings(&["stream", "show", "order", "ORD-9"]);
    assert!(out.status.success(), "{}", text(&out));
    let line = String::from_utf8_lossy(&out.stdout);
    let envelope = tidings::RawEnvelope::from_slice(line.trim().as_bytes()).unwrap();
    assert_eq!(
        (envelope.event_type.as_str(), envelope.sequence),
        ("OrderCreated", 1)
    );

    let out = tidings(&["projections", "status"]);
    assert!(
        out.status.success() && text(&out).contains("no projection has run"),
        "{}",
        text(&out)
    );

    let out = tidings(&["dlq", "list"]);
    assert!(
        out.status.success() && text(&out).contains("no parked events"),
        "{}",
        text(&out)
    );

    // Bad configuration: exit code 2 and a message naming the setting.
    let out = Command::new(tidings_bin())
        .args(["outbox", "status"])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("DATABASE_URL"), "{}", text(&out));
    let out = tidings(&["relay", "-X", "novalue"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("key=value"), "{}", text(&out));
    let out = tidings(&["no-such-command"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_benchmark_program_runs_at_a_tiny_size() {
    let json = std::env::temp_dir().join(format!("{}.json", unique("bench")));
    let db = SpawnedDb::new("bench");
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .env("TIDINGS_BENCH_DATABASE", &db.name)
        .args([
            "all",
            "--commands",
            "16",
            "--events",
            "200",
            "--rate",
            "50",
            "--seconds",
            "1",
            "--backlog",
            "2000",
        ])
        .arg("--json")
        .arg(&json)
        .env("DATABASE_URL", database_url())
        .env("KAFKA_BROKERS", brokers())
        .output()
        .expect("running the benchmark");
    assert!(output.status.success(), "{}", text(&output));
    let figures: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(figures.len(), 36, "{figures:?}");
    for figure in &figures {
        assert!(figure["tidings"].as_f64().unwrap() > 0.0, "{figure}");
    }
    assert!(
        text(&output).contains("| relay drain |"),
        "{}",
        text(&output)
    );
    std::fs::remove_file(json).ok();
}

#[test]
fn schema_commands_export_and_check_against_the_lock() {
    let dir = std::env::temp_dir().join(unique("schemas"));
    let out = Command::new(example_bin("orders"))
        .args(["schema", "export", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let schema: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("OrderCreated.v2.json")).unwrap()).unwrap();
    assert_eq!(schema["title"], "OrderCreated");

    let lock = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/events.lock");
    let out = Command::new(example_bin("orders"))
        .args(["schema", "check", "--lock", lock])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // A lock recorded when OrderCreated v2 had no currency: the field is
    // now required, a breaking change without a version bump: exit 1,
    // naming the event, the field and what to do.
    let tampered = dir.join("events.lock");
    let mut locked: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lock).unwrap()).unwrap();
    let created = locked["events"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|e| e["type"] == "OrderCreated" && e["version"] == 2)
        .expect("OrderCreated v2 is locked");
    created["fingerprint"] = "0".repeat(64).into();
    created["schema"]["properties"]
        .as_object_mut()
        .unwrap()
        .remove("currency")
        .expect("the locked schema has a currency");
    std::fs::write(&tampered, serde_json::to_string_pretty(&locked).unwrap()).unwrap();
    let out = Command::new(example_bin("orders"))
        .args(["schema", "check", "--lock"])
        .arg(&tampered)
        .env_remove("TIDINGS_BLESS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    for expected in [
        "`OrderCreated` v2 changed without a version bump",
        "breaking: required field `.currency` added",
        "raise `OrderCreated`'s `version` to 3",
    ] {
        assert!(text(&out).contains(expected), "{expected}: {}", text(&out));
    }

    // The AsyncAPI document, as the embeddable command writes it.
    let document = dir.join("asyncapi.json");
    let out = Command::new(example_bin("orders"))
        .args(["schema", "asyncapi", "--topic-prefix", "prod.", "--out"])
        .arg(&document)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let document: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&document).unwrap()).unwrap();
    assert_eq!(document["asyncapi"], "3.0.0");
    assert_eq!(document["info"]["title"], "orders");
    assert_eq!(document["channels"]["orders"]["address"], "prod.orders");
    std::fs::remove_dir_all(dir).ok();
}

/// Creates orders `ORD-<i>` for each `i` of `ids`, through the store.
async fn create_orders(store: &tidings::Store, ids: std::ops::Range<usize>) {
    use tidings_examples::orders::{Order, OrderCommand};
    for i in ids {
        let id = format!("ORD-{i}");
        let create = OrderCommand::Create {
            order_id: id.clone(),
            user_id: "U".into(),
            amount: 1.0,
            currency: "EUR".into(),
        };
        store.execute::<Order>(&id, create).await.unwrap();
    }
}

/// Sends SIGTERM and waits for the process to exit on its own.
fn terminate(
    child: &mut std::process::Child,
    within: std::time::Duration,
) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            started.elapsed() < within,
            "still running {within:?} after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_and_a_runner_stop_cleanly_on_sigterm() {
    use tidings_examples::summary::OrderSummary;
    let db = TestDb::new().await;
    OrderSummary::default()
        .create_table(&db.pool)
        .await
        .unwrap();
    let (store, prefix) = tidings_tests::store_with_prefix(&db);
    create_orders(&store, 0..20).await;
    let spawn = |bin: std::path::PathBuf, args: &[&str]| {
        Command::new(bin)
            .args(args)
            .env("DATABASE_URL", db.url())
            .env("KAFKA_BROKERS", brokers())
            .env("TIDINGS_TOPIC_PREFIX", &prefix)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(tidings_tests::Spawned::from)
            .unwrap()
    };
    let mut relay = spawn(tidings_bin(), &["relay"]);
    let mut runner = spawn(example_bin("orders"), &["summary", "run"]);
    let applied = async || {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM order_summary")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    let started = std::time::Instant::now();
    while applied().await < 20 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "not applied"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let within = std::time::Duration::from_secs(15);
    let (relay_status, runner_status) = tokio::task::spawn_blocking(move || {
        (
            terminate(&mut relay, within),
            terminate(&mut runner, within),
        )
    })
    .await
    .unwrap();
    assert!(
        relay_status.success(),
        "the relay exited with {relay_status}"
    );
    assert!(
        runner_status.success(),
        "the runner exited with {runner_status}"
    );
    assert_eq!(
        tidings::store::outbox_status(&db.pool).await.unwrap().depth,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_commands_show_and_act_on_what_is_there() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use tidings::kafka::KafkaConfig;
    use tidings::projection::{Runner, RunnerConfig};
    use tidings_examples::orders::Order;
    use tidings_examples::summary::OrderSummary;
    let db = TestDb::new().await;
    let summary = OrderSummary::default();
    summary.create_table(&db.pool).await.unwrap();
    let (store, prefix) = tidings_tests::store_with_prefix(&db);
    let topic = store.topic_of::<Order>();
    create_orders(&store, 0..3).await;
    let relay = tidings::relay::Relay::new(
        db.pool.clone(),
        tidings::relay::RelayConfig::new(KafkaConfig::new(brokers())),
    )
    .unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let relay = tokio::spawn(relay.run(until(stopped.clone())));
    tidings_tests::wait_for_topic(&brokers(), &topic, std::time::Duration::from_secs(30)).await;
    // Not an envelope: dead-lettered by the summary.
    let producer: FutureProducer = tidings_tests::kafka_config().create().unwrap();
    producer
        .send(
            FutureRecord::to(&topic).key("ORD-BAD").payload("not json"),
            std::time::Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let runner = Runner::new(
        db.pool.clone(),
        summary.clone(),
        RunnerConfig::new(KafkaConfig::new(brokers())).topic_prefix(&prefix),
    )
    .unwrap();
    let stats = runner.stats();
    let runner = tokio::spawn(runner.run(until(stopped.clone())));
    let started = std::time::Instant::now();
    while stats.applied.load(std::sync::atomic::Ordering::Relaxed) < 3
        || stats
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed)
            < 1
    {
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    runner.await.unwrap().unwrap();

    let run = |bin: std::path::PathBuf, args: &[&str]| {
        let out = Command::new(bin)
            .args(args)
            .env("DATABASE_URL", db.url())
            .env("KAFKA_BROKERS", brokers())
            .env("TIDINGS_TOPIC_PREFIX", &prefix)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listed = run(tidings_bin(), &["dlq", "list"]);
    assert!(
        listed.contains("order_summary ?/ORD-BAD") && listed.contains("dead-lettered: "),
        "{listed}"
    );
    let status = run(tidings_bin(), &["projections", "status"]);
    assert!(
        status.contains("order_summary: generation 1, lag 0, dead-lettered 1, parked 0"),
        "{status}"
    );
    assert!(
        status.contains(&format!("{topic}[")),
        "every partition listed: {status}"
    );
    let redriven = run(example_bin("orders"), &["summary", "redrive"]);
    assert!(
        redriven.contains("re-driven: 0 applied, 0 already applied, 1 still parked"),
        "{redriven}"
    );
    let replayed = run(example_bin("orders"), &["summary", "replay"]);
    assert!(
        replayed.contains("projection order_summary reset; generation 2"),
        "{replayed}"
    );
    assert!(summary.rows(&db.pool).await.unwrap().is_empty(), "reset");
    let status = run(tidings_bin(), &["projections", "status"]);
    assert!(
        status.contains("order_summary: generation 2, lag 4, dead-lettered 0"),
        "the replay starts over: {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_run_serves_its_metrics_on_the_address_it_logs() {
    use tidings_examples::summary::OrderSummary;
    let db = TestDb::new().await;
    OrderSummary::default()
        .create_table(&db.pool)
        .await
        .unwrap();
    let url = db.url();
    let brokers = brokers();
    let prefix = format!("{}.", unique("t"));
    // Port 0: the runner binds a free port itself and logs it.
    let (mut runner, log) = tidings_tests::spawn_logged(
        example_bin("orders"),
        &["summary", "run", "--metrics-addr", "127.0.0.1:0"],
        &[
            ("DATABASE_URL", &url),
            ("KAFKA_BROKERS", &brokers),
            ("TIDINGS_TOPIC_PREFIX", &prefix),
            ("RUST_LOG", "info"),
            ("NO_COLOR", "1"),
        ],
    );
    let addr = tidings_tests::logged_address(&log, std::time::Duration::from_secs(30)).await;
    let body = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut socket = std::net::TcpStream::connect(addr).unwrap();
        socket
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        socket.read_to_string(&mut response).unwrap();
        response
    })
    .await
    .unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains("tidings_projection_applied_total{projection=\"order_summary\"} 0\n"),
        "{body}"
    );
    assert!(!body.contains(" -0\n"), "no negative zero: {body}");
    let status = tokio::task::spawn_blocking(move || {
        terminate(&mut runner, std::time::Duration::from_secs(15))
    })
    .await
    .unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn secret_kafka_properties_never_reach_the_logs() {
    let db = tidings_tests::SpawnedDb::new("secrets");
    let secret = "hunter2-the-secret";
    let password = format!("sasl.password={secret}");
    let url = database_url();
    let brokers = brokers();
    let (mut relay, log) = tidings_tests::spawn_logged(
        tidings_bin(),
        &[
            "relay",
            "-X",
            "security.protocol=sasl_plaintext",
            "-X",
            "sasl.mechanism=PLAIN",
            "-X",
            "sasl.username=someone",
            "-X",
            &password,
        ],
        &[
            ("DATABASE_URL", &url),
            ("KAFKA_BROKERS", &brokers),
            ("RUST_LOG", "debug"),
            ("NO_COLOR", "1"),
        ],
    );
    std::thread::sleep(std::time::Duration::from_secs(3));
    let _ = relay.kill();
    let _ = relay.wait();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let log = log.lock().unwrap().clone();
    assert!(!log.is_empty(), "the relay logged at debug level");
    assert!(!log.contains(secret), "the secret leaked:\n{log}");
    drop(db);
}

/// Partitions of `topic` and replicas of its first partition (`None` when
/// the cluster does not have it).
fn partitions_of(topic: &str) -> Option<(usize, usize)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let client: BaseConsumer = tidings_tests::kafka_config().create().unwrap();
    let metadata = client
        .fetch_metadata(None, std::time::Duration::from_secs(10))
        .unwrap();
    metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| (t.partitions().len(), t.partitions()[0].replicas().len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_flags_create_topics_as_told_or_leave_them_alone() {
    use tidings_examples::orders::Order;
    let db = TestDb::new().await;
    let (store, _) = tidings_tests::store_with_prefix(&db);
    let topic = store.topic_of::<Order>();
    create_orders(&store, 1..2).await;
    let relay = |args: &[&str]| {
        Command::new(tidings_bin())
            .arg("relay")
            .args(args)
            .env("DATABASE_URL", db.url())
            .env("KAFKA_BROKERS", brokers())
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(tidings_tests::Spawned::from)
            .unwrap()
    };
    let depth = async || tidings::store::outbox_status(&db.pool).await.unwrap().depth;

    // --no-create-topics: the topic stays missing and the row waits (an
    // absence: watched for a while).
    let mut child = relay(&["--no-create-topics"]);
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert!(child.try_wait().unwrap().is_none(), "the relay runs on");
    assert_eq!(depth().await, 1, "the row waits for its topic");
    let missing = topic.clone();
    assert_eq!(
        tokio::task::spawn_blocking(move || partitions_of(&missing))
            .await
            .unwrap(),
        None,
        "not created"
    );
    child.kill().unwrap();
    child.wait().unwrap();

    // --partitions 3 (and the other settings, each taken): created with 3
    // partitions of 1 replica, and the row goes out.
    let mut child = relay(&[
        "--partitions",
        "3",
        "--replication",
        "1",
        "--pipeline-depth",
        "1",
        "--batch-size",
        "1",
        "--delivery-timeout-secs",
        "5",
    ]);
    let started = std::time::Instant::now();
    while depth().await > 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "not published"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        tokio::task::spawn_blocking(move || partitions_of(&topic))
            .await
            .unwrap(),
        Some((3, 1))
    );
}
