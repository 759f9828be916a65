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
//!   order, waits for every delivery report and deletes exactly the rows
//!   acknowledged, keeping a failed row *and every later row of its
//!   aggregate*, which are retried after a backoff in the same order. Under
//!   load the next batch (which leaves out the rows in flight) is read and
//!   enqueued while the previous one awaits its reports; a failure in either
//!   keeps the failed aggregate's rows of both, and the idempotent producer's
//!   gapless guarantee stops delivery after a failed message of a partition
//!   (message timeouts are outside that setting; for them the producer's
//!   per-partition sequence numbers keep the broker from accepting a later
//!   message without the earlier ones). Consumers that skip events at or
//!   below the last sequence applied, as tidings projections do, see each
//!   aggregate in order even when rows are published twice.
//! - **Late commits are never skipped.** There is no cursor: every poll reads
//!   whatever rows are in the outbox now, so a row with a lower id that
//!   becomes visible after higher ones is simply published on the next poll.
//!   This is safe for ordering because, within one aggregate, a row only
//!   becomes visible after all lower sequences of that aggregate committed
//!   (the store's unique stream key makes a concurrent writer wait for and
//!   then fail on the earlier transaction), and its id is higher.
//!
//! Duplicates can also arise when a relay loses its lock session while it
//! still has a batch in flight; each publisher's stream is still in order,
//! so dedupe by (aggregate, sequence) on the consumer side restores exactly
//! once.
//!
//! # Latency
//!
//! The store's outbox trigger issues one `NOTIFY tidings_outbox` per
//! inserting statement (not per row); the relay `LISTEN`s and wakes at once,
//! and polls every [`RelayConfig::poll_interval`] as a fallback. Under load it
//! takes full batches and does not wait.

mod lanes;

use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;

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
    headers: sqlx::types::Json<std::collections::BTreeMap<String, String>>,
    envelope: String,
}

/// A relay: claims outbox rows by lane, publishes them, deletes what the
/// broker acknowledged. Run it with [`Relay::run`].
pub struct Relay {
    pool: PgPool,
    config: RelayConfig,
    producer: FutureProducer,
    lanes: Lanes,
    known_topics: HashSet<String>,
    stats: Arc<RelayStats>,
    /// The batch handed to the producer and not settled yet.
    in_flight: Option<InFlight>,
    /// Aggregates with a failed delivery in the batches being settled.
    blocked: HashSet<(String, String)>,
}

/// A batch handed to the producer, awaiting its delivery reports.
struct InFlight {
    rows: Vec<Row>,
    deliveries: Vec<Pending>,
    started: Instant,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .field("lanes", &self.lanes.owned())
            .finish_non_exhaustive()
    }
}

fn producer(config: &RelayConfig) -> Result<FutureProducer> {
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
    client.create().map_err(|source| Error::Kafka {
        context: "creating the relay's producer".into(),
        source,
    })
}

impl Relay {
    /// A relay on `pool` (which must have the tidings migrations).
    pub fn new(pool: PgPool, config: RelayConfig) -> Result<Self> {
        let producer = producer(&config)?;
        let lanes = Lanes::new((*pool.connect_options()).clone());
        Ok(Relay {
            pool,
            config,
            producer,
            lanes,
            known_topics: HashSet::new(),
            stats: Arc::new(RelayStats::default()),
            in_flight: None,
            blocked: HashSet::new(),
        })
    }

    /// The relay's counters, shared: they keep counting after `run` starts.
    pub fn stats(&self) -> Arc<RelayStats> {
        Arc::clone(&self.stats)
    }

