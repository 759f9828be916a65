//! Metrics, health and readiness, scraped over HTTP while events flow
//! through the real services.

use std::time::{Duration, Instant};

use tidings::kafka::KafkaConfig;
use tidings::metrics::{Metrics, serve};
use tidings::projection::{Runner, RunnerConfig};
use tidings::relay::{Relay, RelayConfig};
use tidings_examples::orders::{Order, OrderCommand};
use tidings_examples::summary::OrderSummary;
use tidings_tests::{TestDb, brokers, prefixed_store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).await.unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of one series (name with labels, exactly as rendered).
fn value(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("series {series} missing in:\n{body}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_named_series_move_as_events_flow() {
    let db = TestDb::new().await;
    let store = prefixed_store(&db);
    let prefix = store
        .topic_of::<Order>()
        .trim_end_matches("orders")
        .to_owned();
    let summary = OrderSummary::default();
    summary.create_table(&db.pool).await.unwrap();
    let kafka = KafkaConfig::new(brokers());
    let relay = Relay::new(db.pool.clone(), RelayConfig::new(kafka.clone())).unwrap();
    let runner = Runner::new(
        db.pool.clone(),
        summary,
        RunnerConfig::new(kafka.clone()).topic_prefix(&prefix),
    )
    .unwrap();
    let metrics = Metrics::new(db.pool.clone(), Some(kafka));
    metrics.store(store.stats()).relay(relay.stats()).runner(
        "order_summary",
        runner.topics(),
        runner.stats(),
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let addr = serve(
        "127.0.0.1:0".parse().unwrap(),
        metrics,
        until(stopped.clone()),
    )
    .await
    .unwrap();

    let (status, before) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(value(&before, "tidings_events_appended_total"), 0.0);
    assert!(before.contains("# TYPE tidings_outbox_depth gauge"));

    for i in 0..5 {
        let id = format!("ORD-{i}");
        let create = OrderCommand::Create {
            order_id: id.clone(),
            user_id: "U".into(),
            amount: 3.0,
            currency: "EUR".into(),
        };
        store.execute::<Order>(&id, create).await.unwrap();
    }
    let (_, queued) = get(addr, "/metrics").await;
    assert_eq!(value(&queued, "tidings_events_appended_total"), 5.0);
    assert_eq!(value(&queued, "tidings_outbox_depth"), 5.0);
    let age = value(&queued, "tidings_outbox_oldest_age_seconds");
    assert!(
        age > 0.0 && age < 60.0,
        "the oldest row's age, just written: {age}"
    );

    let relay_task = tokio::spawn(relay.run(until(stopped.clone())));
    let runner_task = tokio::spawn(runner.run(until(stopped.clone())));
    let started = Instant::now();
    let after = loop {
        let (_, body) = get(addr, "/metrics").await;
        // Applied, and the relay's deletes done (they follow the
        // acknowledgements, so may come after the runner applied).
        if value(
            &body,
            "tidings_projection_applied_total{projection=\"order_summary\"}",
        ) >= 5.0
            && value(&body, "tidings_outbox_depth") == 0.0
            && value(&body, "tidings_relay_published_total") == 5.0
        {
            break body;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "events did not flow:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(value(&after, "tidings_relay_published_total"), 5.0);
    assert!(value(&after, "tidings_relay_batches_total") >= 1.0);
    assert_eq!(value(&after, "tidings_outbox_depth"), 0.0);
    assert!(
        after.contains("tidings_projection_lag{projection=\"order_summary\""),
        "{after}"
    );
    assert_eq!(
        value(
            &after,
            "tidings_projection_dead_lettered_total{projection=\"order_summary\"}"
        ),
        0.0
    );

    // Every series the README names is exported, with its values.
    for (series, at_least) in [
        ("tidings_commands_total", 5.0),
        ("tidings_append_conflicts_total", 0.0),
        ("tidings_relay_delivery_failures_total", 0.0),
        ("tidings_relay_batch_seconds_total", 0.0),
        ("tidings_relay_lanes", 1.0),
        (
            "tidings_projection_skipped_total{projection=\"order_summary\"}",
            0.0,
        ),
        (
            "tidings_projection_parked_total{projection=\"order_summary\"}",
            0.0,
        ),
        (
            "tidings_projection_retries_total{projection=\"order_summary\"}",
            0.0,
        ),
        (
            "tidings_projection_batches_total{projection=\"order_summary\"}",
            1.0,
        ),
        (
            "tidings_projection_parked{projection=\"order_summary\"}",
            0.0,
        ),
        (
            "tidings_projection_lag_known{projection=\"order_summary\"}",
            1.0,
        ),
    ] {
        assert!(value(&after, series) >= at_least, "{series} in:\n{after}");
    }
    assert_eq!(get(addr, "/health").await.0, 200);
    assert_eq!(get(addr, "/ready").await.0, 200);
    assert_eq!(get(addr, "/nothing").await.0, 404);
    stop.send(true).unwrap();
    relay_task.await.unwrap().unwrap();
    runner_task.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_relay_binary_serves_health_and_metrics() {
    let db = TestDb::new().await;
    let url = db.url();
    let brokers = brokers();
    // Port 0: the relay picks a free port and logs it.
    let (mut child, log) = tidings_tests::spawn_logged(
        tidings_tests::tidings_bin(),
        &["relay", "--metrics-addr", "127.0.0.1:0"],
        &[
            ("DATABASE_URL", &url),
            ("KAFKA_BROKERS", &brokers),
            ("RUST_LOG", "info"),
            ("NO_COLOR", "1"),
        ],
    );
    let addr = tidings_tests::logged_address(&log, Duration::from_secs(30)).await;
    assert_eq!(get(addr, "/health").await.0, 200);
    assert_eq!(get(addr, "/ready").await.0, 200);
    let (_, body) = get(addr, "/metrics").await;
    assert!(body.contains("tidings_relay_published_total 0\n"), "{body}");
    assert!(child.try_wait().unwrap().is_none(), "the relay runs on");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_answers_503_while_a_runner_cannot_reach_its_broker() {
    let db = TestDb::new().await;
    let summary = OrderSummary::default();
    summary.create_table(&db.pool).await.unwrap();
    // Nothing listens there: every consumer poll fails.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = nowhere.local_addr().unwrap().to_string();
    drop(nowhere);
    let config = RunnerConfig::new(KafkaConfig::new(&address))
        .topic_prefix(tidings_tests::unique("t"))
        .create_topics(false)
        .unhealthy_after(Duration::from_secs(2));
    let runner = Runner::new(db.pool.clone(), summary, config).unwrap();
    let stats = runner.stats();
    let metrics = Metrics::new(db.pool.clone(), None);
    metrics.runner("order_summary", runner.topics(), runner.stats());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let addr = serve(
        "127.0.0.1:0".parse().unwrap(),
        metrics,
        until(stopped.clone()),
    )
    .await
    .unwrap();
    assert_eq!(get(addr, "/ready").await.0, 200, "healthy before it fails");
    let task = tokio::spawn(runner.run(until(stopped.clone())));
    let started = Instant::now();
    while get(addr, "/ready").await.0 != 503 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "/ready stayed 200 with the runner's broker unreachable"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!stats.healthy.load(std::sync::atomic::Ordering::Relaxed));
    assert_eq!(get(addr, "/health").await.0, 200, "alive all along");
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("shutdown while the broker is unreachable")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_answers_503_while_postgres_does_not_answer() {
    use sqlx::postgres::PgPoolOptions;
    let db = TestDb::new().await;
    let server = format!(
        "{}:{}",
        db.connect_options().get_host(),
        db.connect_options().get_port()
    );
    let proxy = tidings_tests::proxy::Proxy::start(&server).await;
    let port: u16 = proxy.address.rsplit(':').next().unwrap().parse().unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with(db.connect_options().host("127.0.0.1").port(port))
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let addr = serve(
        "127.0.0.1:0".parse().unwrap(),
        Metrics::new(pool, None),
        async move {
            let mut stopped = stopped;
            let _ = stopped.wait_for(|s| *s).await;
        },
    )
    .await
    .unwrap();
    assert_eq!(
        get(addr, "/ready").await.0,
        200,
        "ready while PostgreSQL answers"
    );
    proxy.black_hole();
    let started = Instant::now();
    let (status, body) = get(addr, "/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered in time"
    );
    assert_eq!(get(addr, "/health").await.0, 200);
    stop.send(true).unwrap();
}
