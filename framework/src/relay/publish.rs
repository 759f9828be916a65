//! Publishing: the relay's producer, and the delivery reports of each batch.
//!
//! # Guarantees
//!
//! - **Idempotent, in order, no gap.** The producer runs with
//!   `enable.idempotence=true`, `acks=all` and `enable.gapless.guarantee`:
//!   a failure that could leave a gap stops the producer instead, and the
//!   relay replaces it and retries from the first row not acknowledged.
//! - **No librdkafka message timeout.** `message.timeout.ms` is 0
//!   (infinite): librdkafka never expires a message on its own, because an
//!   expiry lets the messages queued behind it through under a bumped epoch
//!   (`… S8 … S7 S8` on the topic). The relay enforces its own
//!   [`super::RelayConfig::delivery_timeout`] instead: it purges the queue
//!   *and* the requests in flight, which removes a suffix of every
//!   partition, and starts a fresh producer.
//! - **Every message gets exactly one report**, collected per batch
//!   (tickets are contiguous ranges; one wake per batch).
//! - **A partitioner that hashes the key**: an aggregate's events all go to
//!   one partition (a `random` partitioner is refused).

use std::sync::Arc;
use std::time::Instant;

use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use tokio::sync::oneshot;

use super::RelayConfig;
use super::read::Row;
use crate::error::{Error, Result};

/// Why a message was not acknowledged.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    /// The broker or the client refuses this message for good: retrying it
    /// as it is can never succeed.
    pub(super) permanent: bool,
    /// Not sent at all: held behind an earlier failed row of its aggregate.
    pub(super) held: bool,
    pub(super) reason: String,
}

impl Failure {
    pub(super) fn transient(reason: impl Into<String>) -> Self {
        Failure {
            permanent: false,
            held: false,
            reason: reason.into(),
        }
    }

    pub(super) fn permanent(reason: impl Into<String>) -> Self {
        Failure {
            permanent: true,
            held: false,
            reason: reason.into(),
        }
    }

    fn held() -> Self {
        Failure {
            permanent: false,
            held: true,
            reason: "held behind a refused or failed row of its aggregate".into(),
        }
    }

    fn of(error: &KafkaError) -> Self {
        let code = match error {
            KafkaError::MessageProduction(code) => Some(*code),
            _ => error.rdkafka_error_code(),
        };
        let permanent = matches!(
            code,
            Some(
                RDKafkaErrorCode::MessageSizeTooLarge
                    | RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::InvalidRecord
                    | RDKafkaErrorCode::InvalidTopic
                    | RDKafkaErrorCode::InvalidMessage
                    | RDKafkaErrorCode::InvalidMessageSize
            )
        );
        Failure {
            permanent,
            held: false,
            reason: error.to_string(),
        }
    }
}

/// A batch's delivery reports, by row: `None` when acknowledged.
pub(super) type Reports = Vec<Option<Failure>>;

/// Collects delivery reports per batch. librdkafka calls back once per
/// message with the message's ticket (batch start + row index); the batch's
/// owner gets all its reports at once, when the last one arrives.
#[derive(Default)]
pub(super) struct Tracker {
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
    fn complete(&self, ticket: usize, outcome: std::result::Result<(), Failure>) {
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
pub(super) struct RelayContext {
    tracker: Arc<Tracker>,
}

impl ClientContext for RelayContext {}

impl ProducerContext for RelayContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: usize) {
        let outcome = match result {
            Ok(_) => Ok(()),
            Err((error, _)) => Err(Failure::of(error)),
        };
        self.tracker.complete(ticket, outcome);
    }
}

pub(super) type RelayProducer = ThreadedProducer<RelayContext>;

/// Properties the relay sets itself; passing them is refused rather than
/// silently overridden.
const OWNED_PROPERTIES: [&str; 4] = [
    "message.timeout.ms",
    "delivery.timeout.ms",
    "enable.gapless.guarantee",
    "max.in.flight.requests.per.connection",
];

