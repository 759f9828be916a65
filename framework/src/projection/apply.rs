//! Applying one batch of one partition in one transaction.
//!
//! # Guarantees
//!
//! - **Exactly once.** The read model's change, the streams' positions and
//!   the partition's checkpoint commit together; the checkpoint and the
//!   batch's streams are locked first, so whatever else runs (a zombie
//!   instance with the same partition, another partition carrying the same
//!   stream, a redrive) waits or finds its work done.
//! - **The projection decides nothing about order.** It is called with what
//!   the plan ([`super::plan`]) kept, as one batch; if it refuses the batch
//!   naming an event, that event is dead-lettered and the batch planned
//!   again; if it cannot name one (or panics), the batch is applied one
//!   event at a time, each in a savepoint, and the refused ones are
//!   dead-lettered with what follows them in their streams parked.
//! - **Round trips.** A batch costs `BEGIN`, one statement locking the
//!   checkpoint and the streams, the projection's statements, one saving
//!   the positions and the checkpoint, and `COMMIT`; parked events and
//!   events skipped unread add a statement each when there are any. A
//!   batch whose messages are all below the checkpoint writes nothing; a
//!   stream's row is written once per batch, a new stream's at its planned
//!   position.
//! - **A new stream is not looked up.** A stream whose first message in the
//!   batch is its first event is taken to be new and its row inserted
//!   without a lookup; if the row exists (a republished first event, a
//!   stream another transaction is creating), the insert fails before the
//!   projection is called and the batch is planned again with every
//!   stream's position read. Nothing is decided on the guess.
//! - **A checkpoint that went back is not read past.** A checkpoint found
//!   behind the one the worker committed last (the database lost its last
//!   commits, failed over to a replica that had not received them, or came
//!   back from a backup) fails the batch before anything is planned; the
//!   partition is read again from the checkpoint, so the events in between
//!   are applied again, not taken for gaps.

use std::collections::HashMap;

use sqlx::PgConnection;

use crate::error::Error;
use crate::projection::plan::{
    Action, Decoded, Map, Message, PARKED_BEHIND, Planned, Set, Stream, clean, decode_all, plan,
    positions,
};
use crate::projection::{
    Batch, BatchError, NewerVersions, Projection, UnknownTypes, panic_message,
};

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
    /// The projection refused the batch without naming the event (or
    /// panicked): retry the batch at once, one event at a time.
    Locate(String),
    /// This instance's generation was replaced by a replay: stop.
    Stale,
    /// The checkpoint is behind what this worker committed (the database
    /// lost its last commits, or came back from a backup): the partition is
    /// read again from the checkpoint.
    Behind {
        /// The checkpoint found.
        checkpoint: i64,
    },
    /// A stream taken to be new has a row (made earlier, or by another
    /// transaction meanwhile): plan the batch again at once, reading every
    /// stream's position.
    Claimed(String),
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure::Transient(error.to_string())
    }
}

