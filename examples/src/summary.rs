//! The order summary read model: one row per order, built by a projection.
//!
//! `events_applied` counts the events applied to each row, so a test can
//! prove each event changed the read model exactly once.

use async_trait::async_trait;
use sqlx::{PgConnection, PgPool};
use tidings::Envelope;
use tidings::projection::{ApplyError, Batch, BatchError, Projection};

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

/// Orders created in a batch, column by column.
#[derive(Default)]
struct NewRows<'a> {
    ids: Vec<&'a str>,
    users: Vec<&'a str>,
    amounts: Vec<f64>,
    currencies: Vec<&'a str>,
    statuses: Vec<&'a str>,
    payments: Vec<Option<&'a str>>,
    events: Vec<i32>,
}

/// Changes to orders created before the batch, column by column.
#[derive(Default)]
struct Changes<'a> {
    ids: Vec<&'a str>,
    statuses: Vec<Option<&'a str>>,
    payments: Vec<Option<&'a str>>,
    events: Vec<i32>,
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
        Ok(self.apply_batch(conn, &Batch::one(envelope)).await?)
    }

    /// Set-based: each order's events folded into one row change, then one
    /// `INSERT` for the orders created in the batch and one `UPDATE` for
    /// the others, whatever the batch's size.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        batch: &Batch<'_, OrderEvent>,
    ) -> Result<(), BatchError> {
        let table = &self.table;
        let mut created = NewRows::default();
        let mut changed = Changes::default();
        for stream in batch.by_stream() {
            let mut row: Option<(&str, f64, &str)> = None;
            let (mut status, mut payment, mut n) = (None, None, 0);
            for (index, envelope) in &stream.events {
                match &envelope.payload {
                    OrderEvent::OrderCreated {
                        user_id,
                        amount,
                        currency,
                        ..
                    } => {
                        // What one INSERT per event would refuse.
                        if row.is_some() || n > 0 {
                            return Err(BatchError::permanent(
                                *index,
                                format!("order {} created twice", stream.aggregate_id),
                            ));
                        }
                        row = Some((user_id.as_str(), *amount, currency.as_str()));
                        status = Some("created");
                    }
                    OrderEvent::PaymentProcessed { payment_id, .. } => {
                        status = Some("paid");
                        payment = Some(payment_id.as_str());
                    }
                    OrderEvent::OrderCancelled { .. } => status = Some("cancelled"),
                }
                n += 1;
            }
            match row {
                Some((user, amount, currency)) => {
                    created.ids.push(stream.aggregate_id);
                    created.users.push(user);
                    created.amounts.push(amount);
                    created.currencies.push(currency);
                    created.statuses.push(status.unwrap_or("created"));
                    created.payments.push(payment);
                    created.events.push(n);
                }
                None => {
                    changed.ids.push(stream.aggregate_id);
                    changed.statuses.push(status);
                    changed.payments.push(payment);
                    changed.events.push(n);
                }
            }
        }
        if !created.ids.is_empty() {
            sqlx::query(&format!(
                "INSERT INTO {table} (order_id, user_id, amount, currency, status, payment_id, events_applied) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::float8[], $4::text[], $5::text[], $6::text[], $7::int[])"
            ))
            .bind(&created.ids)
            .bind(&created.users)
            .bind(&created.amounts)
            .bind(&created.currencies)
            .bind(&created.statuses)
            .bind(&created.payments)
            .bind(&created.events)
            .execute(&mut *conn)
            .await?;
        }
        if !changed.ids.is_empty() {
            // An order never created is left alone, as an UPDATE per event would.
            sqlx::query(&format!(
                "UPDATE {table} AS o SET status = coalesce(u.status, o.status), \
                 payment_id = coalesce(u.payment_id, o.payment_id), events_applied = o.events_applied + u.n \
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int[]) AS u(id, status, payment_id, n) \
                 WHERE o.order_id = u.id"
            ))
            .bind(&changed.ids)
            .bind(&changed.statuses)
            .bind(&changed.payments)
            .bind(&changed.events)
            .execute(&mut *conn)
            .await?;
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
