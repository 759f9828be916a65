//! The PostgreSQL store and outbox against a real database (one per test).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::Row;
use tidings::{
    Aggregate, Error, Event, EventContext, ExecuteError, RawEnvelope, Store, StoreConfig,
};
use tidings_examples::orders::{Order, OrderCommand, OrderError, OrderEvent, OrderStatus};
use tidings_tests::TestDb;

fn create(id: &str, amount: f64) -> OrderCommand {
    OrderCommand::Create {
        order_id: id.into(),
        user_id: "USR-1".into(),
        amount,
        currency: "EUR".into(),
    }
}

/// A ledger: every deposit is accepted, so concurrent commands must all land.
#[derive(Debug, Clone, PartialEq, Event)]
enum LedgerEvent {
    Deposited { amount: i64, by: u32 },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Ledger {
    balance: i64,
    deposits: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl Aggregate for Ledger {
    const TYPE: &'static str = "ledger";
    const SNAPSHOT_EVERY: u64 = 5;
    type Event = LedgerEvent;
    type Command = (i64, u32);
    type Error = Never;

    fn handle(&self, (amount, by): (i64, u32)) -> Result<Vec<LedgerEvent>, Never> {
        Ok(vec![LedgerEvent::Deposited { amount, by }])
    }

    fn apply(&mut self, event: &LedgerEvent) {
        let LedgerEvent::Deposited { amount, .. } = event;
        self.balance += amount;
        self.deposits += 1;
    }
}

async fn outbox_rows(db: &TestDb) -> Vec<sqlx::postgres::PgRow> {
    sqlx::query("SELECT * FROM tidings_outbox ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn append_load_and_outbox_rows_match_exactly() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let context = EventContext::new()
        .correlation_id("req-1")
        .metadata("tenant", "acme");
    let first = store
        .execute_with::<Order>("ORD-1", create("ORD-1", 10.0), &context)
        .await
        .unwrap();
    assert_eq!((first.sequence, first.envelopes.len()), (1, 1));
    let paid = store
        .execute::<Order>(
            "ORD-1",
            OrderCommand::Pay {
                payment_id: "P-1".into(),
                amount: 10.0,
            },
        )
        .await
        .unwrap();
    assert_eq!(paid.sequence, 2);
    assert_eq!(paid.state.status, OrderStatus::Paid);

    let loaded = store.load::<Order>("ORD-1").await.unwrap();
    assert_eq!(loaded.sequence, 2);
    assert_eq!(loaded.state, paid.state);

    let stream = store.read_stream("order", "ORD-1").await.unwrap();
    let committed: Vec<RawEnvelope> = first.envelopes.into_iter().chain(paid.envelopes).collect();
    assert_eq!(
        stream, committed,
        "the stream reads back exactly as appended"
    );
    assert_eq!(stream[0].correlation_id.as_deref(), Some("req-1"));
    assert_eq!(stream[0].metadata["tenant"], "acme");
    assert_eq!(stream[0].payload["currency"], "EUR");

    let rows = outbox_rows(&db).await;
    assert_eq!(rows.len(), 2);
    for (row, envelope) in rows.iter().zip(&committed) {
        assert_eq!(row.get::<String, _>("topic"), "orders");
        assert_eq!(row.get::<String, _>("message_key"), "ORD-1");
        assert_eq!(row.get::<i64, _>("sequence") as u64, envelope.sequence);
        assert_eq!(row.get::<uuid::Uuid, _>("event_id"), envelope.event_id);
        let wire = RawEnvelope::from_slice(row.get::<String, _>("envelope").as_bytes()).unwrap();
        assert_eq!(&wire, envelope, "the outbox carries the stored envelope");
        assert_eq!(
            row.get::<String, _>("envelope"),
            envelope.to_json(),
            "byte for byte"
        );
        assert_eq!(row.get::<String, _>("event_type"), envelope.event_type);
        assert_eq!(
            row.get::<i32, _>("event_version") as u32,
            envelope.event_version
        );
    }
}

#[tokio::test]
async fn domain_errors_stay_apart_and_write_nothing() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let error = store
        .execute::<Order>(
            "ORD-404",
            OrderCommand::Pay {
                payment_id: "P".into(),
                amount: 1.0,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, ExecuteError::Rejected(OrderError::NotFound)),
        "{error}"
    );
    store
        .execute::<Order>("ORD-1", create("ORD-1", 5.0))
        .await
        .unwrap();
    let error = store
        .execute::<Order>(
            "ORD-1",
            OrderCommand::Pay {
                payment_id: "P".into(),
                amount: 4.0,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(
        error,
        ExecuteError::Rejected(OrderError::WrongAmount { .. })
    ));
    assert_eq!(outbox_rows(&db).await.len(), 1);
}

#[tokio::test]
async fn old_versions_are_upcast_on_load_and_never_rewritten() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    // An OrderCreated v1 row written by older code: no currency.
    sqlx::query(
        "INSERT INTO tidings_events (event_id, aggregate_type, aggregate_id, sequence, event_type, \
         event_version, recorded_at, payload) VALUES ($1, 'order', 'ORD-OLD', 1, 'OrderCreated', 1, now(), $2)",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(json!({"order_id": "ORD-OLD", "user_id": "USR-9", "amount": 20.0}))
    .execute(&db.pool)
    .await
    .unwrap();
    let loaded = store.load::<Order>("ORD-OLD").await.unwrap();
    assert_eq!(loaded.state.currency, "USD");
    assert_eq!(loaded.state.status, OrderStatus::Created);
    store
        .execute::<Order>(
            "ORD-OLD",
            OrderCommand::Pay {
                payment_id: "P".into(),
                amount: 20.0,
            },
        )
        .await
        .unwrap();
    let stream = store.read_stream("order", "ORD-OLD").await.unwrap();
    assert_eq!(
        (stream[0].event_version, stream[1].sequence),
        (1, 2),
        "the v1 row is kept as it was"
    );
    let decoded = stream[0].clone().decode::<OrderEvent>().unwrap();
    assert_eq!(decoded.event_version, 2);
}

#[tokio::test]
async fn a_stale_append_is_a_typed_conflict() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    store.execute::<Ledger>("L-1", (5, 0)).await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let error = store
        .append::<Ledger>(
            &mut conn,
            "L-1",
            0,
            &[LedgerEvent::Deposited { amount: 1, by: 9 }],
            &EventContext::new(),
        )
        .await
        .unwrap_err();
    // The message of the error the store returned, not of one built here.
    let message = error.to_string();
    assert!(
        message.contains("ledger/L-1: expected to append after sequence 0, the stream is at 1"),
        "{message}"
    );
    match error {
        Error::Conflict {
            aggregate_type,
            aggregate_id,
            expected,
            actual,
        } => {
            assert_eq!(
                (aggregate_type.as_str(), aggregate_id.as_str()),
                ("ledger", "L-1")
            );
            assert_eq!((expected, actual), (0, 1));
        }
        other => panic!("expected a conflict, got {other}"),
    }
}

#[tokio::test]
async fn a_cached_aggregate_gone_stale_is_reloaded_not_trusted() {
    let db = TestDb::new().await;
    // Two stores: two processes writing the same aggregate, each with its cache.
    let a = Store::new(db.pool.clone());
    let b = Store::new(db.pool.clone());
    a.execute::<Ledger>("L-1", (10, 0)).await.unwrap(); // a caches balance 10
    b.execute::<Ledger>("L-1", (5, 1)).await.unwrap(); // a's cache is now stale
    let third = a.execute::<Ledger>("L-1", (1, 2)).await.unwrap();
    assert_eq!(
        third.retries, 1,
        "the stale entry cost one conflict and a reload"
    );
    assert_eq!((third.state.balance, third.sequence), (16, 3));
    let fourth = a.execute::<Ledger>("L-1", (1, 3)).await.unwrap();
    assert_eq!(
        (fourth.retries, fourth.state.balance, fourth.sequence),
        (0, 17, 4)
    );
    assert_eq!(a.load::<Ledger>("L-1").await.unwrap().state.balance, 17);
}

#[tokio::test]
async fn a_creation_appends_at_the_start_and_refuses_a_stream_that_exists() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let created = store
        .create::<Order>("ORD-NEW", create("ORD-NEW", 12.0))
        .await
        .unwrap();
    assert_eq!((created.sequence, created.envelopes.len()), (1, 1));
    // Another process creating it again: its decision would be events,
    // and the append finds the stream.
    let again = Store::new(db.pool.clone())
        .create::<Order>("ORD-NEW", create("ORD-NEW", 99.0))
        .await;
    assert!(
        matches!(
            again,
            Err(ExecuteError::Store(Error::Conflict {
                expected: 0,
                actual: 1,
                ..
            }))
        ),
        "{again:?}"
    );
    // A decision the append never checks (a refusal on the empty state)
    // is a conflict too: the stream exists.
    let refused = Store::new(db.pool.clone())
        .create::<Order>(
            "ORD-NEW",
            OrderCommand::Pay {
                payment_id: "P-1".into(),
                amount: 12.0,
            },
        )
        .await;
    assert!(
        matches!(refused, Err(ExecuteError::Store(Error::Conflict { .. }))),
        "{refused:?}"
    );
    let stream = store.load::<Order>("ORD-NEW").await.unwrap();
    assert_eq!(stream.sequence, 1, "nothing more was written");
    assert_eq!(stream.state.amount, 12.0);
}

#[tokio::test]
async fn a_conflict_retry_reads_only_the_events_after_the_cached_state() {
    let db = TestDb::new().await;
    let a = Store::new(db.pool.clone());
    let b = Store::new(db.pool.clone());
    a.execute::<Ledger>("L-1", (10, 0)).await.unwrap(); // a caches sequence 1
    b.execute::<Ledger>("L-1", (5, 1)).await.unwrap();
    b.execute::<Ledger>("L-1", (3, 1)).await.unwrap();
    // The first event can no longer be decoded: a whole load now fails, so
    // a retry that succeeds read only what came after a's cached state.
    sqlx::query(
        "UPDATE tidings_events SET payload = '{\"not\": \"a deposit\"}' \
         WHERE aggregate_id = 'L-1' AND sequence = 1",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let whole = Store::new(db.pool.clone()).load::<Ledger>("L-1").await;
    assert!(
        matches!(whole, Err(tidings::Error::Decode { .. })),
        "{whole:?}"
    );
    let retried = a.execute::<Ledger>("L-1", (1, 2)).await.unwrap();
    assert_eq!(retried.retries, 1, "one conflict, then the catch-up");
    assert_eq!((retried.state.balance, retried.sequence), (19, 4));
}

#[tokio::test]
async fn a_conflict_retry_on_a_rewritten_history_loads_the_stream_whole() {
    let db = TestDb::new().await;
    let a = Store::new(db.pool.clone());
    let b = Store::new(db.pool.clone());
    a.execute::<Ledger>("L-1", (10, 0)).await.unwrap(); // a caches sequence 1
    // The event a's state was built from is gone (a commit lost in a
    // failover) and the stream went on without it.
    sqlx::query("DELETE FROM tidings_events WHERE aggregate_id = 'L-1'")
        .execute(&db.pool)
        .await
        .unwrap();
    b.execute::<Ledger>("L-1", (7, 1)).await.unwrap();
    b.execute::<Ledger>("L-1", (5, 1)).await.unwrap();
    let retried = a.execute::<Ledger>("L-1", (1, 2)).await.unwrap();
    assert_eq!(retried.retries, 1);
    assert_eq!(
        (retried.state.balance, retried.sequence),
        (13, 3),
        "built from the stream as it is (7 + 5 + 1), not the lost 10 plus what came after"
    );
}

#[tokio::test]
async fn an_append_past_the_stream_end_is_a_conflict_not_a_gap() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    store.execute::<Ledger>("L-1", (5, 0)).await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let event = [LedgerEvent::Deposited { amount: 1, by: 9 }];
    let error = store
        .append::<Ledger>(&mut conn, "L-1", 3, &event, &EventContext::new())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::Conflict {
                expected: 3,
                actual: 1,
                ..
            }
        ),
        "{error}"
    );
    let sequences: Vec<i64> =
        sqlx::query_scalar("SELECT sequence FROM tidings_events ORDER BY sequence")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(sequences, [1], "no gap was written");
}

