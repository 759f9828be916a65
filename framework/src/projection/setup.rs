//! Setting up a read model's tables, safely from several instances at once.
//!
//! # Guarantees
//!
//! - **One at a time.** The statements run in one transaction under an
//!   advisory lock named after the read model, so instances that start
//!   together never race on `CREATE … IF NOT EXISTS` (which PostgreSQL does
//!   not serialise: the loser fails on a catalog unique index).
//! - **All or nothing.** A failure rolls the whole set-up back; it is a
//!   database error (retry it), not a configuration error.

use sqlx::PgPool;

use crate::error::{Error, Result};

/// Runs `ddl` (one statement, e.g. `CREATE TABLE IF NOT EXISTS …`; call it
/// once per statement, or wrap several in a `DO` block)
/// for the read model `name`, in one transaction, one instance at a time.
///
/// ```no_run
/// # async fn f(pool: sqlx::PgPool) -> tidings::Result<()> {
/// tidings::projection::set_up_read_model(
///     &pool,
///     "order_summary",
///     "CREATE TABLE IF NOT EXISTS order_summary (order_id TEXT PRIMARY KEY, total BIGINT NOT NULL)",
/// )
/// .await?;
/// # Ok(()) }
/// ```
pub async fn set_up_read_model(pool: &PgPool, name: &str, ddl: &str) -> Result<()> {
    let what = || format!("setting up the read model {name}");
    let mut tx = pool.begin().await.map_err(Error::db(what()))?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('tidings.setup.' || $1, 0))")
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(Error::db(what()))?;
    sqlx::query(ddl)
        .execute(&mut *tx)
        .await
        .map_err(Error::db(what()))?;
    tx.commit().await.map_err(Error::db(what()))
}
