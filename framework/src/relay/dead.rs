//! Dead rows: outbox rows refused for good, set aside with their reason.
//!
//! # Guarantees
//!
//! - **One bad row stops one aggregate, not the relay.** A row the broker or
//!   the client refuses permanently (too large, not authorised, an invalid
//!   topic, unreadable headers) moves to `tidings_outbox_dead` with the
//!   reason, in one statement; every other aggregate keeps flowing.
//! - **Order holds.** The later rows of a dead row's aggregate stay in the
//!   outbox and are not read while a dead row of that aggregate exists.
//!   [`retry_dead_rows`] moves a dead row back under its own id, which is
//!   lower than theirs, so the aggregate resumes in order.
//! - **Nothing is lost.** A dead row is moved, never deleted; the move
//!   names the row by id *and* event id.

use sqlx::PgPool;

use crate::error::{Error, Result};

const COLUMNS: &str = "id, lane, topic, message_key, aggregate_type, aggregate_id, sequence, \
    event_id, event_type, event_version, headers, envelope, created_at";

/// A row set aside by the relay.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
#[non_exhaustive]
pub struct DeadRow {
    /// The outbox id (kept: a retried row goes back under it).
    pub id: i64,
    /// The topic it was for.
    pub topic: String,
    /// The aggregate type.
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: String,
    /// The event's sequence in its stream.
    pub sequence: i64,
    /// The event id.
    pub event_id: uuid::Uuid,
    /// Why it was refused.
    pub reason: String,
    /// When it was set aside.
    pub dead_at: chrono::DateTime<chrono::Utc>,
    /// Rows of the same aggregate held in the outbox behind it.
    pub held: i64,
}

/// Moves one refused row out of the outbox, with the reason. Returns
/// whether the row was still there.
pub(super) async fn set_aside(
    pool: &PgPool,
    id: i64,
    event_id: uuid::Uuid,
    reason: &str,
) -> Result<bool> {
    let moved = sqlx::query(&format!(
        "WITH moved AS (DELETE FROM tidings_outbox WHERE id = $1 AND event_id = $2 \
         RETURNING {COLUMNS}) \
         INSERT INTO tidings_outbox_dead ({COLUMNS}, reason) SELECT {COLUMNS}, $3 FROM moved \
         ON CONFLICT (id) DO NOTHING"
    ))
    .bind(id)
    .bind(event_id)
    .bind(reason)
    .execute(pool)
    .await
    .map_err(Error::db(format!("setting aside outbox row {id}")))?;
    Ok(moved.rows_affected() > 0)
}

/// The dead rows, oldest first, with how many rows each holds back.
pub async fn dead_rows(pool: &PgPool) -> Result<Vec<DeadRow>> {
    sqlx::query_as(
        "SELECT d.id, d.topic, d.aggregate_type, d.aggregate_id, d.sequence, d.event_id, \
         d.reason, d.dead_at, \
         (SELECT count(*) FROM tidings_outbox o \
          WHERE o.aggregate_type = d.aggregate_type AND o.aggregate_id = d.aggregate_id) AS held \
         FROM tidings_outbox_dead d ORDER BY d.id",
    )
    .fetch_all(pool)
    .await
    .map_err(Error::db("listing dead outbox rows"))
}

/// Moves dead rows back into the outbox under their own ids (all of them
/// with `None`), so the relay publishes them, then the rows held behind
/// them, in order. Returns how many were moved.
pub async fn retry_dead_rows(pool: &PgPool, ids: Option<&[i64]>) -> Result<u64> {
    let moved = sqlx::query(&format!(
        "WITH back AS (DELETE FROM tidings_outbox_dead WHERE $1::bigint[] IS NULL OR id = ANY($1) \
         RETURNING {COLUMNS}) \
         INSERT INTO tidings_outbox ({COLUMNS}) OVERRIDING SYSTEM VALUE SELECT {COLUMNS} FROM back"
    ))
    .bind(ids)
    .execute(pool)
    .await
    .map_err(Error::db("retrying dead outbox rows"))?;
    Ok(moved.rows_affected())
}
