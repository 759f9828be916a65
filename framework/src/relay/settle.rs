//! Settling: what a batch's delivery reports decide, and the deletes.
//!
//! # Guarantees
//!
//! - **Delete after acknowledgement only, and only what was published.** A
//!   row leaves the outbox after the broker acknowledged it, named by its id
//!   *and* its event id: a row that reuses an id (after a lost commit moved
//!   the identity sequence back) is never deleted by a stale delete.
//! - **A failed row keeps its aggregate.** A failed row and every later row
//!   of its aggregate, in this batch and those after it, stay in the outbox
//!   and are retried in order.
//! - **Deletes never lead to republishing.** A delete that fails is retried
//!   (with backoff and a deadline per attempt) for as long as the relay
//!   runs; its rows stay out of every read meanwhile and the pipeline stops
//!   reading once two deletes are pending. Deletes run on the relay's pool,
//!   with its connection settings, as one statement whose own transaction
//!   sets `synchronous_commit = off` (a delete lost in a server crash only
//!   publishes those rows again). On shutdown a delete makes one more
//!   attempt at most.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::producer::{Producer, PurgeConfig};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::publish::{InFlight, Reports};
use super::{Relay, RelayStats, within};
use crate::error::{Error, Result};

/// Acknowledged rows being deleted (they stay out of reads until the
/// delete is collected).
pub(super) struct Deleting {
    pub(super) ids: Vec<i64>,
    task: JoinHandle<Result<()>>,
}

impl Deleting {
    pub(super) fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits for the delete.
    pub(super) async fn finish(self) -> Result<()> {
        joined(self.task, "deleting published outbox rows").await
    }
}

/// What settling a batch found.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Settled {
    /// Deliveries that failed and will be retried.
    pub(super) failed: usize,
    /// Rows refused for good and set aside.
    pub(super) dead: usize,
}

/// What settling needs of the relay.
pub(super) struct Settle<'a> {
    pub(super) pool: &'a PgPool,
    pub(super) stats: &'a Arc<RelayStats>,
    pub(super) blocked: &'a mut std::collections::HashSet<super::read::Stream>,
    /// Aggregates with a row not acknowledged in the batches settled since
    /// the pipeline was last empty.
    pub(super) unsettled: &'a mut std::collections::HashSet<super::read::Stream>,
    pub(super) db_timeout: Duration,
    pub(super) stop: &'a CancellationToken,
}

impl Settle<'_> {
    /// Takes a batch's delivery reports: starts deleting the acknowledged
    /// rows in the background, keeps each failed row and every later row of
    /// its aggregate, and sets aside rows refused for good.
    pub(super) async fn batch(
        self,
        batch: InFlight,
        reports: Reports,
    ) -> Result<(Settled, Option<Deleting>)> {
        let mut acknowledged = Vec::with_capacity(batch.rows.len());
        let mut settled = Settled::default();
        for (row, report) in batch.rows.iter().zip(reports) {
            let stream = row.stream();
            // An earlier row of this aggregate (in this batch or one before)
            // was not acknowledged: nothing after it may leave the outbox.
            let behind = !self.unsettled.is_empty() && self.unsettled.contains(&stream);
            match report {
                None if !behind => {
                    acknowledged.push((row.id, row.event_id));
                    continue;
                }
                None => {}
                // Refused for good, and no earlier row of its aggregate is
                // to be retried: set it aside.
                Some(failure) if failure.permanent && !behind => {
                    let aggregate = format!("{}/{}", row.aggregate_type, row.aggregate_id);
                    tracing::error!(
                        topic = row.topic,
                        aggregate,
                        row = row.id,
                        reason = failure.reason,
                        "relay: a row was refused for good; setting it aside (its aggregate is held until it is retried)"
                    );
                    within(
                        self.db_timeout,
                        "setting aside a refused outbox row",
                        super::dead::set_aside(self.pool, row.id, row.event_id, &failure.reason),
                    )
                    .await?;
                    settled.dead += 1;
                }
                Some(failure) if !failure.held => {
                    settled.failed += 1;
                    if settled.failed == 1 {
                        tracing::warn!(
                            topic = row.topic,
                            aggregate = format!("{}/{}", row.aggregate_type, row.aggregate_id),
                            error = failure.reason,
                            "relay: delivery failed; keeping the row and the rest of its aggregate"
                        );
                    }
                }
                Some(_) => {}
            }
            self.blocked.insert(stream.clone());
            self.unsettled.insert(stream);
        }
        self.stats
            .failed
            .fetch_add(settled.failed as u64, Ordering::Relaxed);
        self.stats
            .dead
            .fetch_add(settled.dead as u64, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats
            .batch_rows
            .fetch_add(batch.rows.len() as u64, Ordering::Relaxed);
        if acknowledged.is_empty() {
            record_latency(self.stats, batch.started);
            return Ok((settled, None));
        }
        let ids = acknowledged.iter().map(|(id, _)| *id).collect();
        let pool = self.pool.clone();
        let stats = Arc::clone(self.stats);
        let stop = self.stop.clone();
        let limit = self.db_timeout;
        let started = batch.started;
        let task = tokio::spawn(async move {
            delete_rows(&pool, &acknowledged, &stop, limit).await?;
            stats
                .published
                .fetch_add(acknowledged.len() as u64, Ordering::Relaxed);
            record_latency(&stats, started);
            Ok(())
        });
        Ok((settled, Some(Deleting { ids, task })))
    }
}

