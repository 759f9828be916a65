//! The outbox relay: PostgreSQL → Kafka.
//!
//! # Guarantees
//!
//! - **Nothing lost.** A row leaves the outbox only after the broker
//!   acknowledged it (idempotent producer, `acks=all`), and the delete names
//!   the row by id and event id. A relay killed at any instant leaves its
//!   unacknowledged rows in the outbox for the next one.
//! - **At least once.** A crash between the acknowledgement and the delete
//!   publishes those rows again: consumers dedupe (tidings projections do).
//! - **In order per aggregate**, with any number of relays. The claim scheme:
//!   *claim by lane, delete after acknowledgement.* Each aggregate hashes to
//!   one of [`crate::store::OUTBOX_LANES`] lanes; a relay owns a lane through
//!   a PostgreSQL session advisory lock (released by the server if the relay
//!   dies), so one aggregate is published by one relay at a time. The relay
//!   reads the visible rows of its lanes in id order, produces them in that
//!   order, and deletes exactly the rows acknowledged, keeping a failed row
//!   *and every later row of its aggregate*, which are retried in order.
//! - **Late commits are never skipped.** There is no cursor: every read takes
//!   whatever rows are in the outbox now, leaving out only the rows this
//!   relay has in flight, so a row with a lower id that becomes visible after
//!   higher ones is simply published by the next read. This is safe for
//!   ordering because, within one aggregate, a row only becomes visible after
//!   all lower sequences of that aggregate committed (the store's unique
//!   stream key makes a concurrent writer wait for and then fail on the
//!   earlier transaction), and its id is higher.
//! - **No librdkafka message timeout**, hence no gap: the relay enforces its
//!   own [`RelayConfig::delivery_timeout`] by purging the producer and
//!   retrying from the first unacknowledged row (see `publish`).
//! - **One bad row holds one aggregate.** A row refused for good is set
//!   aside in `tidings_outbox_dead` with its reason ([`dead_rows`],
//!   [`retry_dead_rows`]); every other aggregate keeps flowing.
//! - **Bounded waits.** Every database call has a client-side deadline
//!   ([`RelayConfig::db_timeout`]), the lock session asks the server to
//!   drop it within seconds of going silent (TCP keepalives and
//!   `tcp_user_timeout`), a relay that makes no progress for
//!   [`RelayConfig::stall_timeout`] gives its lanes up for others, and
//!   shutdown finishes within [`RelayConfig::shutdown_timeout`] even while
//!   PostgreSQL or the broker is unreachable (what it could not settle is
//!   published again later: at least once).
//!
//! Requires synchronous commit (and synchronous replication, if any) for
//! the appends: a commit acknowledged and then lost takes its events with
//! it after they may have been published.
//!
//! # Pipeline
//!
//! The stages, one file each: `lanes` (which relay owns which aggregates),
//! `read` (waking on commits, the rows of the owned lanes in id order, their
//! topics), `publish` (the producer and the delivery reports), `settle`
//! (deletes, failed rows, draining the pipeline), `dead` (rows refused for
//! good); `config` holds the settings and counters. This file is the loop
//! that connects them. Up to [`RelayConfig::pipeline_depth`]
//! batches are in flight at once: the relay reads and enqueues the next
//! batch while earlier ones await their delivery reports, and deletes
//! acknowledged batches in the background. A failed or refused row blocks
//! its aggregate in every batch in flight; the relay then stops reading,
//! settles the whole pipeline, backs off and starts again from the failed
//! row.
//!
//! Duplicates can also arise when a relay loses its lock session while it
//! still has batches in flight; each publisher's stream is still in order,
//! so dedupe by (aggregate, sequence) on the consumer side restores exactly
//! once.
//!
//! # Latency
//!
//! Nothing runs in the appending transaction to wake the relay (a `NOTIFY`
//! there would serialise every writer's commit). The store sends a
//! coalesced `NOTIFY tidings_outbox` of its own after its commits (see
//! [`crate::Store::notify_relays`]); the relay `LISTEN`s and reads at once,
//! even while earlier batches await their acknowledgements. It also polls:
//! 5 ms after a wake or a read that found rows, doubling while reads find
//! nothing, up to [`RelayConfig::poll_interval`]; so commits made in the
//! caller's own transactions (`execute_in`, `append`, whose wake comes
//! before the caller commits) are found within milliseconds too. Under load
//! it takes full batches and does not wait.
//!
//! Requires PostgreSQL 14 or later (the rows in flight are left out of each
//! read with an `int8multirange`).