#[tokio::test]
async fn an_event_too_large_for_kafka_is_refused_at_append() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let huge = OrderCommand::Create {
        order_id: "ORD-HUGE".into(),
        user_id: "U".repeat(tidings::store::MAX_ENVELOPE_BYTES),
        amount: 1.0,
        currency: "EUR".into(),
    };
    let error = store.execute::<Order>("ORD-HUGE", huge).await.unwrap_err();
    assert!(
        matches!(error, ExecuteError::Store(Error::EventTooLarge { .. })),
        "{error}"
    );
    assert!(error.to_string().contains("over the limit"), "{error}");
    assert_eq!(outbox_rows(&db).await.len(), 0);
}

#[tokio::test]
async fn fifty_concurrent_commands_on_one_aggregate_lose_nothing() {
    let db = TestDb::new().await;
    let store = Store::with_config(
        db.pool.clone(),
        StoreConfig::default().max_conflict_retries(200),
    );
    let tasks: Vec<_> = (0..50u32)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .execute::<Ledger>("L-HOT", (i64::from(i) + 1, i))
                    .await
            })
        })
        .collect();
    let mut retries = 0;
    for task in tasks {
        retries += task.await.unwrap().unwrap().retries;
    }
    assert!(
        retries > 0,
        "50 concurrent writers on one stream must have conflicted"
    );

    let loaded = store.load::<Ledger>("L-HOT").await.unwrap();
    assert_eq!(
        loaded.state.balance,
        (1..=50).sum::<i64>(),
        "no lost update"
    );
    assert_eq!(loaded.sequence, 50);
    let stream = store.read_stream("ledger", "L-HOT").await.unwrap();
    assert_eq!(
        stream.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        (1..=50).collect::<Vec<_>>()
    );
    let mut by: Vec<i64> = stream
        .iter()
        .map(|e| e.payload["by"].as_i64().unwrap())
        .collect();
    by.sort();
    assert_eq!(
        by,
        (0..50).collect::<Vec<_>>(),
        "every command landed exactly once"
    );
    let outbox: Vec<i64> = outbox_rows(&db)
        .await
        .iter()
        .map(|r| r.get("sequence"))
        .collect();
    assert_eq!(
        outbox,
        (1..=50).collect::<Vec<_>>(),
        "outbox ids follow stream order"
    );
}

