//! The outbox relay: PostgreSQL → Kafka.
//!
//! # Guarantees
//!
//! - **Nothing lost.** A row leaves the outbox only after the broker
//!   acknowledged it (idempotent producer, `acks=all`). A relay killed at any
//!   instant leaves its unacknowledged rows in the outbox for the next one.
//! - **At least once.** A crash between the acknowledgement and the delete
//!   publishes those rows again: consumers dedupe (tidings projections do).
//! - **In order per aggregate**, with any number of relays. The claim scheme:
//!   *claim by lane, delete after acknowledgement.* Each aggregate hashes to
//!   one of [`crate::store::OUTBOX_LANES`] lanes; a relay owns a lane through
//!   a PostgreSQL session advisory lock (released by the server if the relay
//!   dies), so one aggregate is published by one relay at a time. The relay
//!   reads the visible rows of its lanes in id order, produces them in that
//!   order, and deletes exactly the rows acknowledged, keeping a failed row
//!   *and every later row of its aggregate*, which are retried after a
//!   backoff in the same order.
//! - **Late commits are never skipped.** There is no cursor: every read takes
//!   whatever rows are in the outbox now, leaving out only the rows this
//!   relay has in flight, so a row with a lower id that becomes visible after
//!   higher ones is simply published by the next read. This is safe for
//!   ordering because, within one aggregate, a row only becomes visible after
//!   all lower sequences of that aggregate committed (the store's unique
//!   stream key makes a concurrent writer wait for and then fail on the
//!   earlier transaction), and its id is higher.
//!
//! # Pipeline
//!
//! Up to [`RelayConfig::pipeline_depth`] batches are in flight at once: the
//! relay reads and enqueues the next batch (leaving out the rows in flight)
//! while earlier ones await their delivery reports, and deletes acknowledged
//! batches in the background. The producer keeps the order of everything
//! enqueued, and the idempotent producer's gapless guarantee stops delivery
//! after a failed message of a partition (message timeouts are outside that
//! setting; for them the producer's per-partition sequence numbers keep the
//! broker from accepting a later message without the earlier ones). A failed
//! or refused row blocks its aggregate in every batch in flight; the relay
//! then stops reading, settles the whole pipeline, backs off and starts again
//! from the failed row. Deletes run with `synchronous_commit = off`: a delete
//! lost in a server crash only publishes those rows again.
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

mod lanes;

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::envelope::{
    HEADER_AGGREGATE_TYPE, HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_EVENT_VERSION,
};
use crate::error::{Error, Result};
use crate::kafka::{KafkaConfig, TopicSpec, ensure_topics};
use lanes::Lanes;

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
    /// How long one message may take to be acknowledged before it counts
    /// as failed and is retried (librdkafka `message.timeout.ms`, default 30 s).
    pub delivery_timeout: Duration,
    /// How often lanes are rebalanced between relays (default 1 s).
    pub rebalance_interval: Duration,
    /// The longest backoff after errors (default 30 s).
    pub max_backoff: Duration,
    /// Create missing topics with this spec; `None` leaves topics alone.
    pub create_topics: Option<TopicSpec>,
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

    /// Sets [`RelayConfig::delivery_timeout`].
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout;
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
}

/// Counters of a running relay, readable while it runs.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Rows acknowledged by the broker and deleted.
    pub published: AtomicU64,
    /// Deliveries that failed (and were kept for retry).
    pub failed: AtomicU64,
    /// Batches handled.
    pub batches: AtomicU64,
    /// Errors of the database or the broker that made the relay back off.
    pub errors: AtomicU64,
    /// Lanes owned now.
    pub lanes: AtomicU64,
    /// Rows read in batches (with `batches`, the mean batch size).
    pub batch_rows: AtomicU64,
    /// Microseconds from reading batches to deleting them (with `batches`,
    /// the mean batch latency).
    pub batch_micros: AtomicU64,
}

/// One outbox row, as the relay reads it.
#[derive(Debug, sqlx::FromRow)]
struct Row {
    id: i64,
    topic: String,
    message_key: String,
    aggregate_type: String,
    aggregate_id: String,
    event_id: uuid::Uuid,
    event_type: Option<String>,
    event_version: Option<i32>,
    /// Only on rows written before the header columns existed.
    headers: Option<sqlx::types::Json<std::collections::BTreeMap<String, String>>>,
    envelope: String,
}

