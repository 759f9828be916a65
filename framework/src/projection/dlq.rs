//! Parked and dead-lettered events: listing, showing, re-driving and
//! skipping.
//!
//! # Guarantees
//!
//! - **In order.** A re-drive applies a stream's parked events in sequence
//!   order and stops at the first that still fails.
//! - **Nothing vanishes unrecorded.** Skipping a dead letter moves it to
//!   `tidings_dlq_skipped` with the operator's note; its stream's position
//!   moves past it, so the events behind it can be re-driven.
//! - **Fenced.** Re-drives and skips take the projection's advisory lock
//!   shared, as batches do; a replay waits for them.

use sqlx::{Connection, PgPool};

use crate::envelope::RawEnvelope;
use crate::error::{Error, Result};
use crate::projection::panic_message;
use crate::projection::{ApplyError, Projection};

/// An event a projection did not apply.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
#[non_exhaustive]
pub struct ParkedEvent {
    /// Row id; re-drives go in this order within a stream.
    pub id: i64,
    /// The projection.
    pub projection: String,
    /// The stream's aggregate type (`?` when the message said none).
    pub aggregate_type: String,
    /// The stream's aggregate id (the message key).
    pub aggregate_id: String,
    /// The event's sequence, when it could be read.
    pub sequence: Option<i64>,
    /// Where it came from.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Whether it is the dead-lettered cause (else it waits behind one).
    pub dead_letter: bool,
    /// Why it was not applied.
    pub reason: String,
    /// Why its copy could not be sent to the dead letter topic, when the
    /// topic refused it for good (it stays here all the same).
    pub dlq_error: Option<String>,
}

/// Lists parked events, of one projection or of all, oldest first.
pub async fn list_parked(pool: &PgPool, projection: Option<&str>) -> Result<Vec<ParkedEvent>> {
    sqlx::query_as(
        "SELECT id, projection, aggregate_type, aggregate_id, sequence, topic, partition, \"offset\", \
         dead_letter, reason, dlq_error FROM tidings_parked WHERE $1::text IS NULL OR projection = $1 ORDER BY id",
    )
    .bind(projection)
    .fetch_all(pool)
    .await
    .map_err(Error::db("listing parked events"))
}

/// One parked event with its message as received: key, headers and value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParkedMessage {
    /// The event and why it is parked.
    pub event: ParkedEvent,
    /// The message key.
    pub key: Option<String>,
    /// The message headers.
    pub headers: std::collections::BTreeMap<String, String>,
    /// The message value (`None` for an empty message).
    pub value: Option<Vec<u8>>,
}

/// One parked event by its id, with its message (`None` if there is none).
pub async fn show_parked(pool: &PgPool, id: i64) -> Result<Option<ParkedMessage>> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        event: ParkedEvent,
        message_key: Option<String>,
        headers: sqlx::types::Json<std::collections::BTreeMap<String, String>>,
        value: Option<Vec<u8>>,
    }
    let row: Option<Row> = sqlx::query_as(
        "SELECT id, projection, aggregate_type, aggregate_id, sequence, topic, partition, \"offset\", \
         dead_letter, reason, dlq_error, message_key, headers, value FROM tidings_parked WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(Error::db(format!("reading parked event {id}")))?;
    Ok(row.map(|row| ParkedMessage {
        event: row.event,
        key: row.message_key,
        headers: row.headers.0,
        value: row.value,
    }))
}

