//! Reports: daily totals built from order and payment events.
//!
//! `DailyTotals` keeps, per day, the orders placed, their value, the
//! payments received and the cancellations, in `daily_order_totals`. It is a
//! read model like any other: `replay` rebuilds it from the topic.

use std::collections::BTreeMap;

use async_trait::async_trait;
use sqlx::{PgConnection, PgPool};
use tidings::Envelope;
use tidings::projection::{ApplyError, Batch, BatchError, Projection};

use crate::orders::OrderEvent;

/// Daily totals of orders and payments.
#[derive(Debug, Clone, Default)]
pub struct DailyTotals;

/// One day of `daily_order_totals`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct DayTotals {
    /// The day (UTC) the events were recorded.
    pub day: chrono::NaiveDate,
    /// Orders placed.
    pub orders: i64,
    /// Value of the orders placed.
    pub ordered: f64,
    /// Payments received.
    pub paid: f64,
    /// Orders cancelled.
    pub cancelled: i64,
}

impl DailyTotals {
    /// Creates the read model table if missing.
    pub async fn create_table(pool: &PgPool) -> tidings::Result<()> {
        tidings::projection::set_up_read_model(
            pool,
            "daily_order_totals",
            "CREATE TABLE IF NOT EXISTS daily_order_totals (
                day DATE PRIMARY KEY, orders BIGINT NOT NULL DEFAULT 0, ordered DOUBLE PRECISION NOT NULL DEFAULT 0,
                paid DOUBLE PRECISION NOT NULL DEFAULT 0, cancelled BIGINT NOT NULL DEFAULT 0)",
        )
        .await
    }

    /// The report, oldest day first.
    pub async fn rows(pool: &PgPool) -> sqlx::Result<Vec<DayTotals>> {
        sqlx::query_as(
            "SELECT day, orders, ordered, paid, cancelled FROM daily_order_totals ORDER BY day",
        )
        .fetch_all(pool)
        .await
    }
}

#[async_trait]
impl Projection for DailyTotals {
    type Event = OrderEvent;

    fn name(&self) -> &str {
        "daily_order_totals"
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        envelope: &Envelope<OrderEvent>,
    ) -> Result<(), ApplyError> {
        Ok(self.apply_batch(conn, &Batch::one(envelope)).await?)
    }

    /// Set-based: the batch summed per day in memory, then one upsert with
    /// a row per day (sums do not depend on the order of the streams).
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        batch: &Batch<'_, OrderEvent>,
    ) -> Result<(), BatchError> {
        let mut days: BTreeMap<chrono::NaiveDate, (i64, f64, f64, i64)> = BTreeMap::new();
        for envelope in batch.events() {
            let day = days.entry(envelope.timestamp.date_naive()).or_default();
            match &envelope.payload {
                OrderEvent::OrderCreated { amount, .. } => {
                    day.0 += 1;
                    day.1 += amount;
                }
                OrderEvent::PaymentProcessed { amount, .. } => day.2 += amount,
                OrderEvent::OrderCancelled { .. } => day.3 += 1,
            }
        }
        let (mut day, mut orders, mut ordered, mut paid, mut cancelled) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (d, (o, v, p, c)) in days {
            day.push(d);
            orders.push(o);
            ordered.push(v);
            paid.push(p);
            cancelled.push(c);
        }
        // Days in order: concurrent batches lock them in the same order.
        sqlx::query(
            "INSERT INTO daily_order_totals AS t (day, orders, ordered, paid, cancelled) \
             SELECT * FROM UNNEST($1::date[], $2::bigint[], $3::float8[], $4::float8[], $5::bigint[]) \
             ON CONFLICT (day) DO UPDATE SET orders = t.orders + EXCLUDED.orders, \
             ordered = t.ordered + EXCLUDED.ordered, paid = t.paid + EXCLUDED.paid, \
             cancelled = t.cancelled + EXCLUDED.cancelled",
        )
        .bind(&day)
        .bind(&orders)
        .bind(&ordered)
        .bind(&paid)
        .bind(&cancelled)
        .execute(conn)
        .await?;
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ApplyError> {
        sqlx::query("TRUNCATE daily_order_totals")
            .execute(conn)
            .await?;
        Ok(())
    }
}
