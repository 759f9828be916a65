//! Quick start: `scripts/dev.sh quickstart`.
//!
//! Runs the orders domain end to end against PostgreSQL and the broker
//! (`DATABASE_URL`, a server URL, and `KAFKA_BROKERS`; the script sets both):
//! migrate a fresh `tidings_quickstart` database, issue commands (one of them
//! inside the caller's own transaction, one refused), relay the outbox to
//! Kafka, build the order summary read model with a projection, print it,
//! replay the projection from the beginning of the topic and show that the
//! rebuilt read model is identical.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Executor, PgPool};
use tidings::kafka::KafkaConfig;
use tidings::projection::{Runner, RunnerConfig, replay};
use tidings::relay::{Relay, RelayConfig};
use tidings::{EventContext, ExecuteError, Store, StoreConfig};
use tidings_examples::orders::{Order, OrderCommand};
use tidings_examples::summary::{OrderSummary, SummaryRow};
use tokio::sync::oneshot;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn print_rows(rows: &[SummaryRow]) {
    println!(
        "   {:<8} {:<6} {:>8} {:<4} {:<10} {:<8} events",
        "order", "user", "amount", "cur", "status", "payment"
    );
    for r in rows {
        println!(
            "   {:<8} {:<6} {:>8.2} {:<4} {:<10} {:<8} {}",
            r.order_id,
            r.user_id,
            r.amount,
            r.currency,
            r.status,
            r.payment_id.as_deref().unwrap_or("-"),
            r.events_applied
        );
    }
}

async fn fresh_database(server: &PgConnectOptions) -> Result<PgPool, BoxError> {
    let mut admin = server.connect().await?;
    admin
        .execute("DROP DATABASE IF EXISTS tidings_quickstart WITH (FORCE)")
        .await?;
    admin.execute("CREATE DATABASE tidings_quickstart").await?;
    Ok(PgPool::connect_with(server.clone().database("tidings_quickstart")).await?)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let server: PgConnectOptions = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
        .parse()?;
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let kafka = KafkaConfig::new(&brokers);

    let pool = fresh_database(&server).await?;
    tidings::MIGRATOR.run(&pool).await?;
    let summary = OrderSummary::default();
    summary.create_table(&pool).await?;
    pool.execute("CREATE TABLE shop_orders (order_id TEXT PRIMARY KEY, note TEXT NOT NULL)")
        .await?;
    println!("1. database tidings_quickstart migrated; broker {brokers}");

    // Fresh topics on every run: a unique prefix.
    let prefix = format!("quickstart-{}.", uuid::Uuid::now_v7().simple());
    let store = Store::with_config(pool.clone(), StoreConfig::default().topic_prefix(&prefix));
    let create = |id: &str, user: &str, amount: f64| OrderCommand::Create {
        order_id: id.into(),
        user_id: user.into(),
        amount,
        currency: "EUR".into(),
    };
    store
        .execute::<Order>("ORD-1", create("ORD-1", "alice", 1499.99))
        .await?;
    store
        .execute::<Order>("ORD-2", create("ORD-2", "bob", 25.50))
        .await?;
    store
        .execute::<Order>("ORD-3", create("ORD-3", "alice", 9.99))
        .await?;
    store
        .execute::<Order>(
            "ORD-1",
            OrderCommand::Pay {
                payment_id: "PAY-1".into(),
                amount: 1499.99,
            },
        )
        .await?;
    store
        .execute::<Order>(
            "ORD-3",
            OrderCommand::Cancel {
                reason: "out of stock".into(),
            },
        )
        .await?;
    // The caller's own write and the events commit together.
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO shop_orders VALUES ('ORD-4', 'gift wrap')")
        .execute(&mut *tx)
        .await?;
    let context = EventContext::new().correlation_id("checkout-42");
    store
        .execute_in::<Order>(&mut tx, "ORD-4", create("ORD-4", "carol", 120.0), &context)
        .await?;
    tx.commit().await?;
    match store
        .execute::<Order>(
            "ORD-2",
            OrderCommand::Pay {
                payment_id: "PAY-2".into(),
                amount: 1.0,
            },
        )
        .await
    {
        Err(ExecuteError::Rejected(why)) => {
            println!("2. commands executed; one refused as it should be: {why}")
        }
        other => return Err(format!("expected a refusal, got {other:?}").into()),
    }
    let outbox = tidings::store::outbox_status(&pool).await?;
    println!("   outbox: {} events waiting for the relay", outbox.depth);

    let relay = Relay::new(pool.clone(), RelayConfig::new(kafka.clone()))?;
    let relay_stats = relay.stats();
    let (relay_stop, relay_stopped) = oneshot::channel::<()>();
    let relay_task = tokio::spawn(relay.run(async move {
        let _ = relay_stopped.await;
    }));
    let runner = Runner::new(
        pool.clone(),
        summary.clone(),
        RunnerConfig::new(kafka.clone()).topic_prefix(&prefix),
    )?;
    let runner_stats = runner.stats();
    let (runner_stop, runner_stopped) = oneshot::channel::<()>();
    let runner_task = tokio::spawn(runner.run(async move {
        let _ = runner_stopped.await;
    }));

    let total = outbox.depth;
    let started = Instant::now();
    while runner_stats.applied.load(Ordering::Relaxed) < total {
        if started.elapsed() > Duration::from_secs(60) {
            return Err("the read model did not catch up within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "3. relay published {} events to {prefix}orders; projection applied {} in {:?}",
        relay_stats.published.load(Ordering::Relaxed),
        runner_stats.applied.load(Ordering::Relaxed),
        started.elapsed()
    );
    let before = summary.rows(&pool).await?;
    println!("4. order_summary read model:");
    print_rows(&before);

    let generation = replay(&pool, &summary).await?;
    println!(
        "5. replay: read model reset, generation {generation} reads the topic from the beginning"
    );
    let started = Instant::now();
    let after = loop {
        let rows = summary.rows(&pool).await?;
        if rows.len() == before.len()
            && rows.iter().map(|r| r.events_applied).sum::<i32>() == total as i32
        {
            break rows;
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err("the replay did not finish within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("6. rebuilt read model:");
    print_rows(&after);
    let identical = after == before;
    println!("   identical to the original: {identical}");

    let _ = runner_stop.send(());
    let _ = relay_stop.send(());
    runner_task.await??;
    relay_task.await??;
    if !identical {
        return Err("the replayed read model differs".into());
    }
    println!("done: see examples/src/orders.rs and examples/src/summary.rs for the code");
    Ok(())
}
