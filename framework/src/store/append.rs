//! Appending events and their outbox rows in one statement.

use sqlx::PgConnection;

use crate::envelope::{EventContext, RawEnvelope};
use crate::error::{Error, Result};
use crate::event::Event;

/// The number of outbox lanes. Each aggregate maps to one lane
/// ([`lane_of`]); a relay owns whole lanes, which keeps every aggregate's
/// events with one relay at a time. Part of the stored format: changing it
/// requires an empty outbox.
pub const OUTBOX_LANES: u32 = 64;

/// The largest envelope the store accepts, in bytes: under Kafka's default
/// message limit (1,000,000 bytes) with room for the key and headers, so
/// that every committed event can be published.
pub const MAX_ENVELOPE_BYTES: usize = 950_000;

/// The longest aggregate id the store accepts, in bytes. Ids are Kafka keys
/// and parts of a unique index; a longer one is refused at append.
pub const MAX_AGGREGATE_ID_BYTES: usize = 512;

/// The outbox lane of an aggregate: FNV-1a over type and id, modulo [`OUTBOX_LANES`].
pub fn lane_of(aggregate_type: &str, aggregate_id: &str) -> i32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in aggregate_type
        .bytes()
        .chain([0xff])
        .chain(aggregate_id.bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % u64::from(OUTBOX_LANES)) as i32
}

const APPEND: &str = r#"
WITH input AS (
    SELECT * FROM UNNEST($5::uuid[], $6::bigint[], $7::text[], $8::int[], $9::timestamptz[], $10::text[], $11::text[])
        WITH ORDINALITY AS t(event_id, sequence, event_type, event_version, recorded_at, payload, envelope, ord)
    -- Only right after the expected sequence: no gap, no append past a
    -- sequence this transaction cannot see committed.
    WHERE (SELECT coalesce(max(sequence), 0) FROM tidings_events
           WHERE aggregate_type = $1 AND aggregate_id = $2) = $15
    -- And, when the writer knows it, after the very event its state was
    -- built from: a history forked by a lost commit is not appended to.
      AND ($16::uuid IS NULL OR EXISTS (
           SELECT 1 FROM tidings_events
           WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $15
             AND event_id = $16))
), events AS (
    INSERT INTO tidings_events
        (event_id, aggregate_type, aggregate_id, sequence, event_type, event_version,
         recorded_at, correlation_id, causation_id, metadata, payload)
    SELECT event_id, $1, $2, sequence, event_type, event_version,
           recorded_at, $12, $13, $14::jsonb, payload::jsonb
    FROM input ORDER BY ord
    RETURNING 1
), outbox AS (
    INSERT INTO tidings_outbox
        (lane, topic, message_key, aggregate_type, aggregate_id, sequence, event_id,
         event_type, event_version, envelope)
    SELECT $4, $3, $2, $1, $2, sequence, event_id, event_type, event_version, envelope
    FROM input ORDER BY ord
    RETURNING 1
)
SELECT (SELECT count(*) FROM events) + (SELECT count(*) FROM outbox)
"#;

/// Where an append goes and what it expects to find there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target<'a> {
    pub(crate) aggregate_type: &'a str,
    pub(crate) aggregate_id: &'a str,
    pub(crate) topic: &'a str,
    /// The stream's last sequence the writer saw (0: a new stream).
    pub(crate) expected_sequence: u64,
    /// The id of the event at `expected_sequence`, when the writer knows it.
    pub(crate) expected_head: Option<uuid::Uuid>,
    /// Whether the statement is its own transaction (no `BEGIN` before it):
    /// then an answer lost after it was sent leaves the outcome unknown.
    pub(crate) commits_alone: bool,
}

/// The conflict error for an append to `aggregate_type/aggregate_id` after `expected`.
pub(crate) fn conflict(aggregate_type: &str, aggregate_id: &str, expected: u64) -> Error {
    Error::Conflict {
        aggregate_type: aggregate_type.to_owned(),
        aggregate_id: aggregate_id.to_owned(),
        expected,
        actual: 0,
    }
}

/// Whether PostgreSQL refused a statement or a commit because of a
/// concurrent transaction (serialization failure 40001, deadlock 40P01):
/// retried like a conflict.
pub(crate) fn is_serialization_failure(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40001" | "40P01")))
}

/// Refuses aggregate ids that cannot be published in order: an empty one
/// (an empty Kafka key is partitioned at random) and one over
/// [`MAX_AGGREGATE_ID_BYTES`].
pub(crate) fn validate_aggregate_id(aggregate_type: &str, aggregate_id: &str) -> Result<()> {
    let reason = if aggregate_id.is_empty() {
        "it is empty (an empty Kafka key would scatter its events over partitions)".to_owned()
    } else if aggregate_id.len() > MAX_AGGREGATE_ID_BYTES {
        format!(
            "it is {} bytes long, over the limit of {MAX_AGGREGATE_ID_BYTES}",
            aggregate_id.len()
        )
    } else {
        return Ok(());
    };
    let shown: String = aggregate_id.chars().take(64).collect();
    Err(Error::InvalidAggregateId {
        aggregate_type: aggregate_type.to_owned(),
        aggregate_id: shown,
        reason,
    })
}