#[tokio::test]
async fn execute_in_commits_or_rolls_back_with_the_callers_writes() {
    let db = TestDb::new().await;
    sqlx::query("CREATE TABLE shop_orders (id TEXT PRIMARY KEY, note TEXT NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let store = Store::new(db.pool.clone());
    let count = |sql: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };

    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO shop_orders VALUES ('ORD-RB', 'mine')")
        .execute(&mut *tx)
        .await
        .unwrap();
    store
        .execute_in::<Order>(
            &mut tx,
            "ORD-RB",
            create("ORD-RB", 3.0),
            &EventContext::new(),
        )
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(count("SELECT count(*) FROM shop_orders").await, 0);
    assert_eq!(count("SELECT count(*) FROM tidings_events").await, 0);
    assert_eq!(count("SELECT count(*) FROM tidings_outbox").await, 0);

    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO shop_orders VALUES ('ORD-OK', 'mine')")
        .execute(&mut *tx)
        .await
        .unwrap();
    let committed = store
        .execute_in::<Order>(
            &mut tx,
            "ORD-OK",
            create("ORD-OK", 3.0),
            &EventContext::new(),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(committed.sequence, 1);
    assert_eq!(count("SELECT count(*) FROM shop_orders").await, 1);
    assert_eq!(count("SELECT count(*) FROM tidings_events").await, 1);
    assert_eq!(count("SELECT count(*) FROM tidings_outbox").await, 1);

    // A domain error inside the caller's transaction leaves its own writes usable.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO shop_orders VALUES ('ORD-X', 'mine')")
        .execute(&mut *tx)
        .await
        .unwrap();
    let refused = store
        .execute_in::<Order>(
            &mut tx,
            "ORD-OK",
            create("ORD-OK", 3.0),
            &EventContext::new(),
        )
        .await
        .unwrap_err();
    assert!(matches!(
        refused,
        ExecuteError::Rejected(OrderError::AlreadyExists)
    ));
    tx.commit().await.unwrap();
    assert_eq!(count("SELECT count(*) FROM shop_orders").await, 2);
    assert_eq!(count("SELECT count(*) FROM tidings_events").await, 1);
}

#[tokio::test]
async fn snapshots_are_used_and_bad_ones_ignored() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    for i in 0..12 {
        store.execute::<Ledger>("L-SNAP", (10, i)).await.unwrap();
    }
    let (sequence, version): (i64, i32) = sqlx::query_as(
        "SELECT sequence, snapshot_version FROM tidings_snapshots WHERE aggregate_id = 'L-SNAP'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((sequence, version), (10, 1), "a snapshot every 5 events");
    let loaded = store.load::<Ledger>("L-SNAP").await.unwrap();
    assert!(loaded.from_snapshot);
    assert_eq!(
        (loaded.state.balance, loaded.state.deposits, loaded.sequence),
        (120, 12, 12)
    );

    // Make the snapshot lie: if it were used, the balance would be wrong.
    sqlx::query("UPDATE tidings_snapshots SET state = '{\"balance\": 999999, \"deposits\": 10}'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        store.load::<Ledger>("L-SNAP").await.unwrap().state.balance,
        1000019
    );
    // ...but a snapshot of another version is ignored,
    sqlx::query("UPDATE tidings_snapshots SET snapshot_version = 0")
        .execute(&db.pool)
        .await
        .unwrap();
    let loaded = store.load::<Ledger>("L-SNAP").await.unwrap();
    assert!(!loaded.from_snapshot);
    assert_eq!(loaded.state.balance, 120);
    // ...and so is one that no longer decodes.
    sqlx::query("UPDATE tidings_snapshots SET snapshot_version = 1, state = '\"garbage\"'")
        .execute(&db.pool)
        .await
        .unwrap();
    let loaded = store.load::<Ledger>("L-SNAP").await.unwrap();
    assert!(!loaded.from_snapshot);
    assert_eq!((loaded.state.balance, loaded.sequence), (120, 12));
}

#[tokio::test]
async fn an_append_whose_snapshot_fails_commits_no_event_and_no_outbox_row() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    for i in 0..4 {
        store.execute::<Ledger>("L-ATOM", (1, i)).await.unwrap();
    }
    // The fifth event is due a snapshot, whose write fails.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'no snapshot today'; END $$; \
         CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON tidings_snapshots \
         FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let failed = store.execute::<Ledger>("L-ATOM", (1, 4)).await;
    assert!(
        matches!(&failed, Err(ExecuteError::Store(Error::Database { .. }))),
        "the snapshot's failure is the command's: {failed:?}"
    );
    assert_eq!(count_rows(&db, "tidings_events").await, 4, "no fifth event");
    assert_eq!(
        count_rows(&db, "tidings_outbox").await,
        4,
        "no fifth outbox row"
    );
    // Without the trigger the same command commits, snapshot and all.
    sqlx::query("DROP TRIGGER refuse ON tidings_snapshots")
        .execute(&db.pool)
        .await
        .unwrap();
    let committed = store.execute::<Ledger>("L-ATOM", (1, 4)).await.unwrap();
    assert_eq!(committed.sequence, 5);
    assert_eq!(count_rows(&db, "tidings_snapshots").await, 1);
    assert_eq!(count_rows(&db, "tidings_outbox").await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_whose_answer_is_lost_is_reported_as_possibly_committed() {
    let db = TestDb::new().await;
    let options = db.connect_options();
    let server = format!("{}:{}", options.get_host(), options.get_port());
    let proxy = tidings_tests::proxy::Proxy::start(&server).await;
    let port: u16 = proxy.address.rsplit(':').next().unwrap().parse().unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options.host("127.0.0.1").port(port))
        .await
        .unwrap();
    let store = Store::new(pool);
    // Another transaction holds L-LOST's first sequence: the store's append
    // waits on it at the server.
    let mut other = db.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO tidings_events (event_id, aggregate_type, aggregate_id, sequence, event_type, \
         event_version, recorded_at, payload) \
         VALUES (gen_random_uuid(), 'ledger', 'L-LOST', 1, 'Deposited', 1, now(), '{}')",
    )
    .execute(&mut *other)
    .await
    .unwrap();
    let command = tokio::spawn(async move { store.create::<Ledger>("L-LOST", (5, 1)).await });
    tidings_tests::wait_until(
        "the append waiting on the other transaction",
        Duration::from_secs(30),
        async || tidings_tests::waits_on_lock(&db.pool, "INSERT INTO tidings_events").await,
    )
    .await;
    // The network drops the store's connection while the append is on
    // the server, and the other transaction then rolls back.
    proxy.cut();
    let failed = command.await.unwrap();
    let message = match &failed {
        Err(ExecuteError::Store(e @ Error::Database { .. })) => e.to_string(),
        other => panic!("a lost answer is a database error: {other:?}"),
    };
    assert!(
        message.contains("may have committed"),
        "the error says the outcome is unknown: {message}"
    );
    other.rollback().await.unwrap();
    // It did commit: the server finished the statement without its client.
    tidings_tests::wait_until(
        "the append committed without its client",
        Duration::from_secs(30),
        async || count_rows(&db, "tidings_events").await == 1,
    )
    .await;
    let stored: String = sqlx::query_scalar("SELECT payload->>'amount' FROM tidings_events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        stored, "5",
        "the store's event, not the other transaction's"
    );
    assert_eq!(count_rows(&db, "tidings_outbox").await, 1);
}

