//! Reports: daily totals built from order and payment events.
//!
//! `DailyTotals` keeps, per day, the orders placed, their value, the
//! payments received and the cancellations, in `daily_order_totals`. It is a
//! read model like any other: `replay` rebuilds it from the topic.

use async_trait::async_trait;
use sqlx::{PgConnection, PgPool};
use tidings::Envelope;
use tidings::projection::{ApplyError, Projection};

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
        let (orders, ordered, paid, cancelled) = match &envelope.payload {
            OrderEvent::OrderCreated { amount, .. } => (1i64, *amount, 0.0, 0i64),
            OrderEvent::PaymentProcessed { amount, .. } => (0, 0.0, *amount, 0),
            OrderEvent::OrderCancelled { .. } => (0, 0.0, 0.0, 1),
        };
        sqlx::query(
            "INSERT INTO daily_order_totals AS t (day, orders, ordered, paid, cancelled) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (day) DO UPDATE SET orders = t.orders + $2, ordered = t.ordered + $3, \
             paid = t.paid + $4, cancelled = t.cancelled + $5",
        )
        .bind(envelope.timestamp.date_naive())
        .bind(orders)
        .bind(ordered)
        .bind(paid)
        .bind(cancelled)
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