    /// Runs until `shutdown` completes, then finishes the batch in flight
    /// (waits for its delivery reports and deletes what was acknowledged),
    /// releases its lanes and returns. Database and broker failures are
    /// retried with backoff and reported through `tracing`; only
    /// configuration errors end the relay early.
    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let (stop_tx, mut stop) = watch::channel(false);
        let shutdown = async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        };
        tokio::pin!(shutdown);

        let mut listener: Option<PgListener> = None;
        let mut last_rebalance: Option<Instant> = None;
        let mut failures: u32 = 0;
        loop {
            // Between batches, see whether shutdown was asked for (a batch
            // in progress is never cancelled half-way).
            if !*stop.borrow() {
                let _ = futures::FutureExt::now_or_never(shutdown.as_mut());
            }
            if *stop.borrow() {
                break;
            }
            // Own lanes.
            if last_rebalance.is_none_or(|t| t.elapsed() >= self.config.rebalance_interval) {
                // Lanes change hands only with nothing in flight.
                if let Some(batch) = self.in_flight.take() {
                    match self.settle(batch).await {
                        Ok(0) => {}
                        Ok(_) => failures += 1,
                        Err(e) => {
                            failures += 1;
                            self.report(&e, failures);
                        }
                    }
                    self.blocked.clear();
                }
                match self.lanes.rebalance().await {
                    Ok(()) => {
                        last_rebalance = Some(Instant::now());
                        self.stats
                            .lanes
                            .store(self.lanes.owned().len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failures += 1;
                        self.report(&e, failures);
                        self.pause(failures, &mut stop, &mut shutdown).await;
                        continue;
                    }
                }
            }
            if listener.is_none() {
                listener = self.listen().await;
            }

            let result = tracing::Instrument::instrument(
                self.relay_batch(),
                tracing::debug_span!("tidings.relay.batch"),
            )
            .await;
            match result {
                Ok(outcome) => {
                    if outcome.failed > 0 {
                        failures += 1;
                        self.pause(failures, &mut stop, &mut shutdown).await;
                    } else {
                        failures = 0;
                    }
                    if outcome.rows < self.config.batch_size as usize && outcome.failed == 0 {
                        // Idle: wait for a commit, the poll interval, or shutdown.
                        let poll = self
                            .config
                            .poll_interval
                            .min(self.config.rebalance_interval);
                        tokio::select! {
                            () = &mut shutdown => {}
                            notified = wait_notification(&mut listener) => {
                                if !notified { tokio::time::sleep(Duration::from_millis(50)).await; }
                            }
                            () = tokio::time::sleep(poll) => {}
                        }
                    }
                }
                Err(e) => {
                    failures += 1;
                    self.report(&e, failures);
                    if let Error::Config(_) = e {
                        self.finish().await;
                        return Err(e);
                    }
                    listener = None;
                    self.pause(failures, &mut stop, &mut shutdown).await;
                }
            }
        }
        self.finish().await;
        Ok(())
    }

    async fn finish(&mut self) {
        if let Some(batch) = self.in_flight.take()
            && let Err(error) = self.settle(batch).await
        {
            tracing::warn!(%error, "relay: settling the last batch; its rows will be published again");
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

    async fn pause(
        &self,
        failures: u32,
        stop: &mut watch::Receiver<bool>,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) {
        let base = Duration::from_millis(100).saturating_mul(1 << failures.min(10));
        let delay = base
            .min(self.config.max_backoff)
            .mul_f64(0.5 + fastrand::f64() / 2.0);
        if *stop.borrow() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.as_mut() => {}
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        let mut listener = PgListener::connect_with(&self.pool).await.ok()?;
        listener.listen(OUTBOX_CHANNEL).await.ok()?;
        Some(listener)
    }

    /// One step: reads the next batch of the owned lanes in id order
    /// (leaving out the batch in flight), enqueues it, then settles the
    /// batch that was in flight. Under load one batch stays in flight while
    /// the next is read and enqueued (the producer keeps their order); a
    /// batch that is not full, or any failure, settles everything at once.
    async fn relay_batch(&mut self) -> Result<BatchOutcome> {
        let lanes = self.lanes.owned();
        let rows: Vec<Row> = if lanes.is_empty() {
            Vec::new()
        } else {
            let in_flight: Vec<i64> = self
                .in_flight
                .as_ref()
                .map(|b| b.rows.iter().map(|r| r.id).collect())
                .unwrap_or_default();
            sqlx::query_as(
                "SELECT id, topic, message_key, aggregate_type, aggregate_id, headers, envelope \
                 FROM tidings_outbox WHERE lane = ANY($1) AND NOT (id = ANY($3)) ORDER BY id LIMIT $2",
            )
            .bind(&lanes)
            .bind(self.config.batch_size)
            .bind(&in_flight)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::db("reading the outbox"))?
        };
        let fetched = rows.len();
        let full = fetched as i64 == self.config.batch_size;
        if !rows.is_empty() {
            self.ensure_topics(&rows).await?;
        }
        let previous = self.in_flight.take();
        if !rows.is_empty() {
            self.in_flight = Some(self.enqueue(rows).await);
        }
        let mut failed = 0;
        if let Some(previous) = previous {
            failed += self.settle(previous).await?;
        }
        if (!full || failed > 0)
            && let Some(batch) = self.in_flight.take()
        {
            failed += self.settle(batch).await?;
        }
        if self.in_flight.is_none() {
            self.blocked.clear();
        }
        if failed > 0
            && let Some((code, reason)) = self.producer.client().fatal_error()
        {
            tracing::warn!(
                ?code,
                reason,
                "relay: the producer stopped on a fatal error; starting a fresh one"
            );
            self.producer = producer(&self.config)?;
        }
        Ok(BatchOutcome {
            rows: fetched,
            failed,
        })
    }

    /// Hands rows to the producer in id order; a full producer queue is
    /// waited out, never skipped.
    async fn enqueue(&self, rows: Vec<Row>) -> InFlight {
        let started = Instant::now();
        let mut deliveries = Vec::with_capacity(rows.len());
        let mut refused: HashSet<(&str, &str)> = HashSet::new();
        for row in &rows {
            let stream = (row.aggregate_type.as_str(), row.aggregate_id.as_str());
            if refused.contains(&stream)
                || self
                    .blocked
                    .contains(&(stream.0.to_owned(), stream.1.to_owned()))
            {
                deliveries.push(Pending::Held);
                continue;
            }
            let mut headers = OwnedHeaders::new_with_capacity(row.headers.len());
            for (key, value) in row.headers.iter() {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
            let mut record = FutureRecord::to(&row.topic)
                .key(row.message_key.as_str())
                .payload(row.envelope.as_str())
                .headers(headers);
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push(Pending::Sent(delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((error, _)) => {
                        deliveries.push(Pending::Refused(error));
                        refused.insert(stream);
                        break;
                    }
                }
            }
        }
        InFlight {
            rows,
            deliveries,
            started,
        }
    }

    /// Waits for every report of a batch, then deletes the acknowledged rows,
    /// keeping each failed row and every later row of its aggregate, in this
    /// batch and in the one after it. Returns the number of failed deliveries.
    async fn settle(&mut self, batch: InFlight) -> Result<usize> {
        let reports =
            futures::future::join_all(batch.deliveries.into_iter().map(Pending::report)).await;
        let mut acknowledged = Vec::with_capacity(batch.rows.len());
        let mut failed = 0usize;
        for (row, report) in batch.rows.iter().zip(reports) {
            let stream = (row.aggregate_type.clone(), row.aggregate_id.clone());
            if report.is_ok() && !self.blocked.contains(&stream) {
                acknowledged.push(row.id);
            } else {
                if let Err(why) = report {
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
                self.blocked.insert(stream);
            }
        }
        if !acknowledged.is_empty() {
            delete_rows(&self.pool, &acknowledged).await?;
        }
        self.stats
            .published
            .fetch_add(acknowledged.len() as u64, Ordering::Relaxed);
        self.stats
            .failed
            .fetch_add(failed as u64, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats
            .batch_rows
            .fetch_add(batch.rows.len() as u64, Ordering::Relaxed);
        self.stats.batch_micros.fetch_add(
            batch.started.elapsed().as_micros() as u64,
            Ordering::Relaxed,
        );
        Ok(failed)
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

/// A message handed to the producer, or refused at once.
enum Pending {
    Sent(rdkafka::producer::DeliveryFuture),
    Refused(KafkaError),
    /// Not handed to the producer: an earlier row of its aggregate was refused.
    Held,
}

impl Pending {
    async fn report(self) -> std::result::Result<(), String> {
        match self {
            Pending::Sent(delivery) => match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((error, _))) => Err(error.to_string()),
                Err(_) => Err("the producer dropped the delivery report".into()),
            },
            Pending::Refused(error) => Err(error.to_string()),
            Pending::Held => Err("held behind a refused row of its aggregate".into()),
        }
    }
}

#[derive(Debug, Default)]
struct BatchOutcome {
    rows: usize,
    failed: usize,
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