/// Appends `events` after `target.expected_sequence` with their outbox rows,
/// in one round trip. A unique violation on the stream key, a stream not at
/// the expected head, or a serialization failure is [`Error::Conflict`].
pub(crate) async fn append<E: Event>(
    conn: &mut PgConnection,
    target: Target<'_>,
    events: &[E],
    context: &EventContext,
) -> Result<Vec<RawEnvelope>> {
    let Target {
        aggregate_type,
        aggregate_id,
        topic,
        expected_sequence,
        expected_head,
        commits_alone,
    } = target;
    if events.is_empty() {
        return Ok(Vec::new());
    }
    validate_aggregate_id(aggregate_type, aggregate_id)?;
    crate::names::validate_topic_name(topic)?;
    let what = || {
        format!(
            "appending {} events to {aggregate_type}/{aggregate_id}",
            events.len()
        )
    };
    let mut envelopes = Vec::with_capacity(events.len());
    let mut wire = Vec::with_capacity(events.len());
    for (i, event) in events.iter().enumerate() {
        let sequence = expected_sequence + 1 + i as u64;
        let encoded =
            RawEnvelope::from_event(aggregate_type, aggregate_id, sequence, event, context)
                .map_err(|source| Error::Encode {
                    context: format!("{}: encoding `{}`", what(), event.event_type()),
                    source,
                })?;
        let json = encoded.to_json();
        let bytes = json.len();
        if bytes > MAX_ENVELOPE_BYTES {
            return Err(Error::EventTooLarge {
                context: format!("{}: `{}`", what(), event.event_type()),
                bytes,
                limit: MAX_ENVELOPE_BYTES,
            });
        }
        envelopes.push(encoded);
        wire.push(json);
    }

    let n = envelopes.len();
    let mut ids = Vec::with_capacity(n);
    let mut sequences = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut versions = Vec::with_capacity(n);
    let mut times = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    for envelope in &envelopes {
        ids.push(envelope.event_id);
        sequences.push(envelope.sequence as i64);
        types.push(envelope.event_type.as_str());
        versions.push(envelope.event_version as i32);
        times.push(envelope.timestamp);
        payloads.push(envelope.payload.to_string());
    }
    let metadata = serde_json::to_string(&context.metadata).expect("a string map serializes");

    let result = sqlx::query_scalar::<_, i64>(APPEND)
        .bind(aggregate_type)
        .bind(aggregate_id)
        .bind(topic)
        .bind(lane_of(aggregate_type, aggregate_id))
        .bind(&ids)
        .bind(&sequences)
        .bind(&types)
        .bind(&versions)
        .bind(&times)
        .bind(&payloads)
        .bind(&wire)
        .bind(context.correlation_id.as_deref())
        .bind(context.causation_id.as_deref())
        .bind(metadata)
        .bind(expected_sequence as i64)
        .bind(expected_head)
        .fetch_one(&mut *conn)
        .await;
    let conflict = || conflict(aggregate_type, aggregate_id, expected_sequence);
    match result {
        Ok(0) => Err(conflict()),
        Ok(_) => Ok(envelopes),
        // The transaction is aborted now; the caller reads the actual
        // sequence on another connection.
        Err(sqlx::Error::Database(db))
            if db.constraint() == Some("tidings_events_stream_sequence") =>
        {
            Err(conflict())
        }
        Err(e) if is_serialization_failure(&e) => Err(conflict()),
        // No answer (the connection failed): a statement that is its own
        // transaction may have committed all the same.
        Err(e) if commits_alone && !matches!(e, sqlx::Error::Database(_)) => {
            Err(Error::db(format!(
                "{}: no answer after the append was sent, so it may have committed (the events' ids tell: {})",
                what(),
                envelopes
                    .first()
                    .map(|e| e.event_id.to_string())
                    .unwrap_or_default()
            ))(e))
        }
        Err(e) => Err(Error::db(what())(e)),
    }
}

/// The head of a stream (its last sequence and that event's id), read in
/// the caller's transaction; `None` for a stream with no event.
pub(crate) async fn head(
    conn: &mut PgConnection,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Option<super::Head>> {
    let row: Option<(i64, uuid::Uuid)> = sqlx::query_as(
        "SELECT sequence, event_id FROM tidings_events \
         WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence DESC LIMIT 1",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(Error::db(format!(
        "reading the head of {aggregate_type}/{aggregate_id}"
    )))?;
    Ok(row.map(|(sequence, event_id)| super::Head {
        sequence: sequence as u64,
        event_id,
    }))
}

/// The last sequence of a stream (0 when it has no event).
pub(crate) async fn current_sequence(
    pool: &sqlx::PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<u64> {
    let max: Option<i64> = sqlx::query_scalar(
        "SELECT max(sequence) FROM tidings_events WHERE aggregate_type = $1 AND aggregate_id = $2",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .fetch_one(pool)
    .await
    .map_err(Error::db(format!(
        "reading the sequence of {aggregate_type}/{aggregate_id}"
    )))?;
    Ok(max.unwrap_or(0) as u64)
}
