//! The order summary read model: one row per order, built by a projection.
//!
//! `events_applied` counts the events applied to each row, so a test can
//! prove each event changed the read model exactly once.

use async_trait::async_trait;
use sqlx::{PgConnection, PgPool};
use tidings::Envelope;
use tidings::projection::{ApplyError, Projection};

use crate::orders::OrderEvent;

/// Builds `order_summary` (or another table, for a side-by-side rebuild).
#[derive(Debug, Clone)]
pub struct OrderSummary {
    name: String,
    table: String,
}

impl Default for OrderSummary {
    fn default() -> Self {
        OrderSummary::new("order_summary", "order_summary")
    }
}

impl OrderSummary {
    /// A projection called `name` writing into `table`.
    pub fn new(name: impl Into<String>, table: impl Into<String>) -> Self {
        OrderSummary {
            name: name.into(),
            table: table.into(),
        }
    }

    /// The table this projection writes.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Creates the read model table if missing.
    pub async fn create_table(&self, pool: &PgPool) -> tidings::Result<()> {
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {} (
                order_id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL,
                amount DOUBLE PRECISION NOT NULL,
                currency TEXT NOT NULL,
                status TEXT NOT NULL,
                payment_id TEXT,
                events_applied INTEGER NOT NULL
            )",
            self.table
        );
        tidings::projection::set_up_read_model(pool, &self.table, &ddl).await
    }

    /// The read model's rows, ordered by id: (order, user, amount, currency, status, events applied).
    pub async fn rows(&self, pool: &PgPool) -> sqlx::Result<Vec<SummaryRow>> {
        sqlx::query_as(&format!(
            "SELECT order_id, user_id, amount, currency, status, payment_id, events_applied FROM {} ORDER BY order_id",
            self.table
        ))
        .fetch_all(pool)
        .await
    }
}

/// One row of the order summary.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SummaryRow {
    /// The order.
    pub order_id: String,
    /// Who ordered.
    pub user_id: String,
    /// The total.
    pub amount: f64,
    /// The currency.
    pub currency: String,
    /// `created`, `paid` or `cancelled`.
    pub status: String,
    /// The payment, once paid.
    pub payment_id: Option<String>,
    /// Events applied to this row.
    pub events_applied: i32,
}

#[async_trait]
impl Projection for OrderSummary {
    type Event = OrderEvent;

    fn name(&self) -> &str {
        &self.name
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        envelope: &Envelope<OrderEvent>,
    ) -> Result<(), ApplyError> {
        let id = &envelope.aggregate_id;
        let table = &self.table;
        match &envelope.payload {
            OrderEvent::OrderCreated {
                user_id,
                amount,
                currency,
                ..
            } => {
                sqlx::query(&format!(
                    "INSERT INTO {table} (order_id, user_id, amount, currency, status, events_applied) \
                     VALUES ($1, $2, $3, $4, 'created', 1)"
                ))
                .bind(id)
                .bind(user_id)
                .bind(amount)
                .bind(currency)
                .execute(conn)
                .await?;
            }
            OrderEvent::PaymentProcessed { payment_id, .. } => {
                sqlx::query(&format!(
                    "UPDATE {table} SET status = 'paid', payment_id = $2, events_applied = events_applied + 1 \
                     WHERE order_id = $1"
                ))
                .bind(id)
                .bind(payment_id)
                .execute(conn)
                .await?;
            }
            OrderEvent::OrderCancelled { .. } => {
                sqlx::query(&format!(
                    "UPDATE {table} SET status = 'cancelled', events_applied = events_applied + 1 WHERE order_id = $1"
                ))
                .bind(id)
                .execute(conn)
                .await?;
            }
        }
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ApplyError> {
        sqlx::query(&format!("TRUNCATE {}", self.table))
            .execute(conn)
            .await?;
        Ok(())
    }
}
