//! Applying one batch of one partition in one transaction.

use std::collections::{BTreeMap, HashMap, HashSet};

use sqlx::PgPool;

use crate::envelope::{Envelope, HEADER_AGGREGATE_TYPE, RawEnvelope};
use crate::error::Error;
use crate::projection::dead_letters::{RawHeaders, encode_headers};
use crate::projection::evolution::{NEWER_VERSION, UNKNOWN_TYPE};
use crate::projection::{ApplyError, NewerVersions, Projection, UnknownTypes};

/// A message as consumed, owned by the partition's worker.
#[derive(Debug, Clone)]
pub(crate) struct Message {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) value: Option<Vec<u8>>,
    pub(crate) headers: RawHeaders,
}

impl Message {
    /// The last value of header `key`, as text.
    fn header(&self, key: &str) -> Option<String> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| String::from_utf8_lossy(v.as_deref().unwrap_or_default()).into_owned())
    }

    /// The headers as readable text (`tidings_parked.headers`): lossy UTF-8,
    /// the last value of a repeated key; the exact ones are kept beside.
    fn readable_headers(&self) -> BTreeMap<String, String> {
        self.headers
            .iter()
            .map(|(k, v)| {
                (
                    clean(k),
                    clean(&String::from_utf8_lossy(v.as_deref().unwrap_or_default())),
                )
            })
            .collect()
    }
}

/// What one batch did.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) applied: u64,
    pub(crate) skipped: u64,
    /// Skipped unread by policy (unknown types, newer versions).
    pub(crate) ignored: u64,
    pub(crate) parked: u64,
    pub(crate) dead_lettered: u64,
    /// The next offset to consume, when the batch advanced the checkpoint.
    pub(crate) next_offset: Option<i64>,
}

/// Why a batch did not commit.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Retry the batch after a backoff.
    Transient(String),
    /// The event at `offset` can never be applied: retry the batch at once,
    /// dead-lettering it.
    Poison { offset: i64, reason: String },
    /// This instance's generation was replaced by a replay: stop.
    Stale,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure::Transient(error.to_string())
    }
}

type Stream = (String, String);

