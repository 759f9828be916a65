//! The outbox relay against real PostgreSQL and the real broker.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tidings::kafka::KafkaConfig;
use tidings::relay::{Relay, RelayConfig};
use tidings::{EventContext, Store, StoreConfig};
use tidings_examples::orders::{Order, OrderCommand};
use tidings_tests::{
    TestDb, brokers, check_streams, consume, outbox_depth, prefixed_store, published, tidings_bin,
};
use tokio::sync::oneshot;

fn create(id: &str) -> OrderCommand {
    OrderCommand::Create {
        order_id: id.into(),
        user_id: "U".into(),
        amount: 5.0,
        currency: "EUR".into(),
    }
}

fn relay_config() -> RelayConfig {
    RelayConfig::new(KafkaConfig::new(brokers())).poll_interval(Duration::from_millis(200))
}

/// Runs a relay in the background until the returned sender is dropped or fired.
fn spawn_relay(
    db: &TestDb,
    config: RelayConfig,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<tidings::Result<()>>,
) {
    // RUST_LOG=tidings=debug shows what the relays do.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let relay = Relay::new(db.pool.clone(), config).expect("relay");
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    (stop, handle)
}

async fn wait_outbox_empty(db: &TestDb, within: Duration) {
    let within = tidings_tests::scaled(within);
    let start = Instant::now();
    loop {
        let depth = tidings::store::outbox_status(&db.pool).await.unwrap().depth;
        if depth == 0 {
            return;
        }
        assert!(
            start.elapsed() < within,
            "outbox still has {depth} rows after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_events_arrive_exactly_as_stored_and_rolled_back_ones_never() {
    let db = TestDb::new().await;
    let store = prefixed_store(&db);
    let topic = store.topic_of::<Order>();
    let (stop, relay) = spawn_relay(&db, relay_config());

    store
        .execute::<Order>("ORD-1", create("ORD-1"))
        .await
        .unwrap();
    store
        .execute::<Order>(
            "ORD-1",
            OrderCommand::Pay {
                payment_id: "P".into(),
                amount: 5.0,
            },
        )
        .await
        .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    store
        .execute_in::<Order>(
            &mut tx,
            "ORD-GONE",
            create("ORD-GONE"),
            &EventContext::new(),
        )
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    store
        .execute::<Order>("ORD-2", create("ORD-2"))
        .await
        .unwrap();

    wait_outbox_empty(&db, Duration::from_secs(30)).await;
    let received = consume(&topic, 3, Duration::from_secs(2), Duration::from_secs(30)).await;
    assert_eq!(
        received.len(),
        3,
        "three committed events, the rolled-back one never"
    );
    for id in ["ORD-1", "ORD-2"] {
        let stored = store.read_stream("order", id).await.unwrap();
        let got: Vec<_> = received.iter().filter(|m| m.key == id).collect();
        assert_eq!(got.len(), stored.len());
        for (message, envelope) in got.iter().zip(&stored) {
            assert_eq!(
                message.envelope.as_ref(),
                Some(envelope),
                "arrives exactly as stored"
            );
            let headers: BTreeMap<_, _> = message.headers.iter().cloned().collect();
            assert_eq!(headers["event_type"], envelope.event_type);
            assert_eq!(headers["event_version"], envelope.event_version.to_string());
            assert_eq!(headers["event_id"], envelope.event_id.to_string());
            assert_eq!(headers["aggregate_type"], "order");
        }
    }
    assert!(received.iter().all(|m| m.key != "ORD-GONE"));
    stop.send(()).unwrap();
    relay.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_share_the_lanes_take_over_a_stopped_ones_and_keep_every_aggregate_in_order() {
    use std::sync::atomic::Ordering::Relaxed;
    let aggregates: u64 = std::env::var("TIDINGS_TEST_AGGREGATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let per: u64 = std::env::var("TIDINGS_TEST_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let db = TestDb::new().await;
    let store = prefixed_store(&db);
    let topic = store.topic_of::<Order>();
    let mut relays: Vec<_> = (0..3)
        .map(|_| {
            let relay = Relay::new(db.pool.clone(), relay_config().batch_size(200)).unwrap();
            let stats = relay.stats();
            let (stop, stopped) = oneshot::channel::<()>();
            let handle = tokio::spawn(relay.run(async move {
                let _ = stopped.await;
            }));
            (stop, handle, stats)
        })
        .collect();
    let lanes = |relays: &[(_, _, std::sync::Arc<tidings::relay::RelayStats>)]| {
        relays
            .iter()
            .map(|(_, _, s)| s.lanes.load(Relaxed))
            .collect::<Vec<_>>()
    };
    // The lanes are shared: every relay owns some, together all of them.
    let started = Instant::now();
    while !(lanes(&relays).iter().all(|l| *l > 0)
        && lanes(&relays).iter().sum::<u64>() == tidings::store::OUTBOX_LANES as u64)
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the lanes were not shared: {:?}",
            lanes(&relays)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("lanes shared: {:?}", lanes(&relays));

    // Write while the relays run: each aggregate gets `per` events, written
    // in rounds so that all streams grow concurrently. Halfway through,
    // one relay stops; the others take its lanes over.
    let ids: Vec<String> = (0..aggregates).map(|i| format!("ORD-{i:04}")).collect();
    let mut conn = db.pool.acquire().await.unwrap();
    let mut stopped_one = None;
    for round in 0..per {
        if round == per / 2 {
            wait_outbox_empty(&db, Duration::from_secs(120)).await;
            let (stop, handle, stats) = relays.remove(0);
            stop.send(()).unwrap();
            handle.await.unwrap().unwrap();
            let survivors_before: u64 = relays
                .iter()
                .map(|(_, _, s)| s.published.load(Relaxed))
                .sum();
            stopped_one = Some((stats.published.load(Relaxed), survivors_before));
        }
        let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
        for id in &ids {
            let event = if round == 0 {
                tidings_examples::orders::OrderEvent::OrderCreated {
                    order_id: id.clone(),
                    user_id: "U".into(),
                    amount: 1.0,
                    currency: "EUR".into(),
                }
            } else {
                tidings_examples::orders::OrderEvent::PaymentProcessed {
                    payment_id: format!("P{round}"),
                    amount: 1.0,
                }
            };
            store
                .append::<Order>(&mut tx, id, round, &[event], &EventContext::new())
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }
    drop(conn);
    wait_outbox_empty(&db, Duration::from_secs(120)).await;
    let (stopped_published, survivors_before) = stopped_one.expect("a relay stopped");
    let survivors_after: u64 = relays
        .iter()
        .map(|(_, _, s)| s.published.load(Relaxed))
        .sum();
    assert!(
        stopped_published > 0,
        "the stopped relay had published its share"
    );
    assert_eq!(
        lanes(&relays).iter().sum::<u64>(),
        tidings::store::OUTBOX_LANES as u64,
        "the survivors own every lane: {:?}",
        lanes(&relays)
    );
    assert!(
        survivors_after - survivors_before >= aggregates * (per - per / 2),
        "the survivors published the second half, the stopped relay's lanes included"
    );
    let total = (aggregates * per) as usize;
    let received = consume(
        &topic,
        total,
        Duration::from_secs(3),
        Duration::from_secs(120),
    )
    .await;
    let expected: BTreeMap<String, u64> = ids.iter().map(|id| (id.clone(), per)).collect();
    let duplicates = check_streams(&received, &expected);
    println!(
        "3 relays: {total} events, {} received, {duplicates} duplicates; the stopped relay published {stopped_published}",
        received.len()
    );
    for (stop, handle, _) in relays {
        stop.send(()).unwrap();
        handle.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_with_a_lower_id_is_still_published() {
    let db = TestDb::new().await;
    let store = prefixed_store(&db);
    let topic = store.topic_of::<Order>();
    let (stop, relay) = spawn_relay(&db, relay_config());

    // A takes the lower outbox id but commits last.
    let mut slow = db.pool.begin().await.unwrap();
    store
        .execute_in::<Order>(
            &mut slow,
            "ORD-SLOW",
            create("ORD-SLOW"),
            &EventContext::new(),
        )
        .await
        .unwrap();
    store
        .execute::<Order>("ORD-FAST", create("ORD-FAST"))
        .await
        .unwrap();
    let fast = consume(
        &topic,
        1,
        Duration::from_millis(500),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        fast.iter().map(|m| m.key.as_str()).collect::<Vec<_>>(),
        ["ORD-FAST"]
    );
    slow.commit().await.unwrap();

    wait_outbox_empty(&db, Duration::from_secs(30)).await;
    let all = consume(&topic, 2, Duration::from_secs(1), Duration::from_secs(30)).await;
    let mut keys: Vec<_> = all.iter().map(|m| m.key.clone()).collect();
    keys.sort();
    assert_eq!(keys, ["ORD-FAST", "ORD-SLOW"]);
    stop.send(()).unwrap();
    relay.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_wakes_on_commit() {
    let db = TestDb::new().await;
    let store = prefixed_store(&db);
    // Poll only every 30 s: anything faster is the notification.
    let (stop, relay) = spawn_relay(&db, relay_config().poll_interval(Duration::from_secs(30)));
    store
        .execute::<Order>("ORD-0", create("ORD-0"))
        .await
        .unwrap();
    wait_outbox_empty(&db, Duration::from_secs(20)).await; // topic creation on first use
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start = Instant::now();
    store
        .execute::<Order>("ORD-1", create("ORD-1"))
        .await
        .unwrap();
    wait_outbox_empty(&db, Duration::from_secs(5)).await;
    let latency = start.elapsed();
    println!("idle relay: commit to acknowledged and deleted in {latency:?}");
    assert!(
        latency < Duration::from_secs(5),
        "woken by the notification, not the 30 s poll"
    );
    stop.send(()).unwrap();
    relay.await.unwrap().unwrap();
}

#[tokio::test]
async fn invalid_topics_and_settings_are_refused_clearly() {
    let error = tidings::validate_topic_name("orders and payments").unwrap_err();
    assert!(
        error
            .to_string()
            .contains("invalid topic name `orders and payments`"),
        "{error}"
    );
    let db = TestDb::new().await;
    let store = Store::with_config(
        db.pool.clone(),
        StoreConfig::default().topic_prefix("bad prefix/"),
    );
    let error = store
        .execute::<Order>("ORD-1", create("ORD-1"))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("invalid topic name"), "{error}");

    let config = RelayConfig::new(KafkaConfig::new(brokers()).set("enable.idempotence", "false"));
    let error = Relay::new(db.pool.clone(), config).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("requires enable.idempotence=true"),
        "{error}"
    );
    let config = RelayConfig::new(KafkaConfig::new(brokers()).set("partitioner", "random"));
    let error = Relay::new(db.pool.clone(), config).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("partitioner that hashes the key"),
        "a partitioner that scatters an aggregate is refused: {error}"
    );
    let error = KafkaConfig::new("x")
        .with_properties(["novalue"])
        .unwrap_err();
    assert!(error.to_string().contains("key=value"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_processes_killed_mid_batch_lose_nothing() {
    let aggregates = 50u64;
    let db = TestDb::new().await;
    let store = prefixed_store(&db);
    let topic = store.topic_of::<Order>();
    let spawn = || {
        std::process::Command::new(tidings_bin())
            .args(["relay", "--batch-size", "50"])
            .env("DATABASE_URL", db.url())
            .env("KAFKA_BROKERS", brokers())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .map(tidings_tests::Spawned::from)
            .expect("spawning tidings relay")
    };
    // Rounds of one event per aggregate, written until the kills are done
    // (at least 20), so that every kill lands while commands stream in.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let store = store.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut round = 0;
            while round < 20 || !done.load(std::sync::atomic::Ordering::Relaxed) {
                for i in 0..aggregates {
                    let id = format!("ORD-{i:03}");
                    let event = tidings_examples::orders::OrderEvent::PaymentProcessed {
                        payment_id: format!("P{round}"),
                        amount: 1.0,
                    };
                    let mut conn = store.pool().acquire().await.unwrap();
                    store
                        .append::<Order>(&mut conn, &id, round, &[event], &EventContext::new())
                        .await
                        .unwrap();
                }
                round += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            round
        })
    };
    let mut kills = 0;
    let mut child = spawn();
    while kills < 4 {
        // Each kill lands mid-run: this relay published since it started
        // and rows are waiting.
        let at_spawn = published(&db.pool).await;
        let started = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(5 + fastrand::u64(0..40))).await;
            if published(&db.pool).await > at_spawn && outbox_depth(&db.pool).await > 0 {
                break;
            }
            assert!(
                started.elapsed() < tidings_tests::scaled(Duration::from_secs(60)),
                "the relay never published with rows waiting"
            );
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the relay exited on its own: {:?}",
            child.try_wait()
        );
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        child = spawn();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let per = writer.await.unwrap();
    wait_outbox_empty(&db, Duration::from_secs(60)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the last relay exited on its own: {:?}",
        child.try_wait()
    );
    child.kill().unwrap();
    child.wait().unwrap();

    let total = (aggregates * per) as usize;
    let received = consume(
        &topic,
        total,
        Duration::from_secs(3),
        Duration::from_secs(120),
    )
    .await;
    let expected: BTreeMap<String, u64> = (0..aggregates)
        .map(|i| (format!("ORD-{i:03}"), per))
        .collect();
    let duplicates = check_streams(&received, &expected);
    println!(
        "relay SIGKILLed {kills} times: {total} events, none lost, {duplicates} duplicates absorbed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_stopped_and_restarted_mid_run_loses_nothing() {
    let mut broker = tidings_tests::OwnBroker::start().await;
    let db = TestDb::new().await;
    let store = prefixed_store(&db);
    let topic = store.topic_of::<Order>();
    let config = RelayConfig::new(KafkaConfig::new(&broker.address))
        .poll_interval(Duration::from_millis(200))
        .delivery_timeout(Duration::from_secs(3));
    let relay = Relay::new(db.pool.clone(), config).unwrap();
    let stats = relay.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));

    let aggregates = 20u64;
    let per = 30u64;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for round in 0..per {
                for i in 0..aggregates {
                    let event = tidings_examples::orders::OrderEvent::PaymentProcessed {
                        payment_id: format!("P{round}"),
                        amount: 1.0,
                    };
                    let mut conn = store.pool().acquire().await.unwrap();
                    store
                        .append::<Order>(
                            &mut conn,
                            &format!("ORD-{i:02}"),
                            round,
                            &[event],
                            &EventContext::new(),
                        )
                        .await
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    use std::sync::atomic::Ordering::Relaxed;
    // Mid-run: some rows published, the writer still going.
    let started = Instant::now();
    while stats.published.load(Relaxed) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "nothing published"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker.kill();
    let published_before = stats.published.load(Relaxed);
    // The broker stays away until deliveries failed (past the 3 s delivery
    // timeout): the failed-row path runs for sure, not by chance.
    let started = Instant::now();
    while stats.failed.load(Relaxed) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no delivery failed with the broker down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.resume();
    writer.await.unwrap();
    wait_outbox_empty(&db, Duration::from_secs(90)).await;
    stop.send(()).unwrap();
    handle.await.unwrap().unwrap();

    let total = (aggregates * per) as usize;
    let received = tidings_tests::consume_from(
        &broker.address,
        &topic,
        total,
        Duration::from_secs(3),
        Duration::from_secs(90),
    )
    .await;
    let expected: BTreeMap<String, u64> = (0..aggregates)
        .map(|i| (format!("ORD-{i:02}"), per))
        .collect();
    let duplicates = check_streams(&received, &expected);
    let failed = stats.failed.load(Relaxed);
    println!(
        "broker restart: {total} events, {published_before} published before the stop, {failed} deliveries failed and retried, none lost, {duplicates} duplicates"
    );
    assert!(
        published_before > 0 && published_before < total as u64,
        "the stop happened mid-run"
    );
    assert!(failed > 0, "deliveries failed and were retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_before_the_header_columns_keep_their_headers() {
    let db = TestDb::new().await;
    let store = prefixed_store(&db);
    let topic = store.topic_of::<Order>();
    // One row as an older version wrote it (headers as JSONB, no header
    // columns), then one as this version writes it, of the same aggregate.
    let old = tidings::RawEnvelope::from_event(
        "order",
        "ORD-OLD",
        1,
        &tidings_examples::orders::OrderEvent::OrderCancelled {
            reason: "written before migration 0003".into(),
        },
        &EventContext::new(),
    )
    .unwrap();
    sqlx::query(
        "INSERT INTO tidings_outbox (lane, topic, message_key, aggregate_type, aggregate_id, sequence, event_id, headers, envelope) \
         VALUES ($1, $2, 'ORD-OLD', 'order', 'ORD-OLD', 1, $3, $4, $5)",
    )
    .bind(tidings::store::lane_of("order", "ORD-OLD"))
    .bind(&topic)
    .bind(old.event_id)
    .bind(sqlx::types::Json(BTreeMap::from([
        ("event_type", old.event_type.clone()),
        ("event_version", old.event_version.to_string()),
        ("event_id", old.event_id.to_string()),
        ("aggregate_type", "order".to_owned()),
        ("written_by", "an older version".to_owned()),
    ])))
    .bind(old.to_json())
    .execute(&db.pool)
    .await
    .unwrap();
    store
        .execute::<Order>("ORD-NEW", create("ORD-NEW"))
        .await
        .unwrap();

    let (stop, relay) = spawn_relay(&db, relay_config());
    wait_outbox_empty(&db, Duration::from_secs(30)).await;
    let received = consume(&topic, 2, Duration::from_secs(1), Duration::from_secs(30)).await;
    let headers = |key: &str| -> BTreeMap<String, String> {
        let message = received.iter().find(|m| m.key == key).expect(key);
        message.headers.iter().cloned().collect()
    };
    let older = headers("ORD-OLD");
    assert_eq!(
        older["written_by"], "an older version",
        "stored headers, as stored"
    );
    assert_eq!(older["event_id"], old.event_id.to_string());
    let newer = headers("ORD-NEW");
    assert_eq!(newer["event_type"], "OrderCreated");
    assert_eq!(newer["aggregate_type"], "order");
    assert_eq!(newer.len(), 4, "{newer:?}");
    stop.send(()).unwrap();
    relay.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_the_relay_creates_keep_their_whole_history() {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let db = TestDb::new().await;
    let store = prefixed_store(&db);
    let topic = store.topic_of::<Order>();
    store
        .execute::<Order>("ORD-1", create("ORD-1"))
        .await
        .unwrap();
    let (stop, relay) = spawn_relay(&db, relay_config());
    wait_outbox_empty(&db, Duration::from_secs(30)).await;
    stop.send(()).unwrap();
    relay.await.unwrap().unwrap();
    let admin: AdminClient<DefaultClientContext> = tidings_tests::kafka_config().create().unwrap();
    let described = admin
        .describe_configs(
            &[ResourceSpecifier::Topic(&topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    let resource = described
        .into_iter()
        .next()
        .unwrap()
        .expect("the topic's configs");
    let value = |name: &str| {
        resource
            .get(name)
            .and_then(|entry| entry.value.clone())
            .unwrap_or_else(|| panic!("{name} missing in {:?}", resource.entries))
    };
    assert_eq!(
        value("retention.ms"),
        "-1",
        "replays need the whole history"
    );
    assert_eq!(value("retention.bytes"), "-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_in_the_appending_transaction_notifies_and_relays_still_wake_at_once() {
    let db = TestDb::new().await;
    let triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'tidings_outbox'::regclass AND NOT tgisinternal",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(triggers, 0, "no trigger fires in the appending transaction");
    let store = prefixed_store(&db);
    // Poll only every 30 s once idle: anything faster is a wake.
    let (stop, relay) = spawn_relay(&db, relay_config().poll_interval(Duration::from_secs(30)));
    store
        .execute::<Order>("ORD-0", create("ORD-0"))
        .await
        .unwrap();
    wait_outbox_empty(&db, Duration::from_secs(20)).await; // topic creation on first use
    tokio::time::sleep(Duration::from_secs(2)).await; // idle: the poll backed off
    // A command in the caller's own transaction: its wake comes before the
    // caller commits, 100 ms later; the faster polls after it find the row.
    let mut tx = db.pool.begin().await.unwrap();
    store
        .execute_in::<Order>(&mut tx, "ORD-1", create("ORD-1"), &EventContext::new())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    tx.commit().await.unwrap();
    let committed = Instant::now();
    wait_outbox_empty(&db, Duration::from_secs(5)).await;
    let latency = committed.elapsed();
    println!("idle relay, caller's transaction: commit to published in {latency:?}");
    assert!(
        latency < Duration::from_secs(2),
        "found by the polls after the wake, not the 30 s poll: {latency:?}"
    );
    stop.send(()).unwrap();
    relay.await.unwrap().unwrap();
}

/// Index scans of the outbox and the tuples they fetched so far (all
/// backends of this database), once the statistics show at least `scans`.
async fn outbox_tuples_fetched(db: &TestDb, scans: i64) -> (i64, i64) {
    let mut seen = (0, 0);
    tidings_tests::wait_until(
        "the outbox statistics to show the read",
        Duration::from_secs(20),
        async || {
            let (idx_scan, fetched): (i64, i64) = sqlx::query_as(
                "SELECT coalesce(idx_scan, 0), coalesce(idx_tup_fetch, 0) \
             FROM pg_stat_user_tables WHERE relname = 'tidings_outbox'",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            seen = (idx_scan, fetched);
            idx_scan >= scans
        },
    )
    .await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_read_never_walks_the_backlog_of_other_lanes_ahead_of_its_rows() {
    let db = TestDb::new().await;
    // Statistics from before the backlog, as after a stall.
    for (lanes, rows) in [(0..64, 640), (32..64, 20_000), (0..32, 100)] {
        if rows == 20_000 {
            sqlx::query("ANALYZE tidings_outbox")
                .execute(&db.pool)
                .await
                .unwrap();
            sqlx::query("TRUNCATE tidings_outbox")
                .execute(&db.pool)
                .await
                .unwrap();
        }
        sqlx::query(
            "INSERT INTO tidings_outbox (lane, topic, message_key, aggregate_type, aggregate_id, sequence, \
             event_id, event_type, event_version, envelope) \
             SELECT $1 + g % $2, 't', 'A-' || g, 'a', 'A-' || g, 1, gen_random_uuid(), 'E', 1, '{}' \
             FROM generate_series(1, $3) g",
        )
        .bind(lanes.start)
        .bind(lanes.end - lanes.start)
        .bind(rows)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let (scans, before) = outbox_tuples_fetched(&db, 0).await;
    let own: Vec<i32> = (0..32).collect();
    let read = tidings::relay::read_batch_for_measurement(&db.pool, &own, 500)
        .await
        .unwrap();
    assert_eq!(read, 100, "the read finds the rows of its own lanes");
    let (_, after) = outbox_tuples_fetched(&db, scans + 1).await;
    let fetched = after - before;
    assert!(
        fetched < 1_000,
        "one read of 100 rows fetched {fetched} tuples: it walked the 20000 rows of other lanes ahead"
    );
}