mod config;
mod dead;
mod lanes;
mod publish;
mod read;
mod settle;

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::producer::{Producer, PurgeConfig};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use lanes::Lanes;
use publish::{InFlight, RelayProducer, Reports, Tracker};
#[doc(hidden)]
pub use read::read_batch_for_measurement;
use read::{Row, Stream, wait_notification};
use settle::{Deleting, Settled};

pub use config::{RelayConfig, RelayStats};
pub use dead::{DeadRow, dead_rows, retry_dead_rows};

/// The channel the store wakes relays on (see [`crate::Store::notify_relays`]).
pub const OUTBOX_CHANNEL: &str = crate::store::OUTBOX_CHANNEL;

/// Runs `work` with a deadline; a silent server or network becomes
/// [`Error::Timeout`] instead of a wait of minutes.
pub(crate) async fn within<T>(
    limit: Duration,
    what: &str,
    work: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, work).await {
        Ok(result) => result,
        Err(_) => Err(Error::Timeout {
            context: what.to_owned(),
            after: limit,
        }),
    }
}

/// A relay: claims outbox rows by lane, publishes them, deletes what the
/// broker acknowledged. Run it with [`Relay::run`].
pub struct Relay {
    pool: PgPool,
    config: RelayConfig,
    producer: RelayProducer,
    /// Whether the producer was purged and must be replaced.
    purged: bool,
    tracker: Arc<Tracker>,
    /// The ticket of the next message handed to the producer.
    next_ticket: usize,
    lanes: Lanes,
    known_topics: HashSet<String>,
    stats: Arc<RelayStats>,
    /// Batches handed to the producer, oldest first.
    in_flight: VecDeque<InFlight>,
    /// Acknowledged rows being deleted in the background.
    deleting: VecDeque<Deleting>,
    /// The next batch, read while the last one is enqueued (only after a
    /// full batch; dropped whenever the pipeline is settled or lanes change).
    prefetch: Option<JoinHandle<Result<Vec<Row>>>>,
    /// Aggregates with a refused or failed row in the batches in flight:
    /// none of their later rows is deleted (nor enqueued) until the
    /// pipeline has been settled.
    blocked: HashSet<Stream>,
    /// Aggregates with a row not acknowledged in the batches settled so far
    /// (a later row of theirs is neither deleted nor set aside).
    unsettled: HashSet<Stream>,
    /// Cancelled when shutdown is asked for.
    stop: CancellationToken,
    /// How long the relay waits before polling again when nothing wakes it:
    /// short right after a wake or a read that found rows, doubling while
    /// reads come back empty, up to [`RelayConfig::poll_interval`].
    idle_poll: Duration,
    /// Rows the last read found.
    last_read_rows: usize,
}

/// The shortest wait between polls, right after a wake or a read that
/// found rows: a commit that follows its wake (a transaction of the
/// caller's) is found within milliseconds.
const MIN_POLL: Duration = Duration::from_millis(5);

/// What the relay does next.
enum Step {
    /// Read and enqueue a batch.
    Read,
    /// The oldest batch's delivery reports arrived.
    Settle(Reports),
    /// The oldest batch passed the delivery timeout.
    Expired,
    /// Nothing yet: look at the clock and the shutdown flag again.
    Idle,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .field("lanes", &self.lanes.owned())
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay on `pool` (which must have the tidings migrations). Reads,
    /// deletes and the lane-lock session all use the pool's connection
    /// settings.
    pub fn new(pool: PgPool, config: RelayConfig) -> Result<Self> {
        let tracker = Arc::new(Tracker::default());
        let producer = publish::producer(&config, &tracker)?;
        let options = (*pool.connect_options()).clone();
        let lanes = Lanes::new(options, config.db_timeout);
        let stats = Arc::new(RelayStats::default());
        stats.healthy.store(true, Ordering::Relaxed);
        Ok(Relay {
            pool,
            config,
            producer,
            purged: false,
            tracker,
            next_ticket: 0,
            lanes,
            known_topics: HashSet::new(),
            stats,
            in_flight: VecDeque::new(),
            deleting: VecDeque::new(),
            prefetch: None,
            blocked: HashSet::new(),
            unsettled: HashSet::new(),
            stop: CancellationToken::new(),
            idle_poll: MIN_POLL,
            last_read_rows: 0,
        })
    }

    /// The relay's counters, shared: they keep counting after `run` starts.
    pub fn stats(&self) -> Arc<RelayStats> {
        Arc::clone(&self.stats)
    }