enum Decoded<E> {
    Event(Envelope<E>),
    /// Not read, by policy: its sequence, type, version and why.
    Ignored(i64, String, i32, &'static str),
    /// Why it cannot be applied, and its sequence when the envelope was readable.
    Poison(String, Option<i64>),
}

fn stream_of(message: &Message) -> Stream {
    let id = message
        .key
        .as_deref()
        .map(|k| clean(&String::from_utf8_lossy(k)))
        .unwrap_or_default();
    let kind = message
        .header(HEADER_AGGREGATE_TYPE)
        .map(|t| clean(&t))
        .unwrap_or_else(|| "?".into());
    (kind, id)
}

/// The longest aggregate type or id kept as it is, in bytes. Longer ones
/// (only a foreign producer can write them: the store refuses ids over 512
/// bytes) are dead-lettered under a shortened identity, since an index
/// entry cannot hold them.
const MAX_IDENTITY_BYTES: usize = 512;

/// PostgreSQL text cannot hold NUL: input from the topic is stored with
/// NUL replaced, and an identity too long for an index is shortened (a
/// prefix and a hash of the whole), so that bad input is parked rather
/// than failing forever.
fn clean(text: &str) -> String {
    let text = text.replace('\0', "\u{FFFD}");
    if text.len() <= MAX_IDENTITY_BYTES {
        return text;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(text.as_bytes());
    let mut cut = 200;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}…#{hex}", &text[..cut])
}

/// Why an envelope's identity cannot be applied, if it cannot.
fn oversized(raw: &RawEnvelope) -> Option<String> {
    [
        ("aggregate type", &raw.aggregate_type),
        ("aggregate id", &raw.aggregate_id),
    ]
    .into_iter()
    .find(|(_, v)| v.len() > MAX_IDENTITY_BYTES)
    .map(|(what, v)| {
        format!(
            "{what} of {} bytes exceeds the limit of {MAX_IDENTITY_BYTES} bytes",
            v.len()
        )
    })
}

/// In one round trip: locks the projection's generation (shared) and the
/// partition's checkpoint, returning its next offset, and only when this
/// instance's generation is current; then locks the streams of the batch
/// (creating their rows) and reads their last sequences and whether they
/// are parked. No row: the generation was replaced.
///
/// The batch first takes the projection's advisory lock in shared mode: a
/// replay takes it exclusively, and a heavyweight lock's queue is first come,
/// first served, so a replay waits for the batches in flight only, never for
/// a steady stream of overlapping ones (row locks would starve it).
const BEGIN_BATCH: &str = "WITH a AS ( \
    SELECT pg_advisory_xact_lock_shared(hashtextextended('tidings.projection.' || $1, 0))), \
    g AS ( \
    SELECT p.generation FROM tidings_projections p, a WHERE p.name = $1 FOR SHARE OF p), \
    c AS ( \
    INSERT INTO tidings_checkpoints (projection, topic, partition, next_offset) \
    SELECT $1, $2, $3, 0 FROM g WHERE g.generation = $4 \
    ON CONFLICT (projection, topic, partition) DO UPDATE SET next_offset = tidings_checkpoints.next_offset \
    RETURNING next_offset), \
    locked AS ( \
    INSERT INTO tidings_projection_streams (projection, aggregate_type, aggregate_id, last_sequence) \
    SELECT $1, t, i, 0 FROM UNNEST($5::text[], $6::text[]) AS s(t, i) \
    WHERE EXISTS (SELECT 1 FROM c) ORDER BY t, i \
    ON CONFLICT (projection, aggregate_type, aggregate_id) \
    DO UPDATE SET last_sequence = tidings_projection_streams.last_sequence \
    RETURNING aggregate_type, aggregate_id, last_sequence) \
    SELECT c.next_offset, l.aggregate_type, l.aggregate_id, l.last_sequence, coalesce(( \
    SELECT true FROM tidings_parked p WHERE p.projection = $1 \
    AND p.aggregate_type = l.aggregate_type AND p.aggregate_id = l.aggregate_id LIMIT 1), false) \
    FROM c CROSS JOIN locked l";

/// Which of the given streams have parked events (read after the batch's
/// locks are granted).
const STILL_PARKED: &str = "SELECT s.t, s.i FROM UNNEST($2::text[], $3::text[]) AS s(t, i) \
    WHERE EXISTS (SELECT 1 FROM tidings_parked p WHERE p.projection = $1 \
    AND p.aggregate_type = s.t AND p.aggregate_id = s.i)";

/// Saves the batch's stream positions and its checkpoint, in one round trip.
///
/// Both statements that touch the batch's streams reach each stream row
/// through its key whatever the plan (an upsert's arbiter index, a scalar
/// subquery with LIMIT), so that a generic plan cached while the tables
/// were small (a hash join over every stream of the projection) cannot
/// slow the runner down as they grow.
const SAVE_POSITIONS: &str = "WITH streams AS ( \
    INSERT INTO tidings_projection_streams (projection, aggregate_type, aggregate_id, last_sequence) \
    SELECT $1, t, i, seq FROM UNNEST($5::text[], $6::text[], $7::bigint[]) AS u(t, i, seq) \
    ON CONFLICT (projection, aggregate_type, aggregate_id) \
    DO UPDATE SET last_sequence = EXCLUDED.last_sequence) \
    UPDATE tidings_checkpoints SET next_offset = $4, updated_at = now() \
    WHERE projection = $1 AND topic = $2 AND partition = $3";

/// Applies `messages` (one partition, in offset order) in one transaction.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn apply_batch<P: Projection>(
    pool: &PgPool,
    projection: &P,
    generation: i32,
    messages: &[Message],
    poison: &HashMap<i64, String>,
    careful: bool,
    (unknown_types, newer_versions): (UnknownTypes, NewerVersions),
) -> Result<Outcome, Failure> {
    let Some(first) = messages.first() else {
        return Ok(Outcome::default());
    };
    let name = projection.name();
    let db = |what: &str| Error::db(format!("projection {name}: {what}"));
    let mut tx = pool.begin().await.map_err(db("beginning a batch"))?;

    // Decode everything first; a poison message is known by its offset.
    let decoded: Vec<(Stream, Decoded<P::Event>)> = messages
        .iter()
        .map(|m| {
            let raw = match m.value.as_deref() {
                Some(bytes) => RawEnvelope::from_slice(bytes),
                None => Err(crate::DecodeError::Envelope("empty message".into())),
            };
            match raw {
                Ok(raw) => {
                    let stream = (clean(&raw.aggregate_type), clean(&raw.aggregate_id));
                    // A sequence outside 1..=i64::MAX is bad input, never a
                    // duplicate to skip in silence.
                    let Some(sequence) = i64::try_from(raw.sequence).ok().filter(|s| *s > 0)
                    else {
                        let reason = format!(
                            "invalid sequence {}: sequences start at 1 and fit in a signed 64-bit integer",
                            raw.sequence
                        );
                        return (stream, Decoded::Poison(reason, None));
                    };
                    let at = sequence;
                    let sequence = Some(sequence);
                    if let Some(reason) = poison.get(&m.offset).cloned().or_else(|| oversized(&raw))
                    {
                        return (stream, Decoded::Poison(reason, sequence));
                    }
                    // Decoding runs user code (typed upcasters, custom
                    // Deserialize impls): a panic there is this event's
                    // poison, never the partition's end.
                    let (event_type, version) = (raw.event_type.clone(), raw.event_version);
                    let decoding = std::panic::AssertUnwindSafe(|| raw.decode::<P::Event>());
                    match std::panic::catch_unwind(decoding) {
                        Ok(Ok(envelope)) => (stream, Decoded::Event(envelope)),
                        Ok(Err(e)) if let Some(why) = skipped_unread(&e, unknown_types, newer_versions) => {
                            let ignored =
                                Decoded::Ignored(at, clean(&event_type), version as i32, why);
                            (stream, ignored)
                        }
                        Ok(Err(e)) => (stream, Decoded::Poison(e.to_string(), sequence)),
                        Err(panic) => {
                            let reason = format!("decoding panicked: {}", panic_message(&*panic));
                            (stream, Decoded::Poison(reason, sequence))
                        }
                    }
                }
                Err(e) => {
                    let reason = poison
                        .get(&m.offset)
                        .cloned()
                        .unwrap_or_else(|| e.to_string());
                    (stream_of(m), Decoded::Poison(reason, None))
                }
            }
        })
        .collect();

    // Lock the checkpoint and the streams of the batch (creating their
    // rows), read the next offset, the streams' last sequences and whether
    // they are parked.
    let mut keys: Vec<&Stream> = decoded.iter().map(|(s, _)| s).collect();
    keys.sort();
    keys.dedup();
    let types: Vec<&str> = keys.iter().map(|s| s.0.as_str()).collect();
    let ids: Vec<&str> = keys.iter().map(|s| s.1.as_str()).collect();
    let rows: Vec<(i64, String, String, i64, bool)> = sqlx::query_as(BEGIN_BATCH)
        .bind(name)
        .bind(&first.topic)
        .bind(first.partition)
        .bind(generation)
        .bind(&types)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("locking the checkpoint and the streams"))?;
    let Some(&(next_offset, ..)) = rows.first() else {
        return Err(Failure::Stale);
    };
    let mut last_sequence: HashMap<Stream, i64> = HashMap::with_capacity(rows.len());
    let mut blocked: HashSet<Stream> = HashSet::new();
    for (_, kind, id, sequence, parked) in rows {
        if parked {
            blocked.insert((kind.clone(), id.clone()));
        }
        last_sequence.insert((kind, id), sequence);
    }
    if !blocked.is_empty() {
        // BEGIN_BATCH's snapshot predates its lock waits: a re-drive that
        // committed meanwhile is not in it. Ask again, in a statement of
        // its own (a fresh snapshot, the locks now held).
        let (types, ids): (Vec<&str>, Vec<&str>) = blocked
            .iter()
            .map(|(t, i)| (t.as_str(), i.as_str()))
            .unzip();
        let still: Vec<(String, String)> = sqlx::query_as(STILL_PARKED)
            .bind(name)
            .bind(&types)
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await
            .map_err(db("reading the parked streams"))?;
        blocked = still.into_iter().collect();
    }
    let fresh: Vec<_> = messages
        .iter()
        .zip(&decoded)
        .filter(|(m, _)| m.offset >= next_offset)
        .collect();
    let mut outcome = Outcome {
        skipped: (messages.len() - fresh.len()) as u64,
        ..Outcome::default()
    };
    let Some(&(last, _)) = fresh.last() else {
        return Ok(outcome);
    };
    let new_next = last.offset + 1;

    let mut changed: HashSet<Stream> = HashSet::new();
    let mut parked: Vec<(&Message, &Stream, Option<i64>, bool, String)> = Vec::new();
    let mut ignored: BTreeMap<(&str, i32, &str), i64> = BTreeMap::new();
    for &(message, (stream, item)) in &fresh {
        if blocked.contains(stream) {
            let sequence = match item {
                Decoded::Event(e) => Some(e.sequence as i64),
                Decoded::Ignored(sequence, ..) => Some(*sequence),
                Decoded::Poison(_, sequence) => *sequence,
            };
            let reason = "parked behind an earlier dead-lettered event of its stream".to_owned();
            parked.push((message, stream, sequence, false, reason));
            continue;
        }
        let envelope = match item {
            Decoded::Event(envelope) => envelope,
            // Skipped unread, by policy: its position is taken like an
            // applied event's (duplicates skipped, gaps parked).
            Decoded::Ignored(sequence, event_type, version, why) => {
                let last = last_sequence.get(stream).copied().unwrap_or(0);
                if *sequence <= last {
                    outcome.skipped += 1;
                } else if *sequence > last + 1 {
                    let reason = format!(
                        "sequence gap: expected {} of {}/{}, got {sequence}",
                        last + 1,
                        stream.0,
                        stream.1
                    );
                    parked.push((message, stream, Some(*sequence), true, reason));
                    blocked.insert(stream.clone());
                } else {
                    outcome.ignored += 1;
                    *ignored
                        .entry((event_type.as_str(), *version, *why))
                        .or_insert(0) += 1;
                    last_sequence.insert(stream.clone(), *sequence);
                    changed.insert(stream.clone());
                }
                continue;
            }
            // Already applied (a republished duplicate that no longer
            // decodes, say after a variant was removed): skipped, never a
            // reason to park an up-to-date stream.
            Decoded::Poison(_, Some(sequence))
                if *sequence <= last_sequence.get(stream).copied().unwrap_or(0) =>
            {
                outcome.skipped += 1;
                continue;
            }
            Decoded::Poison(reason, sequence) => {
                parked.push((message, stream, *sequence, true, reason.clone()));
                blocked.insert(stream.clone());
                continue;
            }
        };
        let sequence = envelope.sequence as i64;
        let last = last_sequence.get(stream).copied().unwrap_or(0);
        if sequence <= last {
            outcome.skipped += 1;
            continue;
        }
        if sequence > last + 1 {
            let reason = format!(
                "sequence gap: expected {} of {}/{}, got {sequence}",
                last + 1,
                stream.0,
                stream.1
            );
            parked.push((message, stream, Some(sequence), true, reason));
            blocked.insert(stream.clone());
            continue;
        }
        let span = tracing::debug_span!(
            "tidings.projection.apply",
            projection = name,
            event_id = %envelope.event_id,
            event_type = envelope.event_type,
            aggregate_id = envelope.aggregate_id,
            sequence = envelope.sequence,
            correlation_id = envelope.correlation_id.as_deref(),
            causation_id = envelope.causation_id.as_deref()
        );
        // A handler that panics on an event must not take the partition
        // down: its panic makes the event poison. In careful mode (after a
        // poison event in this batch) each event runs in a savepoint, so a
        // refusal is set aside at once instead of restarting the batch: a
        // batch costs at most two passes, whatever the number of refusals.
        let refusal = if careful {
            let mut savepoint = sqlx::Connection::begin(&mut *tx)
                .await
                .map_err(db("creating a savepoint"))?;
            let refusal = apply_one(projection, &mut savepoint, envelope, span).await?;
            if refusal.is_none() {
                savepoint
                    .commit()
                    .await
                    .map_err(db("releasing a savepoint"))?;
            } else {
                savepoint
                    .rollback()
                    .await
                    .map_err(db("rolling back a savepoint"))?;
            }
            refusal
        } else {
            apply_one(projection, &mut tx, envelope, span).await?
        };
        match refusal {
            None => {
                outcome.applied += 1;
                last_sequence.insert(stream.clone(), sequence);
                changed.insert(stream.clone());
            }
            Some(reason) if careful => {
                parked.push((message, stream, Some(sequence), true, reason));
                blocked.insert(stream.clone());
            }
            Some(reason) => {
                return Err(Failure::Poison {
                    offset: message.offset,
                    reason,
                });
            }
        }
    }

    // Parked events, positions, checkpoint: all in this transaction.
    for (message, stream, sequence, dead_letter, reason) in &parked {
        sqlx::query(
            "INSERT INTO tidings_parked (projection, aggregate_type, aggregate_id, sequence, topic, partition, \
             \"offset\", dead_letter, reason, message_key, headers, value, raw_key, raw_headers) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
             ON CONFLICT (projection, topic, partition, \"offset\") DO NOTHING",
        )
        .bind(name)
        .bind(&stream.0)
        .bind(&stream.1)
        .bind(sequence)
        .bind(&message.topic)
        .bind(message.partition)
        .bind(message.offset)
        .bind(dead_letter)
        .bind(clean(reason))
        .bind(message.key.as_deref().map(|k| clean(&String::from_utf8_lossy(k))))
        .bind(sqlx::types::Json(message.readable_headers()))
        .bind(message.value.as_deref())
        .bind(message.key.as_deref())
        .bind(encode_headers(&message.headers))
        .execute(&mut *tx)
        .await
        .map_err(db("parking an event"))?;
        if *dead_letter {
            outcome.dead_lettered += 1;
        } else {
            outcome.parked += 1;
        }
    }
    if !ignored.is_empty() {
        let (mut types, mut versions, mut reasons, mut counts) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((event_type, version, reason), count) in &ignored {
            types.push(*event_type);
            versions.push(*version);
            reasons.push(*reason);
            counts.push(*count);
        }
        sqlx::query(
            "INSERT INTO tidings_projection_ignored AS i (projection, event_type, event_version, reason, events) \
             SELECT $1, t, v, r, n FROM UNNEST($2::text[], $3::int[], $4::text[], $5::bigint[]) AS u(t, v, r, n) \
             ON CONFLICT (projection, event_type, event_version, reason) \
             DO UPDATE SET events = i.events + EXCLUDED.events, last_at = now()",
        )
        .bind(name)
        .bind(&types)
        .bind(&versions)
        .bind(&reasons)
        .bind(&counts)
        .execute(&mut *tx)
        .await
        .map_err(db("counting the events skipped unread"))?;
    }
    let mut types = Vec::with_capacity(changed.len());
    let mut ids = Vec::with_capacity(changed.len());
    let mut sequences = Vec::with_capacity(changed.len());
    for stream in &changed {
        types.push(stream.0.as_str());
        ids.push(stream.1.as_str());
        sequences.push(last_sequence[stream]);
    }
    sqlx::query(SAVE_POSITIONS)
        .bind(name)
        .bind(&first.topic)
        .bind(first.partition)
        .bind(new_next)
        .bind(&types)
        .bind(&ids)
        .bind(&sequences)
        .execute(&mut *tx)
        .await
        .map_err(db("saving stream positions and the checkpoint"))?;

    // Dead letters go to their topic after this commits, from
    // tidings_parked (see `dead_letters`): no lock here waits on the broker.
    tx.commit().await.map_err(db("committing a batch"))?;
    outcome.next_offset = Some(new_next);
    Ok(outcome)
}

