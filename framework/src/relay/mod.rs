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
//! `read` (the rows of the owned lanes, in id order), `publish` (the
//! producer and the delivery reports), `settle` (deletes and failed rows),
//! `dead` (rows refused for good). Up to [`RelayConfig::pipeline_depth`]
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
//! The store's outbox trigger issues one `NOTIFY tidings_outbox` per
//! inserting statement (not per row); the relay `LISTEN`s and reads at once,
//! even while earlier batches await their acknowledgements, and polls every
//! [`RelayConfig::poll_interval`] as a fallback. Under load it takes full
//! batches and does not wait.
//!
//! Requires PostgreSQL 14 or later (the rows in flight are left out of each
//! read with an `int8multirange`).

mod dead;
mod lanes;
mod publish;
mod read;
mod settle;

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::producer::{Producer, PurgeConfig};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::kafka::{KafkaConfig, TopicSpec, ensure_topics_each};
use lanes::Lanes;
use publish::{Enqueue, InFlight, RelayProducer, Reports, Tracker};
use read::{Row, Stream, multirange, read_rows};
use settle::{Deleting, Settle, Settled};

pub use dead::{DeadRow, dead_rows, retry_dead_rows};

/// The channel the outbox trigger notifies.
pub const OUTBOX_CHANNEL: &str = "tidings_outbox";

/// How a relay runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayConfig {
    /// The brokers and any librdkafka property.
    pub kafka: KafkaConfig,
    /// Rows per batch (default 5000).
    pub batch_size: i64,
    /// Batches handed to the producer and not yet acknowledged, at most
    /// (default 4). Memory grows with `batch_size × pipeline_depth`.
    pub pipeline_depth: usize,
    /// Fallback poll when no notification arrives (default 1 s).
    pub poll_interval: Duration,
    /// How long a batch may wait for its acknowledgements before the relay
    /// purges the producer and retries from its first unacknowledged row
    /// (default 30 s, at least 100 ms). librdkafka's own message timeout is
    /// off: it could reorder.
    pub delivery_timeout: Duration,
    /// How often lanes are rebalanced between relays (default 1 s).
    pub rebalance_interval: Duration,
    /// The longest backoff after errors (default 30 s).
    pub max_backoff: Duration,
    /// Create missing topics with this spec; `None` leaves topics alone.
    pub create_topics: Option<TopicSpec>,
    /// The deadline of every database call (default 10 s).
    pub db_timeout: Duration,
    /// A relay that owns lanes and has made no progress for this long while
    /// failing gives its lanes up to other relays and waits as long before
    /// taking any again (default 60 s).
    pub stall_timeout: Duration,
    /// How long shutdown may take to settle what is in flight (default 10 s).
    pub shutdown_timeout: Duration,
}

impl RelayConfig {
    /// Defaults for the given Kafka settings.
    pub fn new(kafka: KafkaConfig) -> Self {
        RelayConfig {
            kafka,
            batch_size: 5000,
            pipeline_depth: 4,
            poll_interval: Duration::from_secs(1),
            delivery_timeout: Duration::from_secs(30),
            rebalance_interval: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            create_topics: Some(TopicSpec::default()),
            db_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(10),
        }
    }

    /// Sets [`RelayConfig::batch_size`].
    pub fn batch_size(mut self, rows: i64) -> Self {
        self.batch_size = rows.max(1);
        self
    }

    /// Sets [`RelayConfig::pipeline_depth`] (at least 1).
    pub fn pipeline_depth(mut self, batches: usize) -> Self {
        self.pipeline_depth = batches.max(1);
        self
    }

    /// Sets [`RelayConfig::delivery_timeout`] (at least 100 ms).
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout.max(Duration::from_millis(100));
        self
    }

    /// Sets [`RelayConfig::poll_interval`].
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Sets [`RelayConfig::create_topics`].
    pub fn create_topics(mut self, spec: Option<TopicSpec>) -> Self {
        self.create_topics = spec;
        self
    }

    /// Sets [`RelayConfig::db_timeout`] (at least 100 ms).
    pub fn db_timeout(mut self, timeout: Duration) -> Self {
        self.db_timeout = timeout.max(Duration::from_millis(100));
        self
    }

    /// Sets [`RelayConfig::stall_timeout`].
    pub fn stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = timeout;
        self
    }

    /// Sets [`RelayConfig::shutdown_timeout`].
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Sets [`RelayConfig::max_backoff`].
    pub fn max_backoff(mut self, backoff: Duration) -> Self {
        self.max_backoff = backoff;
        self
    }
}