/// In one round trip: locks the projection's generation (shared) and the
/// partition's checkpoint, returning its next offset, and only when this
/// instance's generation is current; then, of the streams that have a
/// message at or past the checkpoint, locks those marked to be read and
/// reads their last sequences (none for a new stream, whose row [`CLAIM`]
/// creates), and tells which of them all are parked. It returns the streams
/// read and the parked ones (others past the checkpoint are new, and the
/// caller knows them). No row: the generation was replaced. One row with
/// no stream: no stream to report (every message below the checkpoint, or
/// every stream taken to be new and none parked).
///
/// A stream not marked to be read is taken to be new: the batch's first
/// message of it is its first event. [`CLAIM`] creates its row with a plain
/// `INSERT`, which fails if the row exists (made earlier, or by another
/// transaction meanwhile); nothing else is written before that, and the
/// batch is then planned again with every stream read. So a new stream
/// costs one index insertion, not a probe and a speculative insertion.
///
/// The batch first takes the projection's advisory lock in shared mode: a
/// replay takes it exclusively, and a heavyweight lock's queue is first come,
/// first served, so a replay waits for the batches in flight only, never for
/// a steady stream of overlapping ones (row locks would starve it).
///
/// Rows that exist are locked `FOR UPDATE` (no new row version); the
/// checkpoint is created only when missing. A checkpoint created by
/// another transaction after this statement's snapshot is not seen by the
/// `FOR UPDATE` scan, and its insert then conflicts: `DO UPDATE` locks it and
/// returns its latest version (a stream created so is caught by [`CLAIM`]).
/// Each stream row is reached through its key
/// (a lateral scan per key), so a generic plan cached while the table was
/// small cannot become a hash join over every stream of the projection;
/// streams are locked in key order (the caller sorts them). Streams are
/// looked up among the parked only when the projection has parked events.
const BEGIN_BATCH: &str = "WITH a AS ( \
    SELECT pg_advisory_xact_lock_shared(hashtextextended('tidings.projection.' || $1, 0))), \
    g AS ( \
    SELECT p.generation FROM tidings_projections p, a WHERE p.name = $1 FOR SHARE OF p), \
    held AS ( \
    SELECT k.next_offset FROM tidings_checkpoints k \
    WHERE k.projection = $1 AND k.topic = $2 AND k.partition = $3 AND (SELECT generation FROM g) = $4 \
    FOR UPDATE), \
    made AS ( \
    INSERT INTO tidings_checkpoints (projection, topic, partition, next_offset) \
    SELECT $1, $2, $3, 0 FROM g WHERE g.generation = $4 AND NOT EXISTS (SELECT 1 FROM held) \
    ON CONFLICT (projection, topic, partition) DO UPDATE SET next_offset = tidings_checkpoints.next_offset \
    RETURNING next_offset), \
    c AS (SELECT next_offset FROM held UNION ALL SELECT next_offset FROM made), \
    wanted AS ( \
    SELECT u.t, u.i, u.r, u.n FROM UNNEST($5::text[], $6::text[], $7::bigint[], $8::bool[]) \
    WITH ORDINALITY AS u(t, i, o, r, n) \
    WHERE u.o >= (SELECT next_offset FROM c)), \
    locked AS ( \
    SELECT w.t, w.i, w.n, w.r, s.last_sequence FROM wanted w LEFT JOIN LATERAL ( \
    SELECT s.last_sequence FROM tidings_projection_streams s \
    WHERE w.r AND s.projection = $1 AND s.aggregate_type = w.t AND s.aggregate_id = w.i FOR UPDATE) s ON true), \
    any_parked AS (SELECT EXISTS (SELECT 1 FROM tidings_parked p WHERE p.projection = $1) AS yes), \
    marked AS ( \
    SELECT l.t, l.i, l.n, l.r, l.last_sequence, (SELECT yes FROM any_parked) AND coalesce(( \
    SELECT true FROM tidings_parked p WHERE p.projection = $1 \
    AND p.aggregate_type = l.t AND p.aggregate_id = l.i LIMIT 1), false) AS parked FROM locked l) \
    SELECT c.next_offset, m.t, m.i, m.last_sequence, coalesce(m.parked, false) \
    FROM c LEFT JOIN marked m ON m.r OR m.parked ORDER BY m.n";

/// After planning, before the projection runs: creates the rows of the
/// batch's new streams at their planned positions (a plain `INSERT`: a row
/// that exists, made before or by another transaction meanwhile, fails the
/// statement with a unique violation, and the caller plans the batch again
/// reading every stream), moves the existing streams to theirs and
/// advances the checkpoint, in one round trip. Each stream row is written
/// once per batch, and every new stream is locked (by its insert) before
/// the projection writes anything.
const CLAIM: &str = "WITH created AS ( \
    INSERT INTO tidings_projection_streams (projection, aggregate_type, aggregate_id, last_sequence) \
    SELECT $1, t, i, seq FROM UNNEST($5::text[], $6::text[], $7::bigint[]) AS u(t, i, seq)), \
    moved AS ( \
    INSERT INTO tidings_projection_streams (projection, aggregate_type, aggregate_id, last_sequence) \
    SELECT $1, t, i, seq FROM UNNEST($8::text[], $9::text[], $10::bigint[]) AS u(t, i, seq) \
    ON CONFLICT (projection, aggregate_type, aggregate_id) DO UPDATE SET last_sequence = EXCLUDED.last_sequence), \
    checkpoint AS ( \
    UPDATE tidings_checkpoints SET next_offset = $4, updated_at = now() \
    WHERE projection = $1 AND topic = $2 AND partition = $3) \
    SELECT 1";

/// Which of the given streams have parked events (read after the batch's
/// locks are granted).
const STILL_PARKED: &str = "SELECT s.t, s.i FROM UNNEST($2::text[], $3::text[]) AS s(t, i) \
    WHERE EXISTS (SELECT 1 FROM tidings_parked p WHERE p.projection = $1 \
    AND p.aggregate_type = s.t AND p.aggregate_id = s.i)";