#[tokio::test]
async fn a_database_without_migrations_says_so() {
    let db = TestDb::empty().await;
    let store = Store::new(db.pool.clone());
    let error = store.execute::<Ledger>("L-1", (1, 1)).await.unwrap_err();
    assert!(
        matches!(error, ExecuteError::Store(Error::NotMigrated)),
        "{error}"
    );
    assert!(error.to_string().contains("tidings migrate"));
}

/// An account: withdrawals are refused without funds, `Close` records the
/// balance it closed at, and `Reserve` is idempotent (no event when the
/// hold is already there). Idempotency keys live in a field that serde
/// skips: only a replay rebuilds it, never a JSON round trip.
#[derive(Debug, Clone, PartialEq, Event)]
enum AccountEvent {
    Deposited { amount: i64, key: u32 },
    Withdrawn { amount: i64 },
    Reserved,
    Released,
    Closed { balance: i64 },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Account {
    balance: i64,
    reserved: bool,
    #[serde(skip)]
    keys: std::collections::HashSet<u32>,
}

#[derive(Debug, Clone)]
enum AccountCommand {
    Deposit { amount: i64, key: u32 },
    Withdraw(i64),
    Reserve,
    Release,
    Close,
}

#[derive(Debug, PartialEq, thiserror::Error)]
enum AccountError {
    #[error("insufficient funds: balance {balance}")]
    InsufficientFunds { balance: i64 },
}

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Event = AccountEvent;
    type Command = AccountCommand;
    type Error = AccountError;

