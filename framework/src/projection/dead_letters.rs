//! Sending dead letters to the dead letter topic, after the batch that
//! recorded them committed.
//!
//! # Guarantees
//!
//! - **No batch waits on the broker.** A batch records its dead letters in
//!   `tidings_parked` in its own transaction; this sender copies them to the
//!   topic afterwards (the table is their outbox). A broker that is down or
//!   slow delays the copies, never the partition, a replay or a re-drive.
//! - **At least once.** A copy is marked sent only after the broker
//!   acknowledged it; a crash in between sends it again.
//! - **Bounded, and permanent errors are final.** Each send is bounded by
//!   the producer's `message.timeout.ms`. A copy the broker or the client
//!   refuses for good (too large, not authorized, invalid) records why in
//!   `dlq_error` (shown by `dlq list`/`dlq show`, counted in
//!   [`RunnerStats::dead_letter_failures`] and the status) and is not
//!   retried; the dead letter itself stays parked in PostgreSQL.
//! - **Faithful copies.** Key and headers are copied byte for byte, in
//!   order and with repeated keys, plus `tidings.dlq.*` headers naming the
//!   reason, the projection, the generation and the origin.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::error::{Error, Result};
use crate::projection::RunnerStats;
use crate::projection::dlq_headers;
use crate::projection::runner::Throttle;

/// The largest value copied to the dead letter topic; a larger one travels
/// without it (it is kept in `tidings_parked`).
const DLQ_MAX_VALUE_BYTES: usize = 900_000;

/// Dead letters read and sent per round.
const ROUND: i64 = 100;

/// A message's headers as received: in order, repeated keys kept, values
/// as bytes (`None`: a header without a value).
pub(crate) type RawHeaders = Vec<(String, Option<Vec<u8>>)>;

/// The length of [`encode_headers_into`]'s bytes for `headers`.
pub(crate) fn encoded_headers_len<'h>(
    headers: impl IntoIterator<Item = (&'h str, Option<&'h [u8]>)>,
) -> usize {
    headers
        .into_iter()
        .map(|(key, value)| 8 + key.len() + value.map_or(0, <[u8]>::len))
        .sum()
}

/// Encodes headers for `tidings_parked.raw_headers`, appending to `out`:
/// per header, the key's length (u32, big endian) and bytes, then the
/// value's length (i32, -1 for none) and bytes.
pub(crate) fn encode_headers_into<'h>(
    out: &mut Vec<u8>,
    headers: impl IntoIterator<Item = (&'h str, Option<&'h [u8]>)>,
) {
    for (key, value) in headers {
        out.extend_from_slice(&(key.len() as u32).to_be_bytes());
        out.extend_from_slice(key.as_bytes());
        match value {
            Some(v) => {
                out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                out.extend_from_slice(v);
            }
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
}

/// Decodes [`encode_headers_into`]'s bytes (`None` if they are not such bytes).
pub(crate) fn decode_headers(mut bytes: &[u8]) -> Option<RawHeaders> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (bytes.get(..n)?, bytes.get(n..)?);
        *bytes = rest;
        Some(head)
    }
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = u32::from_be_bytes(take(&mut bytes, 4)?.try_into().ok()?) as usize;
        let key = String::from_utf8(take(&mut bytes, len)?.to_vec()).ok()?;
        let len = i32::from_be_bytes(take(&mut bytes, 4)?.try_into().ok()?);
        let value = match usize::try_from(len) {
            Ok(len) => Some(take(&mut bytes, len)?.to_vec()),
            Err(_) => None,
        };
        out.push((key, value));
    }
    Some(out)
}

/// Whether a produce error can never succeed as it is (retrying sends the
/// same bytes to the same topic with the same rights).
fn permanent(error: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        error.rdkafka_error_code(),
        Some(
            MessageSizeTooLarge
                | InvalidMessageSize
                | InvalidMessage
                | InvalidRecord
                | MessageBatchTooLarge
                | TopicAuthorizationFailed
                | ClusterAuthorizationFailed
                | InvalidTopic
                | InvalidArgument
        )
    )
}

/// Where and how the runner's dead letters go.
pub(crate) struct Sender {
    pub(crate) pool: PgPool,
    pub(crate) producer: FutureProducer,
    pub(crate) projection: String,
    pub(crate) topic: String,
    pub(crate) generation: i32,
    pub(crate) stats: Arc<RunnerStats>,
    pub(crate) max_backoff: Duration,
}

