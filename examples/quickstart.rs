//! Quick start: `scripts/dev.sh quickstart`.
//!
//! Runs the orders domain end to end against PostgreSQL (`DATABASE_URL`, a
//! server URL) and a Kafka broker: `KAFKA_BROKERS` when set, else one on
//! 127.0.0.1:9092, else an embedded one in this process (no install needed;
//! `KAFKA_BROKERS=embedded` asks for it):
//! migrate a fresh `tidings_quickstart` database, issue commands (one of them
//! inside the caller's own transaction, one refused), relay the outbox to
//! Kafka, build the order summary read model with a projection, print it,
//! replay the projection from the beginning of the topic and show that the
//! rebuilt read model is identical.

use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::Executor;
use tidings::projection::replay;
use tidings::{EventContext, ExecuteError, Store, StoreConfig};
use tidings_examples::demo::{
    BoxError, fresh_database, quick_start_broker, spawn_projection, spawn_relay, unique_prefix,
    wait_until,
};
use tidings_examples::orders::{Order, OrderCommand};
use tidings_examples::summary::{OrderSummary, SummaryRow};

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

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let broker = quick_start_broker()?;
    println!("0. broker: {}", broker.description);
    let kafka = broker.kafka.clone();
    let brokers = kafka.brokers.clone();
    let pool = fresh_database("tidings_quickstart").await?;
    let summary = OrderSummary::default();
    summary.create_table(&pool).await?;
    pool.execute("CREATE TABLE shop_orders (order_id TEXT PRIMARY KEY, note TEXT NOT NULL)")
        .await?;
    println!(
        "1. database {} migrated; broker {brokers}",
        tidings_examples::demo::database_name("tidings_quickstart")
    );

    // Fresh topics on every run: a unique prefix.
    let prefix = unique_prefix("quickstart");
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

    let (relay, relay_stats) = spawn_relay(&pool, &kafka)?;
    let (runner, runner_stats) = spawn_projection(&pool, summary.clone(), &kafka, &prefix)?;

    let total = outbox.depth;
    let took = wait_until("the read model", Duration::from_secs(60), || async {
        Ok(runner_stats.applied.load(Ordering::Relaxed) >= total)
    })
    .await?;
    println!(
        "3. relay published {} events to {prefix}orders; projection applied {} in {:?}",
        relay_stats.published.load(Ordering::Relaxed),
        runner_stats.applied.load(Ordering::Relaxed),
        took
    );
    let before = summary.rows(&pool).await?;
    println!("4. order_summary read model:");
    print_rows(&before);

    let applied_before = runner_stats.applied.load(Ordering::Relaxed);
    let generation = replay(&pool, &summary).await?;
    let reset = summary.rows(&pool).await?.len();
    println!(
        "5. replay: read model reset ({reset} rows left), generation {generation} reads the topic from the beginning"
    );
    // Rebuilt means every event applied once more, not just rows that
    // look the same.
    wait_until("the replay", Duration::from_secs(60), || async {
        let rows = summary.rows(&pool).await?;
        Ok(
            runner_stats.applied.load(Ordering::Relaxed) >= applied_before + total
                && rows.len() == before.len()
                && rows.iter().map(|r| r.events_applied).sum::<i32>() == total as i32,
        )
    })
    .await?;
    println!(
        "   applied again: {}",
        runner_stats.applied.load(Ordering::Relaxed) - applied_before
    );
    let after = summary.rows(&pool).await?;
    println!("6. rebuilt read model:");
    print_rows(&after);
    let identical = after == before && reset < before.len();
    println!("   identical to the original: {identical}");

    runner.stop().await?;
    relay.stop().await?;
    drop(broker);
    if !identical {
        return Err("the replayed read model differs".into());
    }
    println!("done: see examples/src/orders.rs and examples/src/summary.rs for the code");
    Ok(())
}