    fn handle(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        Ok(match command {
            AccountCommand::Deposit { key, .. } if self.keys.contains(&key) => vec![],
            AccountCommand::Deposit { amount, key } => {
                vec![AccountEvent::Deposited { amount, key }]
            }
            AccountCommand::Withdraw(amount) if amount > self.balance => {
                return Err(AccountError::InsufficientFunds {
                    balance: self.balance,
                });
            }
            AccountCommand::Withdraw(amount) => vec![AccountEvent::Withdrawn { amount }],
            AccountCommand::Reserve if self.reserved => vec![],
            AccountCommand::Reserve => vec![AccountEvent::Reserved],
            AccountCommand::Release if !self.reserved => vec![],
            AccountCommand::Release => vec![AccountEvent::Released],
            AccountCommand::Close => vec![AccountEvent::Closed {
                balance: self.balance,
            }],
        })
    }

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Deposited { amount, key } => {
                self.balance += amount;
                self.keys.insert(*key);
            }
            AccountEvent::Withdrawn { amount } => self.balance -= amount,
            AccountEvent::Reserved => self.reserved = true,
            AccountEvent::Released => self.reserved = false,
            AccountEvent::Closed { .. } => {}
        }
    }
}

fn deposit(amount: i64, key: u32) -> AccountCommand {
    AccountCommand::Deposit { amount, key }
}

#[tokio::test]
async fn a_rejection_from_a_stale_cache_is_rechecked() {
    let db = TestDb::new().await;
    // Two stores on one database: two processes, each with its own cache.
    let a = Store::new(db.pool.clone());
    let b = Store::new(db.pool.clone());
    a.execute::<Account>("AC-1", deposit(10, 1)).await.unwrap();
    a.execute::<Account>("AC-1", AccountCommand::Withdraw(10))
        .await
        .unwrap(); // a caches balance 0
    b.execute::<Account>("AC-1", deposit(100, 2)).await.unwrap();
    for _ in 0..2 {
        // Decided on b's deposit, and not only once.
        let committed = a
            .execute::<Account>("AC-1", AccountCommand::Withdraw(50))
            .await
            .expect("the withdrawal is decided on the stream as committed, not on a stale cache");
        assert_eq!(committed.envelopes.len(), 1);
    }
    assert_eq!(a.load::<Account>("AC-1").await.unwrap().state.balance, 0);
    // A refusal that does hold still comes back as the domain error.
    let refused = a
        .execute::<Account>("AC-1", AccountCommand::Withdraw(1))
        .await
        .unwrap_err();
    assert!(matches!(
        refused,
        ExecuteError::Rejected(AccountError::InsufficientFunds { balance: 0 })
    ));
}

#[tokio::test]
async fn an_empty_result_from_a_stale_cache_is_rechecked() {
    let db = TestDb::new().await;
    let a = Store::new(db.pool.clone());
    let b = Store::new(db.pool.clone());
    a.execute::<Account>("AC-2", AccountCommand::Reserve)
        .await
        .unwrap(); // a caches "reserved"
    b.execute::<Account>("AC-2", AccountCommand::Release)
        .await
        .unwrap();
    let again = a
        .execute::<Account>("AC-2", AccountCommand::Reserve)
        .await
        .unwrap();
    assert_eq!(
        (again.envelopes.len(), again.sequence),
        (1, 3),
        "the hold was released by another writer: reserving again must append"
    );
    assert!(a.load::<Account>("AC-2").await.unwrap().state.reserved);
    // And a true no-op stays a no-op.
    let noop = a
        .execute::<Account>("AC-2", AccountCommand::Reserve)
        .await
        .unwrap();
    assert_eq!((noop.envelopes.len(), noop.sequence), (0, 3));
}

#[tokio::test]
async fn a_decision_built_on_a_lost_commit_is_not_appended() {
    let db = TestDb::new().await;
    let a = Store::new(db.pool.clone());
    let b = Store::new(db.pool.clone());
    a.execute::<Account>("AC-3", deposit(10, 1)).await.unwrap();
    a.execute::<Account>("AC-3", AccountCommand::Withdraw(10))
        .await
        .unwrap(); // a caches balance 0 at sequence 2
    // The commit of sequence 2 is lost (as with an asynchronous standby
    // promoted), and another writer writes a different sequence 2.
    sqlx::query("DELETE FROM tidings_events WHERE aggregate_id = 'AC-3' AND sequence = 2")
        .execute(&db.pool)
        .await
        .unwrap();
    b.execute::<Account>("AC-3", deposit(100, 2)).await.unwrap();
    // Same sequence, another history: a's state no longer describes it.
    let closed = a
        .execute::<Account>("AC-3", AccountCommand::Close)
        .await
        .unwrap();
    assert_eq!(closed.sequence, 3);
    let last = a.read_stream("account", "AC-3").await.unwrap();
    assert_eq!(
        last.last().unwrap().payload,
        json!({ "balance": 110 }),
        "closed at the balance of the history that exists"
    );
}