impl Row {
    fn stream(&self) -> Stream {
        (self.aggregate_type.clone(), self.aggregate_id.clone())
    }

    /// The message headers: the routing fields of the envelope.
    fn headers(&self) -> OwnedHeaders {
        let mut headers = OwnedHeaders::new_with_capacity(4);
        if let (Some(event_type), Some(version)) = (&self.event_type, self.event_version) {
            let version = version.to_string();
            let id = self.event_id.hyphenated().to_string();
            for (key, value) in [
                (HEADER_EVENT_TYPE, event_type.as_str()),
                (HEADER_EVENT_VERSION, version.as_str()),
                (HEADER_EVENT_ID, id.as_str()),
                (HEADER_AGGREGATE_TYPE, self.aggregate_type.as_str()),
            ] {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
        } else if let Some(stored) = &self.headers {
            for (key, value) in stored.iter() {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
        }
        headers
    }
}

/// An aggregate, as the relay tracks failures.
type Stream = (String, String);

/// A batch's delivery reports, by row: `None` when acknowledged, else why not.
type Reports = Vec<Option<String>>;

/// Collects delivery reports per batch. librdkafka calls back once per
/// message with the message's ticket (batch start + row index); the batch's
/// owner gets all its reports at once, when the last one arrives.
#[derive(Default)]
struct Tracker {
    batches: std::sync::Mutex<std::collections::BTreeMap<usize, Progress>>,
}

struct Progress {
    reports: Reports,
    pending: usize,
    done: Option<oneshot::Sender<Reports>>,
}

impl Tracker {
    /// Registers a batch of `len` messages whose tickets start at `first`.
    fn register(&self, first: usize, len: usize) -> oneshot::Receiver<Reports> {
        let (done, receiver) = oneshot::channel();
        let progress = Progress {
            reports: vec![None; len],
            pending: len,
            done: Some(done),
        };
        self.lock().insert(first, progress);
        receiver
    }

    /// Records one message's outcome.
    fn complete(&self, ticket: usize, outcome: std::result::Result<(), String>) {
        let mut batches = self.lock();
        let Some((&first, progress)) = batches.range_mut(..=ticket).next_back() else {
            return;
        };
        let Some(slot) = progress.reports.get_mut(ticket - first) else {
            return;
        };
        *slot = outcome.err();
        progress.pending -= 1;
        if progress.pending == 0
            && let Some(progress) = batches.remove(&first)
            && let Some(done) = progress.done
        {
            let _ = done.send(progress.reports);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<usize, Progress>> {
        self.batches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The relay producer's context: delivery reports go to the tracker.
struct RelayContext {
    tracker: Arc<Tracker>,
}

impl ClientContext for RelayContext {}

impl ProducerContext for RelayContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: usize) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((error, _)) => Err(error.to_string()),
        };
        self.tracker.complete(ticket, outcome);
    }
}

type RelayProducer = ThreadedProducer<RelayContext>;

/// A relay: claims outbox rows by lane, publishes them, deletes what the
/// broker acknowledged. Run it with [`Relay::run`].
pub struct Relay {
    pool: PgPool,
    /// Connections for deletes, with `synchronous_commit = off`.
    deleter: PgPool,
    config: RelayConfig,
    producer: RelayProducer,
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
}

/// A batch handed to the producer, awaiting its delivery reports.
struct InFlight {
    rows: Vec<Row>,
    reports: oneshot::Receiver<Reports>,
    started: Instant,
}

impl InFlight {
    /// Waits for every report of the batch.
    async fn reports(&mut self) -> Reports {
        match (&mut self.reports).await {
            Ok(reports) => reports,
            Err(_) => {
                vec![Some("the producer dropped the delivery reports".into()); self.rows.len()]
            }
        }
    }
}

/// Acknowledged rows being deleted (they stay out of reads until the
/// delete is collected).
struct Deleting {
    ids: Vec<i64>,
    task: JoinHandle<Result<()>>,
}

/// Adds a settled batch's time from read to delete to the stats.
fn record_latency(stats: &RelayStats, started: Instant) {
    stats
        .batch_micros
        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
}

/// What the relay does next.
enum Step {
    /// Read and enqueue a batch.
    Read,
    /// The oldest batch's delivery reports arrived.
    Settle(Reports),
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

fn producer(config: &RelayConfig, tracker: &Arc<Tracker>) -> Result<RelayProducer> {
    for key in ["enable.idempotence", "acks"] {
        if let Some(value) = config.kafka.properties.get(key) {
            let ok = match key {
                "enable.idempotence" => value == "true",
                _ => value == "all" || value == "-1",
            };
            if !ok {
                return Err(Error::Config(format!(
                    "the relay requires {key}={}: it cannot be set to `{value}`",
                    if key == "acks" { "all" } else { "true" }
                )));
            }
        }
    }
    let mut client = config.kafka.client_config()?;
    client
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // A failure that could leave a gap (a later message of the partition
        // delivered after an earlier one failed) stops the producer instead;
        // the relay then starts a fresh one and retries from the failed row.
        .set("enable.gapless.guarantee", "true")
        .set(
            "message.timeout.ms",
            config.delivery_timeout.as_millis().to_string(),
        );
    if !config.kafka.properties.contains_key("linger.ms") {
        client.set("linger.ms", "5");
    }
    client
        .create_with_context(RelayContext {
            tracker: Arc::clone(tracker),
        })
        .map_err(|source| Error::Kafka {
            context: "creating the relay's producer".into(),
            source,
        })
}

/// The ids as an `int8multirange` literal: `{[1,5001),[5003,5004)}`.
fn multirange(ids: &mut [i64]) -> String {
    ids.sort_unstable();
    let mut text = String::from("{");
    let mut i = 0;
    while i < ids.len() {
        let start = ids[i];
        let mut end = start;
        while i + 1 < ids.len() && ids[i + 1] <= end + 1 {
            i += 1;
            end = ids[i];
        }
        i += 1;
        if text.len() > 1 {
            text.push(',');
        }
        let _ = write!(text, "[{start},{})", end + 1);
    }
    text.push('}');
    text
}

impl Relay {
    /// A relay on `pool` (which must have the tidings migrations).
    pub fn new(pool: PgPool, config: RelayConfig) -> Result<Self> {
        let tracker = Arc::new(Tracker::default());
        let producer = producer(&config, &tracker)?;
        let options = (*pool.connect_options()).clone();
        let lanes = Lanes::new(options.clone());
        let deleter = PgPoolOptions::new()
            .max_connections(2)
            .connect_lazy_with(options.options([("synchronous_commit", "off")]));
        Ok(Relay {
            pool,
            deleter,
            config,
            producer,
            tracker,
            next_ticket: 0,
            lanes,
            known_topics: HashSet::new(),
            stats: Arc::new(RelayStats::default()),
            in_flight: VecDeque::new(),
            deleting: VecDeque::new(),
            prefetch: None,
            blocked: HashSet::new(),
        })
    }

    /// The relay's counters, shared: they keep counting after `run` starts.
    pub fn stats(&self) -> Arc<RelayStats> {
        Arc::clone(&self.stats)
    }

    /// Runs until `shutdown` completes, then settles the batches in flight
    /// (waits for their delivery reports and deletes what was acknowledged),
    /// releases its lanes and returns. Database and broker failures are
    /// retried with backoff and reported through `tracing`; only
    /// configuration errors end the relay early.
    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let mut stopping = false;
        tokio::pin!(shutdown);

        let mut listener: Option<PgListener> = None;
        let mut last_rebalance: Option<Instant> = None;
        let mut failures: u32 = 0;
        // Read without waiting for a notification: at the start, after a
        // full batch, when lanes were taken and after a backoff.
        let mut more = true;
        loop {
            if !stopping && futures::FutureExt::now_or_never(shutdown.as_mut()).is_some() {
                stopping = true;
            }
            if stopping {
                break;
            }
            if let Err(e) = self.reap_deletes(false).await {
                failures += 1;
                self.report(&e, failures);
            }
            // Own lanes.
            if last_rebalance.is_none_or(|t| t.elapsed() >= self.config.rebalance_interval) {
                match self.rebalance().await {
                    Ok(changed) => {
                        last_rebalance = Some(Instant::now());
                        more |= changed;
                    }
                    Err(e) => {
                        failures += 1;
                        self.report(&e, failures);
                        stopping |= self.pause(failures, &mut shutdown).await;
                        continue;
                    }
                }
            }
            if listener.is_none() {
                listener = self.listen().await;
            }

            let can_read =
                self.in_flight.len() < self.config.pipeline_depth && !self.lanes.is_empty();
            let next_rebalance = last_rebalance
                .map_or(Duration::ZERO, |t| {
                    self.config.rebalance_interval.saturating_sub(t.elapsed())
                })
                .max(Duration::from_millis(1));
            let poll = self.config.poll_interval;
            let step = {
                let front = self.in_flight.front_mut();
                tokio::select! {
                    biased;
                    reports = async {
                        match front {
                            Some(batch) => batch.reports().await,
                            None => std::future::pending().await,
                        }
                    } => Step::Settle(reports),
                    () = std::future::ready(()), if can_read && more => Step::Read,
                    () = shutdown.as_mut() => {
                        stopping = true;
                        Step::Idle
                    }
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
                Step::Read => tracing::Instrument::instrument(
                    self.read_and_enqueue(),
                    tracing::debug_span!("tidings.relay.batch"),
                )
                .await
                .map(|full| {
                    more = full;
                    0
                }),
                Step::Settle(reports) => {
                    let batch = self.in_flight.pop_front().expect("the front batch settled");
                    self.settle(batch, reports).await
                }
            };
            match result {
                Ok(0) => {
                    if self.in_flight.is_empty() {
                        self.blocked.clear();
                        failures = 0;
                    }
                }
                Ok(_failed) => {
                    // Start again from the failed rows, in order: settle
                    // everything in flight, then back off.
                    failures += 1;
                    if let Err(e) = self.drain().await {
                        self.report(&e, failures);
                    }
                    if let Err(e) = self.renew_producer_if_fatal() {
                        self.finish().await;
                        return Err(e);
                    }
                    stopping |= self.pause(failures, &mut shutdown).await;
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
                    stopping |= self.pause(failures, &mut shutdown).await;
                    more = true;
                }
            }
        }
        self.finish().await;
        Ok(())
    }

    /// Takes lanes up to the fair share; giving lanes back first settles
    /// everything in flight, so that no row of a lane another relay may
    /// take is still on its way. Returns whether the lanes changed.
    async fn rebalance(&mut self) -> Result<bool> {
        let before = self.lanes.owned();
        let idle = self.in_flight.is_empty() && self.deleting.is_empty();
        let mut result = self.lanes.rebalance(idle).await;
        if let Ok(true) = result {
            self.drain().await?;
            result = self.lanes.rebalance(true).await;
        }
        let changed = self.lanes.owned() != before;
        if changed {
            self.drop_prefetch();
        }
        self.stats
            .lanes
            .store(self.lanes.owned().len() as u64, Ordering::Relaxed);
        result.map(|_| changed)
    }

    fn drop_prefetch(&mut self) {
        if let Some(task) = self.prefetch.take() {
            task.abort();
        }
    }

    /// Settles every batch in flight and waits for every delete.
    async fn drain(&mut self) -> Result<()> {
        self.drop_prefetch();
        let mut outcome = Ok(());
        while let Some(mut batch) = self.in_flight.pop_front() {
            let reports = batch.reports().await;
            if let Err(e) = self.settle(batch, reports).await {
                outcome = Err(e);
            }
        }
        self.blocked.clear();
        if let Err(e) = self.reap_deletes(true).await {
            outcome = Err(e);
        }
        outcome
    }

    async fn finish(&mut self) {
        if let Err(error) = self.drain().await {
            tracing::warn!(%error, "relay: settling the last batches; their rows will be published again");
        }
        let _ = self.producer.flush(Duration::from_secs(10));
        self.lanes.release().await;
        tracing::info!(
            published = self.stats.published.load(Ordering::Relaxed),
            "relay stopped"
        );
    }

    fn report(&self, error: &Error, failures: u32) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%error, failures, "relay: retrying after an error");
    }

    /// Backs off; true when shutdown was asked for meanwhile.
    async fn pause(
        &mut self,
        failures: u32,
        shutdown: &mut Pin<&mut impl Future<Output = ()>>,
    ) -> bool {
        let base = Duration::from_millis(100).saturating_mul(1 << failures.min(10));
        let delay = base
            .min(self.config.max_backoff)
            .mul_f64(0.5 + fastrand::f64() / 2.0);
        tokio::select! {
            () = tokio::time::sleep(delay) => false,
            () = shutdown.as_mut() => true,
        }
    }

    async fn listen(&mut self) -> Option<PgListener> {
        let mut listener = PgListener::connect_with(&self.pool).await.ok()?;
        listener.listen(OUTBOX_CHANNEL).await.ok()?;
        Some(listener)
    }

    fn renew_producer_if_fatal(&mut self) -> Result<()> {
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            tracing::warn!(
                ?code,
                reason,
                "relay: the producer stopped on a fatal error; starting a fresh one"
            );
            self.producer = producer(&self.config, &self.tracker)?;
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
        let rows = match self.prefetch.take() {
            Some(task) => joined(task, "reading the outbox").await?,
            None => read_rows(self.pool.clone(), lanes.clone(), size, self.busy(&[])).await?,
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
        if !rows.is_empty() {
            self.ensure_topics(&rows).await?;
            let batch = self.enqueue(rows).await;
            self.in_flight.push_back(batch);
        }
        Ok(full)
    }

    /// Hands rows to the producer in id order; a full producer queue is
    /// waited out, never skipped. A refused row blocks its aggregate.
    async fn enqueue(&mut self, rows: Vec<Row>) -> InFlight {
        let started = Instant::now();
        let first = self.next_ticket;
        self.next_ticket = self.next_ticket.wrapping_add(rows.len());
        let reports = self.tracker.register(first, rows.len());
        for (index, row) in rows.iter().enumerate() {
            let ticket = first + index;
            if !self.blocked.is_empty() && self.blocked.contains(&row.stream()) {
                self.tracker.complete(
                    ticket,
                    Err("held behind a refused or failed row of its aggregate".into()),
                );
                continue;
            }
            let mut record = BaseRecord::with_opaque_to(&row.topic, ticket)
                .key(row.message_key.as_str())
                .payload(row.envelope.as_str())
                .headers(row.headers());
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((error, _)) => {
                        self.tracker.complete(ticket, Err(error.to_string()));
                        self.blocked.insert(row.stream());
                        break;
                    }
                }
            }
        }
        InFlight {
            rows,
            reports,
            started,
        }
    }