pub(super) fn producer(config: &RelayConfig, tracker: &Arc<Tracker>) -> Result<RelayProducer> {
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
    for key in OWNED_PROPERTIES {
        if config.kafka.properties.contains_key(key) {
            return Err(Error::Config(format!(
                "the relay sets `{key}` itself (its own delivery deadline and gapless \
                 delivery keep each aggregate in order); use --delivery-timeout instead"
            )));
        }
    }
    // Every event of an aggregate must go to one partition: only
    // partitioners that hash the (never empty) key keep that.
    if let Some(partitioner) = config.kafka.properties.get("partitioner")
        && partitioner == "random"
    {
        return Err(Error::Config(format!(
            "the relay requires a partitioner that hashes the key (consistent_random, \
             murmur2_random, fnv1a_random, …): `partitioner={partitioner}` would scatter an \
             aggregate's events over partitions"
        )));
    }
    let mut client = config.kafka.client_config()?;
    client
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // A failure that could leave a gap (a later message of the partition
        // delivered after an earlier one failed) stops the producer instead;
        // the relay then starts a fresh one and retries from the failed row.
        .set("enable.gapless.guarantee", "true")
        // Never expire a message: an expiry bumps the epoch and lets the
        // messages behind it through. The relay's own deadline purges
        // whole partition suffixes instead.
        .set("message.timeout.ms", "0");
    if !config.kafka.properties.contains_key("linger.ms") {
        client.set("linger.ms", "5");
    }
    // Topics are created by the relay with their spec (or managed
    // elsewhere): a produce never creates one with the broker's defaults.
    if !config
        .kafka
        .properties
        .contains_key("allow.auto.create.topics")
    {
        client.set("allow.auto.create.topics", "false");
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

/// A batch handed to the producer, awaiting its delivery reports.
pub(super) struct InFlight {
    pub(super) rows: Vec<Row>,
    reports: oneshot::Receiver<Reports>,
    pub(super) started: Instant,
}

impl InFlight {
    /// Waits for every report of the batch.
    pub(super) async fn reports(&mut self) -> Reports {
        match (&mut self.reports).await {
            Ok(reports) => reports,
            Err(_) => {
                vec![
                    Some(Failure::transient(
                        "the producer dropped the delivery reports"
                    ));
                    self.rows.len()
                ]
            }
        }
    }
}

/// What enqueueing needs of the relay.
pub(super) struct Enqueue<'a> {
    pub(super) producer: &'a RelayProducer,
    pub(super) tracker: &'a Tracker,
    pub(super) next_ticket: &'a mut usize,
    pub(super) blocked: &'a mut std::collections::HashSet<super::read::Stream>,
}

impl Enqueue<'_> {
    /// Hands rows to the producer in id order; a full producer queue is
    /// waited out, never skipped. A refused row blocks its aggregate.
    pub(super) async fn batch(self, rows: Vec<Row>) -> InFlight {
        let started = Instant::now();
        // Tickets of a batch are one contiguous range that never wraps
        // (after a wrap the old batches are long complete).
        let first = match self.next_ticket.checked_add(rows.len()) {
            Some(_) => *self.next_ticket,
            None => 0,
        };
        *self.next_ticket = first + rows.len();
        let reports = self.tracker.register(first, rows.len());
        for (index, row) in rows.iter().enumerate() {
            let ticket = first + index;
            if !self.blocked.is_empty() && self.blocked.contains(&row.stream()) {
                self.tracker.complete(ticket, Err(Failure::held()));
                continue;
            }
            let refusal = match (crate::names::validate_topic_name(&row.topic), row.headers()) {
                (Err(e), _) => Some(Failure::permanent(e.to_string())),
                (_, Err(why)) => Some(Failure::permanent(why)),
                (Ok(()), Ok(headers)) => {
                    let mut record = BaseRecord::with_opaque_to(&row.topic, ticket)
                        .key(row.message_key.as_str())
                        .payload(row.envelope.as_str())
                        .headers(headers);
                    loop {
                        match self.producer.send(record) {
                            Ok(()) => break None,
                            Err((
                                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                                back,
                            )) => {
                                record = back;
                                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                            }
                            Err((error, _)) => break Some(Failure::of(&error)),
                        }
                    }
                }
            };
            if let Some(failure) = refusal {
                self.tracker.complete(ticket, Err(failure));
                self.blocked.insert(row.stream());
            }
        }
        InFlight {
            rows,
            reports,
            started,
        }
    }
}
