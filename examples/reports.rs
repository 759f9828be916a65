//! Reports: `cargo run -p tidings-examples --example reports`
//! (after `scripts/dev.sh up`; uses `DATABASE_URL` and `KAFKA_BROKERS`).
//!
//! Shows a reporting read model, daily totals of orders and payments, built
//! from the same order events as the order summary by a second projection,
//! then rebuilt from the topic by a replay with the same result.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tidings::projection::replay;
use tidings::{Store, StoreConfig};
use tidings_examples::demo::{
    BoxError, fresh_database, kafka, spawn_projection, spawn_relay, unique_prefix, wait_until,
};
use tidings_examples::orders::{Order, OrderCommand};
use tidings_examples::reports::DailyTotals;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let pool = fresh_database("tidings_reports").await?;
    DailyTotals::create_table(&pool).await?;
    let prefix = unique_prefix("reports");
    let store = Store::with_config(pool.clone(), StoreConfig::default().topic_prefix(&prefix));
    let mut events = 0u64;
    for i in 0..25u32 {
        let id = format!("ORD-{i:02}");
        let amount = 10.0 * f64::from(i + 1);
        let create = OrderCommand::Create {
            order_id: id.clone(),
            user_id: "U".into(),
            amount,
            currency: "EUR".into(),
        };
        events += store.execute::<Order>(&id, create).await?.envelopes.len() as u64;
        let next = match i % 5 {
            0 => Some(OrderCommand::Cancel {
                reason: "no stock".into(),
            }),
            1..=3 => Some(OrderCommand::Pay {
                payment_id: format!("PAY-{i}"),
                amount,
            }),
            _ => None,
        };
        if let Some(command) = next {
            events += store.execute::<Order>(&id, command).await?.envelopes.len() as u64;
        }
    }
    println!("1. 25 orders: {events} events");

    let kafka = kafka();
    let (relay, _) = spawn_relay(&pool, &kafka)?;
    let (runner, stats) = spawn_projection(&pool, DailyTotals, &kafka, &prefix)?;
    wait_until("daily totals", Duration::from_secs(60), || async {
        Ok(stats.applied.load(Ordering::Relaxed) >= events)
    })
    .await?;
    let report = DailyTotals::rows(&pool).await?;
    for day in &report {
        println!(
            "2. {}: {} orders worth {:.2}, {:.2} paid, {} cancelled",
            day.day, day.orders, day.ordered, day.paid, day.cancelled
        );
    }
    let applied_before = stats.applied.load(Ordering::Relaxed);
    replay(&pool, &DailyTotals).await?;
    let reset = DailyTotals::rows(&pool).await?.is_empty();
    let rebuilt = wait_until("the replayed report", Duration::from_secs(60), || async {
        Ok(
            stats.applied.load(Ordering::Relaxed) >= applied_before + events
                && DailyTotals::rows(&pool).await? == report,
        )
    })
    .await;
    println!(
        "3. replayed from the topic (reset: {reset}, applied again: {}): identical: {}",
        stats.applied.load(Ordering::Relaxed) - applied_before,
        rebuilt.is_ok() && reset
    );
    runner.stop().await?;
    relay.stop().await?;
    rebuilt?;
    Ok(())
}