#[tokio::test]
async fn the_cache_keeps_the_aggregate_itself_not_a_serde_copy() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    store
        .execute::<Account>("AC-4", deposit(5, 7))
        .await
        .unwrap();
    // Key 7 was seen: the state that decides must know it, although serde
    // skips the field.
    let again = store
        .execute::<Account>("AC-4", deposit(5, 7))
        .await
        .unwrap();
    assert!(again.envelopes.is_empty(), "a replayed deposit is a no-op");
    assert_eq!(
        store.load::<Account>("AC-4").await.unwrap().state.balance,
        5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serialization_failures_are_retried_like_conflicts() {
    let db = TestDb::new().await;
    sqlx::query(&format!(
        "ALTER DATABASE {} SET default_transaction_isolation = 'serializable'",
        db.name
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    // New connections run SERIALIZABLE.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect_with(db.connect_options())
        .await
        .unwrap();
    let level: String = sqlx::query_scalar("SHOW transaction_isolation")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(level, "serializable");
    // Sixteen writers (each its own store, as separate processes), five
    // commands each, all on one aggregate.
    let writers: Vec<_> = (0..16u32)
        .map(|i| {
            let store = Store::new(pool.clone());
            tokio::spawn(async move {
                let mut retries = 0;
                for _ in 0..5 {
                    let committed = store
                        .execute::<Ledger>("L-SER", (1, i))
                        .await
                        .expect("every concurrent command lands under SERIALIZABLE");
                    retries += committed.retries;
                }
                retries
            })
        })
        .collect();
    let mut retries = 0;
    for writer in writers {
        retries += writer.await.unwrap();
    }
    assert!(retries > 0, "the writers did conflict");
    let loaded = Store::new(pool).load::<Ledger>("L-SER").await.unwrap();
    assert_eq!((loaded.sequence, loaded.state.balance), (80, 80));
}

#[tokio::test]
async fn execute_in_under_a_fixed_snapshot_fails_at_once_with_a_conflict() {
    let db = TestDb::new().await;
    // Slow backoff: twenty retries would take seconds.
    let config = StoreConfig::default()
        .max_conflict_retries(20)
        .backoff(Duration::from_millis(500), Duration::from_millis(500));
    let store = Store::with_config(db.pool.clone(), config);
    let other = Store::new(db.pool.clone());
    for level in ["REPEATABLE READ", "SERIALIZABLE"] {
        let id = format!("L-{}", level.replace(' ', "-"));
        let mut tx = db.pool.begin().await.unwrap();
        sqlx::query(&format!("SET TRANSACTION ISOLATION LEVEL {level}"))
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query("SELECT count(*) FROM tidings_events")
            .execute(&mut *tx)
            .await
            .unwrap(); // the snapshot is taken
        other.execute::<Ledger>(&id, (1, 0)).await.unwrap();
        let started = std::time::Instant::now();
        let error = store
            .execute_in::<Ledger>(&mut tx, &id, (2, 1), &EventContext::new())
            .await
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_millis(400),
            "{level}: returned at once, not after retries in a fixed snapshot ({:?})",
            started.elapsed()
        );
        assert!(
            matches!(
                error,
                ExecuteError::Store(Error::Conflict {
                    expected: 0,
                    actual: 1,
                    ..
                })
            ),
            "{level}: {error}"
        );
        tx.rollback().await.unwrap();
        // The caller retries its whole transaction, and it lands.
        let mut tx = db.pool.begin().await.unwrap();
        sqlx::query(&format!("SET TRANSACTION ISOLATION LEVEL {level}"))
            .execute(&mut *tx)
            .await
            .unwrap();
        let committed = store
            .execute_in::<Ledger>(&mut tx, &id, (2, 1), &EventContext::new())
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(committed.sequence, 2);
    }
}

#[tokio::test]
async fn execute_in_without_a_transaction_is_refused_and_writes_nothing() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let mut conn = db.pool.acquire().await.unwrap();
    let error = store
        .execute_in::<Ledger>(&mut conn, "L-NOTX", (1, 0), &EventContext::new())
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ExecuteError::Store(Error::Config(m)) if m.contains("not inside a transaction")),
        "{error}"
    );
    // A transaction sqlx does not know of (a raw BEGIN) is refused too:
    // a savepoint there would be a COMMIT of the caller's writes.
    sqlx::query("CREATE TABLE mine (id int)")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    sqlx::query("INSERT INTO mine VALUES (1)")
        .execute(&mut *conn)
        .await
        .unwrap();
    let error = store
        .execute_in::<Ledger>(&mut conn, "L-NOTX", (1, 0), &EventContext::new())
        .await
        .unwrap_err();
    assert!(matches!(error, ExecuteError::Store(Error::Config(_))));
    sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
    let count = |sql: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(count("SELECT count(*) FROM mine").await, 0);
    assert_eq!(count("SELECT count(*) FROM tidings_events").await, 0);
    assert_eq!(count("SELECT count(*) FROM tidings_outbox").await, 0);
}

#[tokio::test]
async fn empty_and_oversized_aggregate_ids_are_refused_at_append() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    let long = "L".repeat(tidings::store::MAX_AGGREGATE_ID_BYTES + 1);
    for id in ["", long.as_str()] {
        let error = store.execute::<Ledger>(id, (1, 0)).await.unwrap_err();
        match &error {
            ExecuteError::Store(Error::InvalidAggregateId {
                aggregate_type,
                reason,
                ..
            }) => {
                assert_eq!(aggregate_type, "ledger");
                assert!(
                    reason.contains("empty") || reason.contains("over the limit"),
                    "{reason}"
                );
            }
            other => panic!("expected an invalid id, got {other}"),
        }
        assert!(error.to_string().contains("aggregate id"), "{error}");
    }
    let fine = "L".repeat(tidings::store::MAX_AGGREGATE_ID_BYTES);
    store.execute::<Ledger>(&fine, (1, 0)).await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tidings_outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 1, "only the valid id was written");
}

/// A counter whose command can take its time between load and append (the
/// window in which another writer commits), or yield no event at all.
#[derive(Debug, Clone, PartialEq, Event)]
enum TallyEvent {
    Counted { by: u32 },
}

/// How many commands started thinking (to time another writer into the
/// window).
static THINKING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Tally {
    count: u64,
}

#[derive(Debug, Clone)]
enum TallyCommand {
    Count { by: u32, think: Duration },
    Nothing,
}

impl Aggregate for Tally {
    const TYPE: &'static str = "tally";
    type Event = TallyEvent;
    type Command = TallyCommand;
    type Error = Never;