impl Sender {
    /// Sends recorded dead letters whenever `wake` is notified (a batch
    /// committed some) and every few seconds (those of a crashed instance,
    /// or re-marked by a re-drive), until the task is aborted.
    pub(crate) async fn run(self, wake: Arc<Notify>) {
        let mut failures = 0u32;
        let mut errors = Throttle::new(Duration::from_secs(10));
        loop {
            match self.round().await {
                Ok(n) if n == ROUND as usize => continue,
                Ok(_) => {
                    failures = 0;
                    tokio::select! {
                        () = wake.notified() => {}
                        () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                }
                Err(error) => {
                    failures += 1;
                    if let Some(suppressed) = errors.allow() {
                        tracing::warn!(
                            projection = self.projection,
                            topic = self.topic,
                            %error,
                            suppressed,
                            "projection: sending dead letters failed; retrying"
                        );
                    }
                    let delay = Duration::from_millis(200)
                        .saturating_mul(1 << failures.min(8))
                        .min(self.max_backoff);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Sends up to [`ROUND`] unsent dead letters, oldest first; returns how
    /// many it read. Rows are locked (`SKIP LOCKED`) while their copies are
    /// in flight, so two instances never send the same round.
    async fn round(&self) -> Result<usize> {
        type Row = (
            i64,
            String,
            i32,
            i64,
            String,
            Option<Vec<u8>>,
            Option<String>,
            Option<Vec<u8>>,
            sqlx::types::Json<BTreeMap<String, String>>,
            Option<Vec<u8>>,
        );
        let name = &self.projection;
        let db = |what: &str| Error::db(format!("projection {name}: {what}"));
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("sending dead letters"))?;
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, topic, partition, \"offset\", reason, raw_key, message_key, raw_headers, \
             headers, value FROM tidings_parked \
             WHERE projection = $1 AND dead_letter AND dlq_sent_at IS NULL AND dlq_error IS NULL \
             ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(name)
        .bind(ROUND)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("reading unsent dead letters"))?;
        if rows.is_empty() {
            return Ok(0);
        }
        let generation = self.generation.to_string();
        let mut sends = Vec::with_capacity(rows.len());
        for (id, topic, partition, offset, reason, raw_key, key, raw_headers, headers, value) in
            &rows
        {
            let original: RawHeaders = raw_headers
                .as_deref()
                .and_then(decode_headers)
                .unwrap_or_else(|| {
                    headers
                        .0
                        .iter()
                        .map(|(k, v)| (k.clone(), Some(v.clone().into_bytes())))
                        .collect()
                });
            let mut out = OwnedHeaders::new_with_capacity(original.len() + 7);
            for (k, v) in &original {
                out = out.insert(Header {
                    key: k,
                    value: v.as_deref(),
                });
            }
            let (partition, offset) = (partition.to_string(), offset.to_string());
            for (k, v) in [
                (dlq_headers::REASON, reason.as_str()),
                (dlq_headers::PROJECTION, name.as_str()),
                (dlq_headers::GENERATION, generation.as_str()),
                (dlq_headers::TOPIC, topic.as_str()),
                (dlq_headers::PARTITION, partition.as_str()),
                (dlq_headers::OFFSET, offset.as_str()),
            ] {
                out = out.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                });
            }
            let value = value.as_deref();
            let copied = value.filter(|v| v.len() <= DLQ_MAX_VALUE_BYTES);
            if value.is_some() && copied.is_none() {
                out = out.insert(Header {
                    key: dlq_headers::VALUE_OMITTED,
                    value: Some("too large; kept in tidings_parked"),
                });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).headers(out);
            if let Some(key) = raw_key.as_deref().or(key.as_deref().map(str::as_bytes)) {
                record = record.key(key);
            }
            if let Some(value) = copied {
                record = record.payload(value);
            }
            let send = self.producer.send(record, Duration::from_secs(5));
            sends.push(async move { (*id, send.await.map(|_| ()).map_err(|(e, _)| e)) });
        }
        let mut sent = Vec::new();
        let mut refused = Vec::new();
        let mut transient = None;
        for (id, result) in futures::future::join_all(sends).await {
            match result {
                Ok(()) => sent.push(id),
                Err(e) if permanent(&e) => refused.push((id, e.to_string())),
                Err(e) => transient = Some(e),
            }
        }
        sqlx::query("UPDATE tidings_parked SET dlq_sent_at = now() WHERE id = ANY($1)")
            .bind(&sent)
            .execute(&mut *tx)
            .await
            .map_err(db("marking dead letters sent"))?;
        for (id, why) in &refused {
            tracing::error!(
                projection = name,
                topic = self.topic,
                id,
                error = why,
                "projection: the dead letter topic refuses this dead letter for good; it stays parked in tidings_parked"
            );
            sqlx::query("UPDATE tidings_parked SET dlq_error = $2 WHERE id = $1")
                .bind(id)
                .bind(format!("sending to {}: {why}", self.topic))
                .execute(&mut *tx)
                .await
                .map_err(db("recording why a dead letter cannot be sent"))?;
        }
        tx.commit()
            .await
            .map_err(db("committing the dead letters sent"))?;
        self.stats
            .dead_letters_sent
            .fetch_add(sent.len() as u64, Ordering::Relaxed);
        self.stats
            .dead_letter_failures
            .fetch_add(refused.len() as u64, Ordering::Relaxed);
        match transient {
            Some(source) => Err(Error::Kafka {
                context: format!("sending dead letters to {}", self.topic),
                source,
            }),
            None => Ok(rows.len()),
        }
    }
}