/// Saves stream positions that changed after [`CLAIM`] (a refusal found
/// one event at a time) and the checkpoint, in one round trip.
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

/// A row of [`BEGIN_BATCH`]: the next offset, then a stream (type, id,
/// last sequence, whether parked), absent when no stream was locked.
type LockedRow = (i64, Option<String>, Option<String>, Option<i64>, bool);

/// Parks events set-based: one statement for all of a batch's.
const PARK: &str = "INSERT INTO tidings_parked (projection, aggregate_type, aggregate_id, sequence, topic, \
    partition, \"offset\", dead_letter, reason, message_key, headers, value, raw_key, raw_headers) \
    SELECT $1, t, i, s, $2, $3, o, d, r, k, h::jsonb, v, rk, rh \
    FROM UNNEST($4::text[], $5::text[], $6::bigint[], $7::bigint[], $8::bool[], $9::text[], \
    $10::text[], $11::text[], $12::bytea[], $13::bytea[], $14::bytea[]) AS u(t, i, s, o, d, r, k, h, v, rk, rh) \
    ON CONFLICT (projection, topic, partition, \"offset\") DO NOTHING";

/// Counts the events skipped unread, per type, version and reason.
const COUNT_IGNORED: &str = "INSERT INTO tidings_projection_ignored AS i (projection, event_type, event_version, reason, events) \
    SELECT $1, t, v, r, n FROM UNNEST($2::text[], $3::int[], $4::text[], $5::bigint[]) AS u(t, v, r, n) \
    ON CONFLICT (projection, event_type, event_version, reason) \
    DO UPDATE SET events = i.events + EXCLUDED.events, last_at = now()";

/// How a batch is applied.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Mode {
    /// One event at a time, each in a savepoint (after the projection
    /// refused this batch without naming the event, or more than once).
    pub(crate) careful: bool,
    /// Every stream's position read, none taken to be new (after a stream
    /// taken to be new was found to have a row).
    pub(crate) read_all: bool,
}