    fn handle(&self, command: TallyCommand) -> Result<Vec<TallyEvent>, Never> {
        match command {
            TallyCommand::Count { by, think } => {
                if !think.is_zero() {
                    THINKING.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                std::thread::sleep(think);
                Ok(vec![TallyEvent::Counted { by }])
            }
            TallyCommand::Nothing => Ok(vec![]),
        }
    }

    fn apply(&mut self, _: &TallyEvent) {
        self.count += 1;
    }
}

async fn count_rows(db: &TestDb, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_beyond_the_retry_budget_are_returned_as_conflicts() {
    let db = TestDb::new().await;
    let store = Store::with_config(
        db.pool.clone(),
        StoreConfig::default().max_conflict_retries(0),
    );
    let tasks: Vec<_> = (0..8u32)
        .map(|by| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .execute::<Tally>(
                        "T-1",
                        TallyCommand::Count {
                            by,
                            think: Duration::from_millis(30),
                        },
                    )
                    .await
            })
        })
        .collect();
    let (mut ok, mut conflicts) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(committed) => {
                assert_eq!(committed.retries, 0);
                ok += 1;
            }
            Err(ExecuteError::Store(Error::Conflict { aggregate_id, .. })) => {
                assert_eq!(aggregate_id, "T-1");
                conflicts += 1;
            }
            Err(other) => panic!("expected a conflict, got {other}"),
        }
    }
    assert!(conflicts > 0, "8 writers with no retry: some must conflict");
    assert_eq!(ok + conflicts, 8);
    assert_eq!(count_rows(&db, "tidings_events").await, ok);
    assert_eq!(count_rows(&db, "tidings_outbox").await, ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_inside_execute_in_is_retried_in_a_savepoint_keeping_earlier_writes() {
    let db = TestDb::new().await;
    sqlx::query("CREATE TABLE audit (note TEXT NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let store = Store::new(db.pool.clone());
    store
        .execute::<Tally>("T-1", TallyCommand::Nothing)
        .await
        .unwrap();
    let thinking_before = THINKING.load(std::sync::atomic::Ordering::SeqCst);
    // The slow writer runs on a runtime of its own: its command thinks
    // synchronously, which must not hold up this runtime's tasks.
    let slow = {
        let options = db.connect_options();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    let pool = sqlx::PgPool::connect_with(options).await.unwrap();
                    let store = Store::new(pool.clone());
                    let mut tx = pool.begin().await.unwrap();
                    sqlx::query("INSERT INTO audit VALUES ('before the command')")
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    let committed = store
                        .execute_in::<Tally>(
                            &mut tx,
                            "T-1",
                            TallyCommand::Count {
                                by: 1,
                                think: Duration::from_millis(300),
                            },
                            &EventContext::new(),
                        )
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                    committed
                })
        })
    };
    // Another writer commits while the first one thinks (after its load).
    let started = std::time::Instant::now();
    while THINKING.load(std::sync::atomic::Ordering::SeqCst) == thinking_before {
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    store
        .execute::<Tally>(
            "T-1",
            TallyCommand::Count {
                by: 2,
                think: Duration::ZERO,
            },
        )
        .await
        .unwrap();
    let committed = tokio::task::spawn_blocking(move || slow.join().unwrap())
        .await
        .unwrap();
    assert!(
        committed.retries >= 1,
        "the first writer conflicted and retried: sequence {}, retries {}",
        committed.sequence,
        committed.retries
    );
    assert_eq!(
        committed.sequence, 2,
        "appended after the other writer's event"
    );
    assert_eq!(
        count_rows(&db, "audit").await,
        1,
        "the earlier write was kept"
    );
    assert_eq!(count_rows(&db, "tidings_events").await, 2);
}

#[tokio::test]
async fn a_cache_capacity_of_zero_loads_every_command_from_the_database() {
    let db = TestDb::new().await;
    // Rewrites the stored event's payload behind the stores' backs (same
    // sequence and id: a cached state cannot tell).
    let tamper = async || {
        sqlx::query("UPDATE tidings_events SET payload = '{\"amount\": 100, \"by\": 1}'")
            .execute(&db.pool)
            .await
            .unwrap();
    };
    let cached = Store::new(db.pool.clone());
    cached.execute::<Ledger>("L-1", (5, 1)).await.unwrap();
    tamper().await;
    let after = cached.execute::<Ledger>("L-2", (1, 1)).await.unwrap();
    assert_eq!(after.state.balance, 1);
    let again = cached.execute::<Ledger>("L-1", (1, 1)).await.unwrap();
    assert_eq!(
        again.state.balance, 6,
        "the default cache served L-1's state"
    );

    let db = TestDb::new().await;
    let uncached = Store::with_config(db.pool.clone(), StoreConfig::default().cache_capacity(0));
    uncached.execute::<Ledger>("L-1", (5, 1)).await.unwrap();
    sqlx::query("UPDATE tidings_events SET payload = '{\"amount\": 100, \"by\": 1}'")
        .execute(&db.pool)
        .await
        .unwrap();
    let again = uncached.execute::<Ledger>("L-1", (1, 1)).await.unwrap();
    assert_eq!(
        again.state.balance, 101,
        "no cache: the state comes from the database"
    );
}

#[tokio::test]
async fn a_command_that_yields_no_event_commits_nothing_and_returns_the_current_sequence() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    for by in 0..3 {
        store
            .execute::<Tally>(
                "T-1",
                TallyCommand::Count {
                    by,
                    think: Duration::ZERO,
                },
            )
            .await
            .unwrap();
    }
    let nothing = store
        .execute::<Tally>("T-1", TallyCommand::Nothing)
        .await
        .unwrap();
    assert_eq!((nothing.sequence, nothing.envelopes.len()), (3, 0));
    assert_eq!(nothing.state.count, 3);
    assert_eq!(count_rows(&db, "tidings_events").await, 3);
    assert_eq!(count_rows(&db, "tidings_outbox").await, 3);
    let fresh = store
        .execute::<Tally>("T-NEW", TallyCommand::Nothing)
        .await
        .unwrap();
    assert_eq!(fresh.sequence, 0, "a stream that does not exist stays at 0");
    assert_eq!(count_rows(&db, "tidings_events").await, 3);
}