/// Discards the dead-lettered event `id` (the first parked event of its
/// stream), recording it with `note` in `tidings_dlq_skipped`, and moves its
/// stream's position past it. The events parked behind it stay parked until
/// a re-drive ([`redrive_stream`]) applies them. Returns the skipped event.
pub async fn skip_dead_letter(pool: &PgPool, id: i64, note: &str) -> Result<ParkedEvent> {
    let db = |what: &str| Error::db(format!("skipping dead letter {id}: {what}"));
    let mut tx = pool.begin().await.map_err(db("beginning"))?;
    let Some(event) = sqlx::query_as::<_, ParkedEvent>(
        "SELECT id, projection, aggregate_type, aggregate_id, sequence, topic, partition, \"offset\", \
         dead_letter, reason, dlq_error FROM tidings_parked WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db("reading it"))?
    else {
        return Err(Error::Config(format!("no parked event {id}")));
    };
    sqlx::query(
        "SELECT pg_advisory_xact_lock_shared(hashtextextended('tidings.projection.' || $1, 0))",
    )
    .bind(&event.projection)
    .execute(&mut *tx)
    .await
    .map_err(db("locking the projection"))?;
    let last: i64 = sqlx::query_scalar(
        "INSERT INTO tidings_projection_streams (projection, aggregate_type, aggregate_id, last_sequence) \
         VALUES ($1, $2, $3, 0) ON CONFLICT (projection, aggregate_type, aggregate_id) \
         DO UPDATE SET last_sequence = tidings_projection_streams.last_sequence RETURNING last_sequence",
    )
    .bind(&event.projection)
    .bind(&event.aggregate_type)
    .bind(&event.aggregate_id)
    .fetch_one(&mut *tx)
    .await
    .map_err(db("locking its stream"))?;
    let first: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM tidings_parked WHERE projection = $1 AND aggregate_type = $2 \
         AND aggregate_id = $3 ORDER BY sequence NULLS FIRST, id LIMIT 1",
    )
    .bind(&event.projection)
    .bind(&event.aggregate_type)
    .bind(&event.aggregate_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db("reading its stream"))?;
    if first != Some(id) {
        return Err(Error::Config(format!(
            "parked event {id} waits behind event {} of {}/{}: skip or re-drive that one first",
            first.unwrap_or_default(),
            event.aggregate_type,
            event.aggregate_id
        )));
    }
    sqlx::query(
        "WITH gone AS (DELETE FROM tidings_parked WHERE id = $1 RETURNING *) \
         INSERT INTO tidings_dlq_skipped (id, projection, aggregate_type, aggregate_id, sequence, topic, \
         partition, \"offset\", reason, message_key, headers, value, parked_at, note) \
         SELECT id, projection, aggregate_type, aggregate_id, sequence, topic, partition, \"offset\", \
         reason, message_key, headers, value, parked_at, $2 FROM gone",
    )
    .bind(id)
    .bind(note)
    .execute(&mut *tx)
    .await
    .map_err(db("recording it"))?;
    if let Some(sequence) = event.sequence.filter(|s| *s > last) {
        sqlx::query(
            "UPDATE tidings_projection_streams SET last_sequence = $4 \
             WHERE projection = $1 AND aggregate_type = $2 AND aggregate_id = $3",
        )
        .bind(&event.projection)
        .bind(&event.aggregate_type)
        .bind(&event.aggregate_id)
        .bind(sequence)
        .execute(&mut *tx)
        .await
        .map_err(db("moving its stream past it"))?;
    }
    tx.commit().await.map_err(db("committing"))?;
    Ok(event)
}

/// What a re-drive did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedriveReport {
    /// Parked events applied now.
    pub applied: u64,
    /// Parked events dropped as already applied.
    pub skipped: u64,
    /// Events still parked (their cause still fails).
    pub still_parked: u64,
}

/// Re-applies the parked events of `projection`, stream by stream, in order.
///
/// In each stream's transaction: events at or below the stream's last
/// sequence are dropped (idempotent: re-driving twice changes nothing), the
/// next one is applied, and the first that still fails (or leaves a gap)
/// stops that stream, recording the new reason. Streams whose parked events
/// are all gone flow again.
pub async fn redrive<P: Projection>(pool: &PgPool, projection: &P) -> Result<RedriveReport> {
    let name = projection.name();
    let db = |what: &str| Error::db(format!("re-driving projection {name}: {what}"));
    let streams: Vec<(String, String)> = sqlx::query_as(
        "SELECT aggregate_type, aggregate_id FROM tidings_parked WHERE projection = $1 \
         GROUP BY aggregate_type, aggregate_id ORDER BY min(id)",
    )
    .bind(name)
    .fetch_all(pool)
    .await
    .map_err(db("listing parked streams"))?;

    let mut report = RedriveReport::default();
    for (aggregate_type, aggregate_id) in streams {
        redrive_one(
            pool,
            projection,
            &aggregate_type,
            &aggregate_id,
            &mut report,
        )
        .await?;
    }
    Ok(report)
}