/// Applies `messages` (one partition, in offset order) in one transaction
/// on `conn`. `committed` is the checkpoint this worker's last batch
/// committed, or else the one its partition was sought to: a checkpoint
/// found behind it fails the
/// batch with [`Failure::Behind`] before anything is decided, since the
/// messages in between would otherwise be taken for gaps.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn apply_messages<P: Projection>(
    conn: &mut PgConnection,
    projection: &P,
    generation: i32,
    committed: Option<i64>,
    messages: &[Message],
    poison: &HashMap<i64, String>,
    mode: Mode,
    policies: (UnknownTypes, NewerVersions),
) -> Result<Outcome, Failure> {
    let Some(first) = messages.first() else {
        return Ok(Outcome::default());
    };
    let name = projection.name();
    let db = |what: &str| Error::db(format!("projection {name}: {what}"));

    // Decode everything first (no transaction is open meanwhile); a poison
    // message is known by its offset.
    let decoded: Vec<(Stream, Decoded<P::Event>)> = decode_all(messages, poison, policies);

    // Each stream once, in key order, with the last offset it has here and
    // whether its position is read: one whose first message here is its
    // first event is taken to be new (see BEGIN_BATCH).
    let mut last_offset: Map<&Stream, (i64, bool)> = Map::default();
    for (message, (stream, item)) in messages.iter().zip(&decoded) {
        last_offset
            .entry(stream)
            .and_modify(|(offset, _)| *offset = message.offset)
            .or_insert((message.offset, mode.read_all || item.sequence() != Some(1)));
    }
    let mut keys: Vec<(&Stream, (i64, bool))> = last_offset.into_iter().collect();
    keys.sort();
    let types: Vec<&str> = keys.iter().map(|(s, _)| s.0.as_str()).collect();
    let ids: Vec<&str> = keys.iter().map(|(s, _)| s.1.as_str()).collect();
    let offsets: Vec<i64> = keys.iter().map(|(_, (o, _))| *o).collect();
    let read: Vec<bool> = keys.iter().map(|(_, (_, r))| *r).collect();

    let mut tx = sqlx::Connection::begin(&mut *conn)
        .await
        .map_err(db("beginning a batch"))?;
    let rows: Vec<LockedRow> = sqlx::query_as(BEGIN_BATCH)
        .bind(name)
        .bind(&*first.topic)
        .bind(first.partition)
        .bind(generation)
        .bind(&types)
        .bind(&ids)
        .bind(&offsets)
        .bind(&read)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("locking the checkpoint and the streams"))?;
    let Some(&(next_offset, ..)) = rows.first() else {
        return Err(Failure::Stale);
    };
    if committed.is_some_and(|committed| next_offset < committed) {
        return Err(Failure::Behind {
            checkpoint: next_offset,
        });
    }
    let mut last_sequence: Map<Stream, i64> =
        Map::with_capacity_and_hasher(rows.len(), Default::default());
    let mut blocked: Set<Stream> = Set::default();
    for (_, kind, id, sequence, parked) in rows {
        let (Some(kind), Some(id)) = (kind, id) else {
            continue;
        };
        let stream = (kind, id);
        if parked {
            blocked.insert(stream.clone());
        }
        if let Some(sequence) = sequence {
            last_sequence.insert(stream, sequence);
        }
    }
    // The new streams (a message past the checkpoint, no position), in key
    // order: the order their rows are created in.
    let new_streams: Vec<&Stream> = keys
        .iter()
        .filter(|(stream, (offset, _))| {
            *offset >= next_offset && !last_sequence.contains_key(*stream)
        })
        .map(|(stream, _)| *stream)
        .collect();
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
        // Nothing past the checkpoint: nothing was written; roll back.
        return Ok(outcome);
    };
    let new_next = last.offset + 1;

    let mut planned = plan(&fresh, &last_sequence, &mut blocked);
    let (claimed, _) = positions(&planned);
    claim(
        &mut tx,
        name,
        first,
        new_next,
        &new_streams,
        &last_sequence,
        &claimed,
    )
    .await?;
    let span = tracing::debug_span!(
        "tidings.projection.batch",
        projection = name,
        topic = &*first.topic,
        partition = first.partition,
        events = tracing::field::Empty,
    );
    if mode.careful {
        apply_one_by_one(projection, &mut tx, &mut planned, &span).await?;
    } else {
        // The batch's events, each with the planned message it came from
        // (a split's events share theirs).
        let mut ready: Vec<usize> = Vec::new();
        let mut events = Vec::new();
        for (i, p) in planned.iter().enumerate() {
            if let Action::Apply(envelopes) = p.action {
                ready.extend(std::iter::repeat_n(i, envelopes.len()));
                events.extend(envelopes);
            }
        }
        if !ready.is_empty() {
            let batch = Batch::new(events);
            span.record("events", batch.len());
            for envelope in batch.events() {
                event_span(name, envelope, &span);
            }
            match call(projection, &mut tx, &batch, span.clone()).await {
                Ok(()) => {}
                Err(Refusal::Transient(error)) => return Err(Failure::Transient(error)),
                Err(Refusal::At(index, reason)) => {
                    return Err(Failure::Poison {
                        offset: planned[ready[index]].message.offset,
                        reason,
                    });
                }
                Err(Refusal::Unknown(reason)) => return Err(Failure::Locate(reason)),
            }
        }
    }

    // Parked events, positions, checkpoint: all in this transaction.
    let (positions, ignored) = positions(&planned);
    park(&mut tx, name, first, &planned, &mut outcome)
        .await
        .map_err(db("parking events"))?;
    outcome.applied = planned
        .iter()
        .filter(|p| matches!(p.action, Action::Apply(_)))
        .count() as u64;
    outcome.skipped += planned
        .iter()
        .filter(|p| matches!(p.action, Action::Skip))
        .count() as u64;
    if !ignored.is_empty() {
        let (mut types, mut versions, mut reasons, mut counts) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((event_type, version, reason), count) in &ignored {
            types.push(*event_type);
            versions.push(*version);
            reasons.push(*reason);
            counts.push(*count);
            outcome.ignored += *count as u64;
        }
        sqlx::query(COUNT_IGNORED)
            .bind(name)
            .bind(&types)
            .bind(&versions)
            .bind(&reasons)
            .bind(&counts)
            .execute(&mut *tx)
            .await
            .map_err(db("counting the events skipped unread"))?;
    }
    if mode.careful {
        // Refusals found one at a time leave their streams short of the
        // positions claimed: those are saved again.
        let (mut types, mut ids, mut sequences) = (Vec::new(), Vec::new(), Vec::new());
        for (stream, claimed) in &claimed {
            let now = positions
                .get(stream)
                .copied()
                .or_else(|| last_sequence.get(*stream).copied())
                .unwrap_or(0);
            if now != *claimed {
                types.push(stream.0.as_str());
                ids.push(stream.1.as_str());
                sequences.push(now);
            }
        }
        if !types.is_empty() {
            sqlx::query(SAVE_POSITIONS)
                .bind(name)
                .bind(&*first.topic)
                .bind(first.partition)
                .bind(new_next)
                .bind(&types)
                .bind(&ids)
                .bind(&sequences)
                .execute(&mut *tx)
                .await
                .map_err(db("saving stream positions and the checkpoint"))?;
        }
    }

    // Dead letters go to their topic after this commits, from
    // tidings_parked (see `dead_letters`): no lock here waits on the broker.
    tx.commit().await.map_err(db("committing a batch"))?;
    outcome.next_offset = Some(new_next);
    Ok(outcome)
}