/// Counters of a running relay, readable while it runs.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Rows acknowledged by the broker and deleted.
    pub published: AtomicU64,
    /// Deliveries that failed (and were kept for retry); rows merely held
    /// behind a failed row are not counted.
    pub failed: AtomicU64,
    /// Rows refused for good and set aside as dead rows.
    pub dead: AtomicU64,
    /// Batches handled.
    pub batches: AtomicU64,
    /// Errors of the database or the broker that made the relay back off.
    pub errors: AtomicU64,
    /// Times the relay purged its producer after the delivery timeout.
    pub purges: AtomicU64,
    /// Times the relay gave its lanes up after making no progress.
    pub stalls: AtomicU64,
    /// Lanes owned now.
    pub lanes: AtomicU64,
    /// Rows read in batches (with `batches`, the mean batch size).
    pub batch_rows: AtomicU64,
    /// Microseconds from reading batches to deleting them (with `batches`,
    /// the mean batch latency).
    pub batch_micros: AtomicU64,
    /// False while the relay is failing or has given its lanes up.
    pub healthy: AtomicBool,
}

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
}

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
        match tokio::time::timeout(deadline, work).await {
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
            let poll = self.config.poll_interval;
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
                        if !notified {
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
                Step::Read => tracing::Instrument::instrument(
                    self.read_and_enqueue(),
                    tracing::debug_span!("tidings.relay.batch"),
                )
                .await
                .map(|full| {
                    more = full;
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

    /// Settles every batch in flight and waits for every delete. A batch
    /// that passes the delivery timeout meanwhile is purged; a purged or
    /// failed producer is replaced. Returns the deliveries that failed.
    async fn drain(&mut self) -> Result<usize> {
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

    async fn listen(&mut self) -> Option<PgListener> {
        let limit = self.config.db_timeout;
        let connect = async {
            let mut listener = PgListener::connect_with(&self.pool)
                .await
                .map_err(Error::db("listening for outbox commits"))?;
            listener
                .listen(OUTBOX_CHANNEL)
                .await
                .map_err(Error::db("listening for outbox commits"))?;
            Ok(listener)
        };
        within(limit, "listening for outbox commits", connect)
            .await
            .ok()
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

    /// The rows in flight or being deleted, and `more`, as an
    /// `int8multirange` literal.
    fn busy(&self, more: &[Row]) -> String {
        let mut ids: Vec<i64> = self
            .in_flight
            .iter()
            .flat_map(|b| b.rows.iter().map(|r| r.id))
            .chain(self.deleting.iter().flat_map(|d| d.ids.iter().copied()))
            .chain(more.iter().map(|r| r.id))
            .collect();
        multirange(&mut ids)
    }

    /// Takes the next batch of the owned lanes in id order (read ahead, or
    /// read now) and hands it to the producer; after a full batch, starts
    /// reading the one after it. Returns whether the batch was full.
    async fn read_and_enqueue(&mut self) -> Result<bool> {
        let lanes = self.lanes.owned();
        if lanes.is_empty() {
            self.drop_prefetch();
            return Ok(false);
        }
        let size = self.config.batch_size;
        let limit = self.config.db_timeout;
        let rows = match self.prefetch.take() {
            Some(task) => {
                within(
                    limit,
                    "reading the outbox",
                    settle::joined(task, "reading the outbox"),
                )
                .await?
            }
            None => {
                let read = read_rows(self.pool.clone(), lanes.clone(), size, self.busy(&[]));
                within(limit, "reading the outbox", read).await?
            }
        };
        let full = rows.len() as i64 == size;
        if full {
            let busy = self.busy(&rows);
            self.prefetch = Some(tokio::spawn(read_rows(
                self.pool.clone(),
                lanes,
                size,
                busy,
            )));
        }
        let mut unavailable = None;
        tracing::debug!(rows = rows.len(), "relay: read");
        if !rows.is_empty() {
            let missing = self.ensure_topics(&rows).await;
            for row in rows.iter().filter(|r| missing.contains_key(&r.topic)) {
                self.blocked.insert(row.stream());
            }
            unavailable = missing.into_values().next();
            let batch = Enqueue {
                producer: &self.producer,
                tracker: &self.tracker,
                next_ticket: &mut self.next_ticket,
                blocked: &mut self.blocked,
            }
            .batch(rows)
            .await;
            self.in_flight.push_back(batch);
        }
        // The rows of topics that exist went out; those of a topic that is
        // not available wait, after a backoff.
        match unavailable {
            Some(error) => Err(error),
            None => Ok(full),
        }
    }

    /// Settles a batch and keeps at most two deletes running (waiting for
    /// the oldest first).
    async fn settle(&mut self, batch: InFlight, reports: Reports) -> Result<Settled> {
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
    async fn reap_deletes(&mut self, wait: bool) -> Result<()> {
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

    /// Makes sure the batch's topics exist, creating missing ones when
    /// configured to (each topic on its own: one that cannot be created
    /// holds only its own rows). Returns the topics that are not available,
    /// with why.
    async fn ensure_topics(&mut self, rows: &[Row]) -> std::collections::HashMap<String, Error> {
        let mut unavailable = std::collections::HashMap::new();
        let Some(spec) = &self.config.create_topics else {
            return unavailable;
        };
        let missing: BTreeSet<String> = rows
            .iter()
            .filter(|r| !self.known_topics.contains(&r.topic))
            .filter(|r| crate::names::validate_topic_name(&r.topic).is_ok())
            .map(|r| r.topic.clone())
            .collect();
        if missing.is_empty() {
            return unavailable;
        }
        for (topic, outcome) in ensure_topics_each(&self.config.kafka, &missing, spec).await {
            match outcome {
                Ok(()) => {
                    self.known_topics.insert(topic);
                }
                Err(error) => {
                    tracing::warn!(topic, %error, "relay: a topic is not available; its rows wait");
                    unavailable.insert(topic, error);
                }
            }
        }
        unavailable
    }
}

/// Waits for a notification, then takes every one already received: one
/// wake per burst, whatever the number of commits.
async fn wait_notification(listener: &mut Option<PgListener>) -> bool {
    use futures::FutureExt;
    match listener {
        Some(l) => match l.recv().await {
            Ok(_) => {
                while let Some(Ok(Some(_))) = l.try_recv().now_or_never() {}
                true
            }
            Err(_) => {
                *listener = None;
                false
            }
        },
        None => std::future::pending().await,
    }
}