/// Why an event that does not decode is skipped unread under the
/// projection's policies, if it is.
fn skipped_unread(
    error: &crate::DecodeError,
    unknown_types: UnknownTypes,
    newer_versions: NewerVersions,
) -> Option<&'static str> {
    match error {
        crate::DecodeError::UnknownType { .. } if unknown_types == UnknownTypes::Skip => {
            Some(UNKNOWN_TYPE)
        }
        crate::DecodeError::FutureVersion { .. } if newer_versions == NewerVersions::Skip => {
            Some(NEWER_VERSION)
        }
        _ => None,
    }
}

/// Applies one event; `Some(why)` when the projection refuses it for good
/// (a permanent error or a panic).
async fn apply_one<P: Projection>(
    projection: &P,
    conn: &mut sqlx::PgConnection,
    envelope: &Envelope<P::Event>,
    span: tracing::Span,
) -> Result<Option<String>, Failure> {
    let applying = std::panic::AssertUnwindSafe(tracing::Instrument::instrument(
        projection.apply(conn, envelope),
        span,
    ));
    match futures::FutureExt::catch_unwind(applying).await {
        Ok(Ok(())) => Ok(None),
        Ok(Err(ApplyError::Transient(e))) => Err(Failure::Transient(e.to_string())),
        Ok(Err(ApplyError::Permanent(e))) => Ok(Some(e.to_string())),
        Err(panic) => Ok(Some(format!(
            "the projection panicked: {}",
            panic_message(&*panic)
        ))),
    }
}

/// The message of a caught panic.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}