/// Runs [`CLAIM`]: new streams created at their planned positions (0 when
/// nothing of theirs applies), existing streams moved, the checkpoint
/// advanced.
async fn claim(
    tx: &mut PgConnection,
    name: &str,
    first: &Message,
    new_next: i64,
    new_streams: &[&Stream],
    last_sequence: &Map<Stream, i64>,
    planned: &Map<&Stream, i64>,
) -> Result<(), Failure> {
    let db = |what: &str| Error::db(format!("projection {name}: {what}"));
    let (mut new_types, mut new_ids, mut new_sequences) = (Vec::new(), Vec::new(), Vec::new());
    for stream in new_streams {
        new_types.push(stream.0.as_str());
        new_ids.push(stream.1.as_str());
        new_sequences.push(planned.get(stream).copied().unwrap_or(0));
    }
    let mut moved: Vec<(&Stream, i64)> = planned
        .iter()
        .filter(|(stream, sequence)| last_sequence.get(**stream).is_some_and(|s| s != *sequence))
        .map(|(stream, sequence)| (*stream, *sequence))
        .collect();
    moved.sort();
    let types: Vec<&str> = moved.iter().map(|(s, _)| s.0.as_str()).collect();
    let ids: Vec<&str> = moved.iter().map(|(s, _)| s.1.as_str()).collect();
    let sequences: Vec<i64> = moved.iter().map(|(_, q)| *q).collect();
    let claimed = sqlx::query(CLAIM)
        .bind(name)
        .bind(&*first.topic)
        .bind(first.partition)
        .bind(new_next)
        .bind(&new_types)
        .bind(&new_ids)
        .bind(&new_sequences)
        .bind(&types)
        .bind(&ids)
        .bind(&sequences)
        .execute(&mut *tx)
        .await;
    match claimed {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e))
            if e.is_unique_violation() && e.table() == Some("tidings_projection_streams") =>
        {
            Err(Failure::Claimed(format!(
                "projection {name}: a stream taken to be new has a position already ({e}); the batch is planned again reading every stream"
            )))
        }
        Err(e) => Err(db("saving stream positions and the checkpoint")(e).into()),
    }
}