#[tokio::test]
async fn the_cache_holds_no_more_than_its_capacity() {
    // The bound is enforced as the cache maintains itself (moka), so it
    // may be passed for a moment: checked over many more aggregates than it
    // holds.
    let (capacity, aggregates) = (10, 300);
    let db = TestDb::new().await;
    let store = Store::with_config(
        db.pool.clone(),
        StoreConfig::default().cache_capacity(capacity),
    );
    for i in 0..aggregates {
        store
            .execute::<Ledger>(&format!("L-{i}"), (1, 1))
            .await
            .unwrap();
    }
    // Rewritten behind the store's back: only a load sees it.
    sqlx::query("UPDATE tidings_events SET payload = '{\"amount\": 100, \"by\": 1}'")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut kept = 0;
    for i in 0..aggregates {
        let after = store
            .execute::<Ledger>(&format!("L-{i}"), (1, 1))
            .await
            .unwrap();
        if after.state.balance == 2 {
            kept += 1;
        } else {
            assert_eq!(after.state.balance, 101, "loaded from the database");
        }
    }
    println!("a cache of {capacity} served {kept} of {aggregates} aggregates");
    assert!(
        kept <= 3 * capacity,
        "a cache of {capacity} kept {kept} of {aggregates} aggregates"
    );
}

/// A cart as first written: gift wrapping, and a checkout that recorded
/// the order and its payment in one event.
mod cart_before {
    use super::Never;
    use serde::{Deserialize, Serialize};
    use tidings::{Aggregate, Event};

    #[derive(Debug, Clone, PartialEq, Event)]
    #[event(topic = "carts")]
    pub(crate) enum CartEvent {
        ItemAdded { sku: String },
        GiftWrapped { note: String },
        CheckedOut { total: i64, paid_by: String },
    }

    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    pub(crate) struct Cart;

    impl Aggregate for Cart {
        const TYPE: &'static str = "cart";
        type Event = CartEvent;
        type Command = CartEvent;
        type Error = Never;
        fn handle(&self, command: CartEvent) -> Result<Vec<CartEvent>, Never> {
            Ok(vec![command])
        }
        fn apply(&mut self, _: &CartEvent) {}
    }
}

/// The cart today: gift wrapping is retired, and the checkout is two
/// events, the order placed and the payment taken.
mod cart_after {
    use super::Never;
    use serde::{Deserialize, Serialize};
    use serde_json::Value;
    use tidings::{Aggregate, Event, UpcastError};

    fn checked_out_v1(payload: Value) -> Result<Vec<CartEvent>, UpcastError> {
        let total = payload["total"]
            .as_i64()
            .ok_or_else(|| UpcastError::missing_field("total"))?;
        let by = payload["paid_by"]
            .as_str()
            .ok_or_else(|| UpcastError::missing_field("paid_by"))?;
        Ok(vec![
            CartEvent::OrderPlaced { total },
            CartEvent::PaymentTaken { by: by.into() },
        ])
    }

    #[derive(Debug, Clone, PartialEq, Event)]
    #[event(
        topic = "carts",
        retired(name = "GiftWrapped", version = 1),
        split(name = "CheckedOut", version = 1, json = checked_out_v1)
    )]
    pub(crate) enum CartEvent {
        ItemAdded { sku: String },
        OrderPlaced { total: i64 },
        PaymentTaken { by: String },
    }

    /// Every event applied, in order, by type.
    #[derive(Debug, Clone, Default, Serialize, Deserialize)]
    pub(crate) struct Cart {
        pub(crate) applied: Vec<String>,
    }

    impl Aggregate for Cart {
        const TYPE: &'static str = "cart";
        type Event = CartEvent;
        type Command = CartEvent;
        type Error = Never;
        fn handle(&self, command: CartEvent) -> Result<Vec<CartEvent>, Never> {
            Ok(vec![command])
        }
        fn apply(&mut self, event: &CartEvent) {
            self.applied.push(event.event_type().into());
        }
    }
}

#[tokio::test]
async fn a_retired_event_is_dropped_and_a_split_one_applied_as_its_parts_and_the_stream_goes_on() {
    let db = TestDb::new().await;
    let store = Store::new(db.pool.clone());
    use cart_before::CartEvent as Before;
    for event in [
        Before::ItemAdded { sku: "A".into() },
        Before::GiftWrapped { note: "hi".into() },
        Before::CheckedOut {
            total: 12,
            paid_by: "card".into(),
        },
    ] {
        store
            .execute::<cart_before::Cart>("C-1", event)
            .await
            .unwrap();
    }

    let loaded = store.load::<cart_after::Cart>("C-1").await.unwrap();
    assert_eq!(
        loaded.state.applied,
        ["ItemAdded", "OrderPlaced", "PaymentTaken"],
        "the gift wrap dropped, the checkout read as its two parts in order"
    );
    assert_eq!(loaded.sequence, 3, "the version counts stored events");

    let committed = store
        .execute::<cart_after::Cart>("C-1", cart_after::CartEvent::ItemAdded { sku: "B".into() })
        .await
        .unwrap();
    assert_eq!(
        committed.sequence, 4,
        "the next append follows the stored sequence"
    );
    assert_eq!(
        committed.state.applied,
        ["ItemAdded", "OrderPlaced", "PaymentTaken", "ItemAdded"]
    );
    let stream = store.read_stream("cart", "C-1").await.unwrap();
    let stored: Vec<&str> = stream.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        stored,
        ["ItemAdded", "GiftWrapped", "CheckedOut", "ItemAdded"],
        "stored events are never rewritten"
    );

    // A split that refuses its payload is a decode error naming the event.
    sqlx::query(
        "INSERT INTO tidings_events (event_id, aggregate_type, aggregate_id, sequence, event_type, \
         event_version, recorded_at, payload) VALUES ($1, 'cart', 'C-2', 1, 'CheckedOut', 1, now(), $2)",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(json!({"paid_by": "card"}))
    .execute(&db.pool)
    .await
    .unwrap();
    let error = store.load::<cart_after::Cart>("C-2").await.unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("`CheckedOut` version 1") && text.contains("missing field `total`"),
        "{text}"
    );
}