    /// Runs until `shutdown` completes, then settles the batches in flight
    /// (waits for their delivery reports and deletes what was acknowledged)
    /// for at most [`RelayConfig::shutdown_timeout`], releases its lanes and
    /// returns. Database and broker failures are retried with backoff and
    /// reported through `tracing`; only configuration errors end the relay
    /// early.
    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let stop = self.stop.clone();
        let deadline = self.config.shutdown_timeout;
        let work = self.work();
        tokio::pin!(work, shutdown);
        tokio::select! {
            result = &mut work => return result,
            () = &mut shutdown => stop.cancel(),
        }
        // What is left of the deadline after the teardown that follows
        // (the producer's purge and close, about half a second).
        let settle_for = deadline.saturating_sub(Duration::from_millis(500));
        match tokio::time::timeout(settle_for, work).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(
                    ?deadline,
                    "relay: shutdown deadline passed; rows not yet settled will be published again"
                );
                Ok(())
            }
        }
    }

    async fn work(&mut self) -> Result<()> {
        let mut listener: Option<PgListener> = None;
        let mut last_rebalance: Option<Instant> = None;
        let mut failures: u32 = 0;
        let mut last_progress = Instant::now();
        // After giving lanes up, none is taken before this instant.
        let mut cooling_until: Option<Instant> = None;
        // Read without waiting for a notification: at the start, after a
        // full batch, when lanes were taken and after a backoff.
        let mut more = true;
        loop {
            if self.stop.is_cancelled() {
                break;
            }
            if let Err(e) = self.reap_deletes(false).await {
                failures += 1;
                self.report(&e, failures);
            }
            if failures > 0
                && !self.lanes.is_empty()
                && last_progress.elapsed() >= self.config.stall_timeout
            {
                tracing::warn!(
                    stalled = ?last_progress.elapsed(),
                    lanes = self.lanes.owned().len(),
                    "relay: no progress; giving the lanes up to other relays"
                );
                self.stats.stalls.fetch_add(1, Ordering::Relaxed);
                let _ = self.drain().await;
                self.lanes.release().await;
                self.stats.lanes.store(0, Ordering::Relaxed);
                listener = None;
                cooling_until = Some(Instant::now() + self.config.stall_timeout);
                last_progress = Instant::now();
            }
            let cooling = cooling_until.is_some_and(|t| Instant::now() < t);
            // Own lanes.
            if !cooling
                && last_rebalance.is_none_or(|t| t.elapsed() >= self.config.rebalance_interval)
            {
                match self.rebalance().await {
                    Ok((changed, failed)) => {
                        last_rebalance = Some(Instant::now());
                        more |= changed;
                        if failed > 0 {
                            // Settling before giving lanes back found failures.
                            failures += 1;
                            self.stats.healthy.store(false, Ordering::Relaxed);
                            self.pause(failures).await;
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        self.report(&e, failures);
                        self.pause(failures).await;
                        continue;
                    }
                }
            }
            if listener.is_none() && !self.lanes.is_empty() {
                listener = self.listen().await;
            }

            // Nothing goes into a purged producer: it is replaced first.
            let can_read = self.in_flight.len() < self.config.pipeline_depth
                && !self.lanes.is_empty()
                && !self.purged;
            let next_rebalance = last_rebalance
                .map_or(Duration::ZERO, |t| {
                    self.config.rebalance_interval.saturating_sub(t.elapsed())
                })
                .max(Duration::from_millis(1));
            let poll = self.idle_poll.min(self.config.poll_interval);
            let expiry = self
                .in_flight
                .front()
                .filter(|_| !self.purged)
                .map(|batch| batch.started + self.config.delivery_timeout);
            let step = {
                let front = self.in_flight.front_mut();
                let stop = self.stop.clone();
                tokio::select! {
                    biased;
                    reports = async {
                        match front {
                            Some(batch) => batch.reports().await,
                            None => std::future::pending().await,
                        }
                    } => Step::Settle(reports),
                    () = async {
                        match expiry {
                            Some(at) => tokio::time::sleep_until(at.into()).await,
                            None => std::future::pending().await,
                        }
                    } => Step::Expired,
                    () = std::future::ready(()), if can_read && more => Step::Read,
                    () = stop.cancelled() => Step::Idle,
                    notified = wait_notification(&mut listener), if can_read => {
                        if notified {
                            self.idle_poll = MIN_POLL;
                        } else {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Step::Read
                    }
                    () = tokio::time::sleep(poll), if can_read => Step::Read,
                    () = tokio::time::sleep(next_rebalance) => Step::Idle,
                }
            };
            let result = match step {
                Step::Idle => continue,
                Step::Expired => {
                    tracing::warn!(
                        timeout = ?self.config.delivery_timeout,
                        "relay: a batch was not acknowledged in time; purging the producer and retrying from its first unacknowledged row"
                    );
                    self.stats.purges.fetch_add(1, Ordering::Relaxed);
                    self.purged = true;
                    self.producer
                        .purge(PurgeConfig::default().queue().inflight());
                    continue;
                }
                Step::Read => {
                    let span = tracing::debug_span!(
                        "tidings.relay.batch",
                        lanes = self.lanes.owned().len(),
                        rows = tracing::field::Empty
                    );
                    tracing::Instrument::instrument(self.read_and_enqueue(), span)
                }
                .await
                .map(|full| {
                    more = full;
                    // Adaptive polling: soon again after rows (more may be
                    // committing), backing off while reads find nothing.
                    self.idle_poll = if self.last_read_rows > 0 {
                        MIN_POLL
                    } else {
                        (self.idle_poll * 2).min(self.config.poll_interval)
                    };
                    // Nothing to publish is progress too (a healthy idle relay).
                    if self.in_flight.is_empty() {
                        last_progress = Instant::now();
                    }
                    Settled::default()
                }),
                Step::Settle(reports) => {
                    let batch = self.in_flight.pop_front().expect("the front batch settled");
                    let settled = self.settle(batch, reports).await;
                    if let Ok(Settled { failed: 0, .. }) = settled {
                        last_progress = Instant::now();
                    }
                    settled
                }
            };
            match result {
                Ok(Settled { failed: 0, dead: 0 }) => {
                    if self.in_flight.is_empty() {
                        self.blocked.clear();
                        self.unsettled.clear();
                        failures = 0;
                        self.stats.healthy.store(true, Ordering::Relaxed);
                    }
                }
                Ok(Settled { failed, .. }) => {
                    // Start again from the failed rows, in order: settle
                    // everything in flight, then back off (not for rows
                    // merely set aside: the others go on at once).
                    if let Err(e) = self.drain().await {
                        self.report(&e, failures);
                    }
                    if failed > 0 {
                        failures += 1;
                        self.stats.healthy.store(false, Ordering::Relaxed);
                        self.pause(failures).await;
                    }
                    more = true;
                }
                Err(e) => {
                    failures += 1;
                    self.report(&e, failures);
                    if let Error::Config(_) = e {
                        self.finish().await;
                        return Err(e);
                    }
                    listener = None;
                    if let Err(e) = self.drain().await {
                        self.report(&e, failures);
                    }
                    self.pause(failures).await;
                    more = true;
                }
            }
        }
        self.finish().await;
        Ok(())
    }

    /// Takes lanes up to the fair share; giving lanes back first settles
    /// everything in flight, so that no row of a lane another relay may
    /// take is still on its way. Returns whether the lanes changed, and the
    /// deliveries that failed while settling.
    async fn rebalance(&mut self) -> Result<(bool, usize)> {
        let before = self.lanes.owned();
        let idle = self.in_flight.is_empty() && self.deleting.is_empty();
        let mut result = self.lanes.rebalance(idle).await;
        let mut failed = 0;
        if let Ok(true) = result {
            failed = self.drain().await?;
            result = self.lanes.rebalance(true).await;
        }
        let changed = self.lanes.owned() != before;
        if changed {
            self.drop_prefetch();
        }
        self.stats
            .lanes
            .store(self.lanes.owned().len() as u64, Ordering::Relaxed);
        result.map(|_| (changed, failed))
    }

    fn drop_prefetch(&mut self) {
        if let Some(task) = self.prefetch.take() {
            task.abort();
        }
    }

    async fn finish(&mut self) {
        if let Err(error) = self.drain().await {
            tracing::warn!(%error, "relay: settling the last batches; their rows will be published again");
        }
        self.lanes.release().await;
        tracing::info!(
            published = self.stats.published.load(Ordering::Relaxed),
            "relay stopped"
        );
    }

    fn report(&self, error: &Error, failures: u32) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        self.stats.healthy.store(false, Ordering::Relaxed);
        tracing::warn!(%error, failures, "relay: retrying after an error");
    }

    /// Backs off (cut short by shutdown).
    async fn pause(&mut self, failures: u32) {
        let base = Duration::from_millis(100).saturating_mul(1 << failures.min(10));
        let delay = base
            .min(self.config.max_backoff)
            .mul_f64(0.5 + fastrand::f64() / 2.0);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = self.stop.cancelled() => {}
        }
    }

    /// Replaces the producer after a fatal error or a purge (the tracker is
    /// shared, so tickets go on).
    fn renew_producer(&mut self) -> Result<()> {
        let fatal = self.producer.client().fatal_error();
        if let Some((code, reason)) = &fatal {
            tracing::warn!(
                ?code,
                reason,
                "relay: the producer stopped on a fatal error; starting a fresh one"
            );
        }
        if fatal.is_some() || self.purged {
            tracing::debug!("relay: replacing the producer");
            self.producer = publish::producer(&self.config, &self.tracker)?;
            self.purged = false;
        }
        Ok(())
    }
}