/// Careful mode: each event to apply as a batch of one in a savepoint; a
/// refused event becomes a dead letter, and what follows it in its stream
/// is parked behind it.
async fn apply_one_by_one<P: Projection>(
    projection: &P,
    tx: &mut PgConnection,
    planned: &mut [Planned<'_, P::Event>],
    span: &tracing::Span,
) -> Result<(), Failure> {
    let name = projection.name();
    let db = |what: &str| Error::db(format!("projection {name}: {what}"));
    let mut refused: Set<&Stream> = Set::default();
    for p in planned.iter_mut() {
        if refused.contains(p.stream) {
            p.action = Action::Park {
                dead_letter: false,
                reason: PARKED_BEHIND.to_owned(),
            };
            continue;
        }
        let Action::Apply(envelopes) = p.action else {
            continue;
        };
        let event = event_span(name, &envelopes[0], span);
        for part in &envelopes[1..] {
            event_span(name, part, span);
        }
        let mut savepoint = sqlx::Connection::begin(&mut *tx)
            .await
            .map_err(db("creating a savepoint"))?;
        let batch = Batch::new(envelopes.iter().collect());
        match call(projection, &mut savepoint, &batch, event).await {
            Ok(()) => savepoint
                .commit()
                .await
                .map_err(db("releasing a savepoint"))?,
            Err(Refusal::Transient(error)) => return Err(Failure::Transient(error)),
            Err(Refusal::At(_, reason) | Refusal::Unknown(reason)) => {
                savepoint
                    .rollback()
                    .await
                    .map_err(db("rolling back a savepoint"))?;
                p.action = Action::Park {
                    dead_letter: true,
                    reason,
                };
                refused.insert(p.stream);
            }
        }
    }
    Ok(())
}

/// The span of one event applied, a child of its batch's.
fn event_span<E>(
    name: &str,
    envelope: &crate::Envelope<E>,
    batch: &tracing::Span,
) -> tracing::Span {
    tracing::debug_span!(
        parent: batch,
        "tidings.projection.apply",
        projection = name,
        event_id = %envelope.event_id,
        event_type = envelope.event_type,
        aggregate_id = envelope.aggregate_id,
        sequence = envelope.sequence,
        correlation_id = envelope.correlation_id.as_deref(),
        causation_id = envelope.causation_id.as_deref()
    )
}

/// Writes the batch's parked events and dead letters, in one statement.
async fn park<E>(
    tx: &mut PgConnection,
    name: &str,
    first: &Message,
    planned: &[Planned<'_, E>],
    outcome: &mut Outcome,
) -> Result<(), sqlx::Error> {
    let mut rows = ParkRows::default();
    for p in planned {
        let Action::Park {
            dead_letter,
            reason,
        } = &p.action
        else {
            continue;
        };
        if *dead_letter {
            outcome.dead_lettered += 1;
        } else {
            outcome.parked += 1;
        }
        let m = p.message;
        rows.types.push(p.stream.0.as_str());
        rows.ids.push(p.stream.1.as_str());
        rows.sequences.push(p.sequence);
        rows.offsets.push(m.offset);
        rows.dead_letters.push(*dead_letter);
        rows.reasons.push(clean(reason));
        rows.keys
            .push(m.key().map(|k| clean(&String::from_utf8_lossy(k))));
        rows.headers
            .push(serde_json::to_string(&m.readable_headers()).unwrap_or_else(|_| "{}".to_owned()));
        rows.values.push(m.value());
        rows.raw_keys.push(m.key());
        rows.raw_headers.push(m.raw_headers());
    }
    if rows.types.is_empty() {
        return Ok(());
    }
    sqlx::query(PARK)
        .bind(name)
        .bind(&*first.topic)
        .bind(first.partition)
        .bind(&rows.types)
        .bind(&rows.ids)
        .bind(&rows.sequences)
        .bind(&rows.offsets)
        .bind(&rows.dead_letters)
        .bind(&rows.reasons)
        .bind(&rows.keys)
        .bind(&rows.headers)
        .bind(&rows.values)
        .bind(&rows.raw_keys)
        .bind(&rows.raw_headers)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The columns of a batch's parked rows.
#[derive(Default)]
struct ParkRows<'m> {
    types: Vec<&'m str>,
    ids: Vec<&'m str>,
    sequences: Vec<Option<i64>>,
    offsets: Vec<i64>,
    dead_letters: Vec<bool>,
    reasons: Vec<String>,
    keys: Vec<Option<String>>,
    headers: Vec<String>,
    values: Vec<Option<&'m [u8]>>,
    raw_keys: Vec<Option<&'m [u8]>>,
    raw_headers: Vec<&'m [u8]>,
}

/// How the projection's code refused a batch.
enum Refusal {
    Transient(String),
    /// The event at this index of the batch can never apply.
    At(usize, String),
    /// Something in the batch can never apply; which is not known.
    Unknown(String),
}

/// Calls the projection's `apply_batch`, a panic caught as a refusal that
/// names no event.
async fn call<P: Projection>(
    projection: &P,
    conn: &mut PgConnection,
    batch: &Batch<'_, P::Event>,
    span: tracing::Span,
) -> Result<(), Refusal> {
    let applying = std::panic::AssertUnwindSafe(tracing::Instrument::instrument(
        projection.apply_batch(conn, batch),
        span,
    ));
    match futures::FutureExt::catch_unwind(applying).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(BatchError::Transient(e))) => Err(Refusal::Transient(e.to_string())),
        Ok(Err(BatchError::Permanent { index, error })) if index < batch.len() => {
            Err(Refusal::At(index, error.to_string()))
        }
        Ok(Err(BatchError::Permanent { index, error })) => Err(Refusal::Unknown(format!(
            "{error} (the projection named event {index} of a batch of {})",
            batch.len()
        ))),
        Ok(Err(BatchError::Unattributed(e))) => Err(Refusal::Unknown(e.to_string())),
        Err(panic) => Err(Refusal::Unknown(format!(
            "the projection panicked: {}",
            panic_message(&*panic)
        ))),
    }
}