    /// Takes a batch's delivery reports: deletes the acknowledged rows in
    /// the background, keeping each failed row and every later row of its
    /// aggregate, in this batch and those after it. Returns the number of
    /// failed deliveries.
    async fn settle(&mut self, batch: InFlight, reports: Reports) -> Result<usize> {
        let mut acknowledged = Vec::with_capacity(batch.rows.len());
        let mut failed = 0usize;
        for (row, report) in batch.rows.iter().zip(reports) {
            if report.is_none()
                && (self.blocked.is_empty() || !self.blocked.contains(&row.stream()))
            {
                acknowledged.push(row.id);
            } else {
                if let Some(why) = report {
                    failed += 1;
                    if failed == 1 {
                        tracing::warn!(
                            topic = row.topic,
                            aggregate = format!("{}/{}", row.aggregate_type, row.aggregate_id),
                            error = why,
                            "relay: delivery failed; keeping the row and the rest of its aggregate"
                        );
                    }
                }
                self.blocked.insert(row.stream());
            }
        }
        self.stats
            .failed
            .fetch_add(failed as u64, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats
            .batch_rows
            .fetch_add(batch.rows.len() as u64, Ordering::Relaxed);
        if !acknowledged.is_empty() {
            // At most two deletes at a time: wait for the oldest first.
            if self.deleting.len() >= 2 {
                let oldest = self.deleting.pop_front().expect("two deletes");
                self.finish_delete(oldest).await?;
            }
            let pool = self.deleter.clone();
            let ids = acknowledged.clone();
            let stats = Arc::clone(&self.stats);
            let started = batch.started;
            self.deleting.push_back(Deleting {
                ids: acknowledged,
                task: tokio::spawn(async move {
                    delete_rows(&pool, &ids).await?;
                    stats
                        .published
                        .fetch_add(ids.len() as u64, Ordering::Relaxed);
                    record_latency(&stats, started);
                    Ok(())
                }),
            });
        } else {
            record_latency(&self.stats, batch.started);
        }
        Ok(failed)
    }

    /// Collects finished deletes (all of them with `wait`).
    async fn reap_deletes(&mut self, wait: bool) -> Result<()> {
        let mut outcome = Ok(());
        while let Some(front) = self.deleting.front() {
            if !wait && !front.task.is_finished() {
                break;
            }
            let done = self.deleting.pop_front().expect("a front delete");
            if let Err(e) = self.finish_delete(done).await {
                outcome = Err(e);
            }
        }
        outcome
    }

    async fn finish_delete(&mut self, delete: Deleting) -> Result<()> {
        joined(delete.task, "deleting published outbox rows").await
    }

    async fn ensure_topics(&mut self, rows: &[Row]) -> Result<()> {
        let Some(spec) = &self.config.create_topics else {
            return Ok(());
        };
        let missing: BTreeSet<String> = rows
            .iter()
            .filter(|r| !self.known_topics.contains(&r.topic))
            .map(|r| r.topic.clone())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        ensure_topics(&self.config.kafka, &missing, spec).await?;
        self.known_topics.extend(missing);
        Ok(())
    }
}

/// The result of a background database task; a task that panicked is a
/// database error of `what`.
async fn joined<T>(task: JoinHandle<Result<T>>, what: &str) -> Result<T> {
    task.await.unwrap_or_else(|e| {
        Err(Error::db(what)(sqlx::Error::Protocol(format!(
            "the task failed: {e}"
        ))))
    })
}

/// Reads up to `size` rows of `lanes` in id order, leaving out `busy` (an
/// `int8multirange`, cast once per statement).
async fn read_rows(pool: PgPool, lanes: Vec<i32>, size: i64, busy: String) -> Result<Vec<Row>> {
    sqlx::query_as(
        "SELECT id, topic, message_key, aggregate_type, aggregate_id, event_id, event_type, \
         event_version, headers, envelope \
         FROM tidings_outbox WHERE lane = ANY($1) AND NOT ((SELECT $3::int8multirange) @> id) \
         ORDER BY id LIMIT $2",
    )
    .bind(&lanes)
    .bind(size)
    .bind(busy)
    .fetch_all(&pool)
    .await
    .map_err(Error::db("reading the outbox"))
}

/// Deletes acknowledged rows. A failure here only means the rows will be
/// published again (at least once), never lost.
async fn delete_rows(pool: &PgPool, ids: &[i64]) -> Result<()> {
    let mut attempt = 0u32;
    loop {
        match sqlx::query("DELETE FROM tidings_outbox WHERE id = ANY($1)")
            .bind(ids)
            .execute(pool)
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if attempt < 5 => {
                tracing::warn!(error = %e, "relay: deleting published rows failed; retrying");
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            Err(e) => return Err(Error::db("deleting published outbox rows")(e)),
        }
    }
}

async fn wait_notification(listener: &mut Option<PgListener>) -> bool {
    match listener {
        Some(l) => match l.recv().await {
            Ok(_) => {
                // Drain what else is queued: one wake per burst.
                while l.next_buffered().is_some() {}
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

#[cfg(test)]
mod tests {
    use super::multirange;

    #[test]
    fn multirange_compresses_runs() {
        assert_eq!(multirange(&mut []), "{}");
        assert_eq!(multirange(&mut [5]), "{[5,6)}");
        assert_eq!(
            multirange(&mut [7, 1, 2, 3, 9, 8, 12]),
            "{[1,4),[7,10),[12,13)}"
        );
        assert_eq!(multirange(&mut [4, 4, 5]), "{[4,6)}");
    }
}