/// Re-applies the parked events of one stream of `projection`, in order
/// (as [`redrive`] does for every stream).
pub async fn redrive_stream<P: Projection>(
    pool: &PgPool,
    projection: &P,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<RedriveReport> {
    let mut report = RedriveReport::default();
    redrive_one(pool, projection, aggregate_type, aggregate_id, &mut report).await?;
    Ok(report)
}

async fn redrive_one<P: Projection>(
    pool: &PgPool,
    projection: &P,
    aggregate_type: &str,
    aggregate_id: &str,
    report: &mut RedriveReport,
) -> Result<()> {
    let name = projection.name();
    let db = |what: &str| Error::db(format!("re-driving projection {name}: {what}"));
    let mut tx = pool.begin().await.map_err(db("beginning"))?;
    // Fenced against a replay, which takes the projection's advisory
    // lock exclusively and then this row FOR UPDATE.
    sqlx::query(
        "SELECT pg_advisory_xact_lock_shared(hashtextextended('tidings.projection.' || $1, 0))",
    )
    .bind(name)
    .execute(&mut *tx)
    .await
    .map_err(db("locking the projection"))?;
    sqlx::query("SELECT generation FROM tidings_projections WHERE name = $1 FOR SHARE")
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(db("locking the projection"))?;
    let mut last: i64 = sqlx::query_scalar(
        "INSERT INTO tidings_projection_streams (projection, aggregate_type, aggregate_id, last_sequence) \
         VALUES ($1, $2, $3, 0) ON CONFLICT (projection, aggregate_type, aggregate_id) \
         DO UPDATE SET last_sequence = tidings_projection_streams.last_sequence RETURNING last_sequence",
    )
    .bind(name)
    .bind(aggregate_type)
    .bind(aggregate_id)
    .fetch_one(&mut *tx)
    .await
    .map_err(db("locking a stream"))?;
    let parked: Vec<(i64, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT id, value FROM tidings_parked WHERE projection = $1 AND aggregate_type = $2 \
         AND aggregate_id = $3 ORDER BY sequence NULLS FIRST, id",
    )
    .bind(name)
    .bind(aggregate_type)
    .bind(aggregate_id)
    .fetch_all(&mut *tx)
    .await
    .map_err(db("reading parked events"))?;

    let mut stopped: Option<(i64, String)> = None;
    let mut done = Vec::new();
    let total = parked.len();
    for (id, value) in parked {
        // Decoding and applying run user code: a panic is this event's
        // reason to stay parked, never the re-drive's end.
        let decoded = value
            .as_deref()
            .ok_or_else(|| "empty message".to_owned())
            .and_then(|v| RawEnvelope::from_slice(v).map_err(|e| e.to_string()))
            .and_then(|raw| {
                let origin = (
                    raw.aggregate_type.clone(),
                    raw.aggregate_id.clone(),
                    raw.sequence,
                );
                let decoding = std::panic::AssertUnwindSafe(|| raw.read::<P::Event>());
                match std::panic::catch_unwind(decoding) {
                    Ok(read) => read
                        .map(|events| (origin, events.into_vec()))
                        .map_err(|e| e.to_string()),
                    Err(panic) => Err(format!("decoding panicked: {}", panic_message(&*panic))),
                }
            });
        // A retired event reads as no envelope: its position is still taken.
        let ((of_type, of_id, sequence), envelopes) = match decoded {
            Ok(read) => read,
            Err(reason) => {
                stopped = Some((id, reason));
                break;
            }
        };
        // Parked by its key and header (its envelope was unreadable then):
        // an envelope of another stream must not move this one.
        if of_type != aggregate_type || of_id != aggregate_id {
            stopped = Some((
                id,
                format!(
                    "the event belongs to {of_type}/{of_id}, not to the stream it is parked in"
                ),
            ));
            break;
        }
        let sequence = sequence as i64;
        if sequence <= last {
            report.skipped += 1;
            done.push(id);
            continue;
        }
        if sequence > last + 1 {
            stopped = Some((
                id,
                format!("sequence gap: expected {}, got {sequence}", last + 1),
            ));
            break;
        }
        if envelopes.is_empty() {
            // Retired: nothing to apply; its position is taken.
            report.skipped += 1;
            last = sequence;
            done.push(id);
            continue;
        }
        let mut savepoint = tx.begin().await.map_err(db("creating a savepoint"))?;
        let mut applied = Ok(());
        for envelope in &envelopes {
            let applying = std::panic::AssertUnwindSafe(projection.apply(&mut savepoint, envelope));
            applied = futures::FutureExt::catch_unwind(applying)
                .await
                .unwrap_or_else(|panic| {
                    Err(ApplyError::permanent(format!(
                        "applying panicked: {}",
                        panic_message(&*panic)
                    )))
                });
            if applied.is_err() {
                break;
            }
        }
        match applied {
            Ok(()) => {
                savepoint
                    .commit()
                    .await
                    .map_err(db("releasing a savepoint"))?;
                report.applied += 1;
                last = sequence;
                done.push(id);
            }
            Err(ApplyError::Permanent(e)) => {
                savepoint
                    .rollback()
                    .await
                    .map_err(db("rolling back a savepoint"))?;
                stopped = Some((id, e.to_string()));
                break;
            }
            Err(ApplyError::Transient(e)) => {
                return Err(Error::Transient(format!(
                    "re-driving projection {name}: {aggregate_type}/{aggregate_id}: transient error, nothing changed; try again: {e}"
                )));
            }
        }
    }
    report.still_parked += (total - done.len()) as u64;
    sqlx::query("DELETE FROM tidings_parked WHERE id = ANY($1)")
        .bind(&done)
        .execute(&mut *tx)
        .await
        .map_err(db("removing re-driven events"))?;
    sqlx::query(
        "UPDATE tidings_projection_streams SET last_sequence = $4 \
         WHERE projection = $1 AND aggregate_type = $2 AND aggregate_id = $3",
    )
    .bind(name)
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(last)
    .execute(&mut *tx)
    .await
    .map_err(db("saving the stream position"))?;
    if let Some((id, reason)) = stopped {
        // An event that becomes its stream's dead letter now is copied to
        // the dead letter topic by a running runner (not yet sent).
        sqlx::query(
            "UPDATE tidings_parked SET reason = $2, \
             dlq_sent_at = CASE WHEN dead_letter THEN dlq_sent_at END, \
             dlq_error = CASE WHEN dead_letter THEN dlq_error END, dead_letter = true \
             WHERE id = $1",
        )
        .bind(id)
        .bind(reason)
        .execute(&mut *tx)
        .await
        .map_err(db("recording why an event is still parked"))?;
    }
    tx.commit().await.map_err(db("committing"))?;
    Ok(())
}