impl Relay {
    /// Settles every batch in flight and waits for every delete. A batch
    /// that passes the delivery timeout meanwhile is purged; a purged or
    /// failed producer is replaced. Returns the deliveries that failed.
    pub(super) async fn drain(&mut self) -> Result<usize> {
        tracing::debug!(batches = self.in_flight.len(), "relay: draining");
        self.drop_prefetch();
        let mut outcome = Ok(());
        let mut failed = 0;
        while let Some(mut batch) = self.in_flight.pop_front() {
            let expiry = batch.started + self.config.delivery_timeout;
            let reports = tokio::select! {
                reports = batch.reports() => reports,
                () = tokio::time::sleep_until(expiry.into()) => {
                    self.stats.purges.fetch_add(1, Ordering::Relaxed);
                    self.purged = true;
                    self.producer.purge(PurgeConfig::default().queue().inflight());
                    batch.reports().await
                }
            };
            match self.settle(batch, reports).await {
                Ok(settled) => failed += settled.failed,
                Err(e) => outcome = Err(e),
            }
        }
        self.blocked.clear();
        self.unsettled.clear();
        if let Err(e) = self.reap_deletes(true).await {
            outcome = Err(e);
        }
        self.renew_producer()?;
        outcome.map(|()| failed)
    }

    /// Settles a batch and keeps at most two deletes running (waiting for
    /// the oldest first).
    pub(super) async fn settle(&mut self, batch: InFlight, reports: Reports) -> Result<Settled> {
        let (settled, delete) = Settle {
            pool: &self.pool,
            stats: &self.stats,
            blocked: &mut self.blocked,
            unsettled: &mut self.unsettled,
            db_timeout: self.config.db_timeout,
            stop: &self.stop,
        }
        .batch(batch, reports)
        .await?;
        if let Some(delete) = delete {
            if self.deleting.len() >= 2 {
                let oldest = self.deleting.pop_front().expect("two deletes");
                oldest.finish().await?;
            }
            self.deleting.push_back(delete);
        }
        Ok(settled)
    }

    /// Collects finished deletes (all of them with `wait`).
    pub(super) async fn reap_deletes(&mut self, wait: bool) -> Result<()> {
        let mut outcome = Ok(());
        while let Some(front) = self.deleting.front() {
            if !wait && !front.is_finished() {
                break;
            }
            let done = self.deleting.pop_front().expect("a front delete");
            if let Err(e) = done.finish().await {
                outcome = Err(e);
            }
        }
        outcome
    }
}

/// Adds a settled batch's time from read to delete to the stats.
fn record_latency(stats: &RelayStats, started: Instant) {
    stats
        .batch_micros
        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
}

/// The result of a background database task; a task that panicked is a
/// database error of `what`.
pub(super) async fn joined<T>(task: JoinHandle<Result<T>>, what: &str) -> Result<T> {
    task.await.unwrap_or_else(|e| {
        Err(Error::db(what)(sqlx::Error::Protocol(format!(
            "the task failed: {e}"
        ))))
    })
}

/// Deletes acknowledged rows, named by (id, event id). Retries until it
/// succeeds; once `stop` is cancelled, makes one attempt at most.
async fn delete_rows(
    pool: &PgPool,
    rows: &[(i64, uuid::Uuid)],
    stop: &CancellationToken,
    limit: Duration,
) -> Result<()> {
    let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
    let event_ids: Vec<uuid::Uuid> = rows.iter().map(|(_, e)| *e).collect();
    let mut attempt = 0u32;
    loop {
        // One statement, one round trip: `set_config(…, true)` lasts for the
        // statement's own transaction, whose commit then does not wait for
        // the WAL flush (a delete lost in a crash only republishes).
        let result = within(limit, "deleting published outbox rows", async {
            sqlx::query(
                "WITH settings AS (SELECT set_config('synchronous_commit', 'off', true) AS v) \
                 DELETE FROM tidings_outbox o \
                 USING unnest($1::bigint[], $2::uuid[]) AS d(id, event_id), settings s \
                 WHERE o.id = d.id AND o.event_id = d.event_id AND s.v = 'off'",
            )
            .bind(&ids)
            .bind(&event_ids)
            .execute(pool)
            .await
            .map(|_| ())
            .map_err(Error::db("deleting published outbox rows"))
        })
        .await;
        match result {
            Ok(()) => return Ok(()),
            Err(e) if stop.is_cancelled() => return Err(e),
            Err(error) => {
                attempt += 1;
                tracing::warn!(%error, attempt, "relay: deleting published rows failed; retrying (they stay out of reads meanwhile)");
                let delay = Duration::from_millis(100)
                    .saturating_mul(1 << attempt.min(6))
                    .min(Duration::from_secs(5));
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stop.cancelled() => {}
                }
            }
        }
    }
}
