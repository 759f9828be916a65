//! Loading streams and snapshots.

use sqlx::{PgConnection, PgPool, Row};

use crate::aggregate::Aggregate;
use crate::envelope::RawEnvelope;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::store::Loaded;
use crate::store::cache::Head;

const EVENT_COLUMNS: &str = "event_id, aggregate_type, aggregate_id, sequence, event_type, \
    event_version, recorded_at, correlation_id, causation_id, metadata, payload";

fn envelope_from_row(row: &sqlx::postgres::PgRow) -> Result<RawEnvelope, sqlx::Error> {
    let metadata: serde_json::Value = row.try_get("metadata")?;
    Ok(RawEnvelope {
        event_type: row.try_get("event_type")?,
        event_version: row.try_get::<i32, _>("event_version")? as u32,
        event_id: row.try_get("event_id")?,
        timestamp: row.try_get("recorded_at")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get::<i64, _>("sequence")? as u64,
        correlation_id: row.try_get("correlation_id")?,
        causation_id: row.try_get("causation_id")?,
        metadata: serde_json::from_value(metadata).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        payload: row.try_get("payload")?,
    })
}

/// Reads the events of a stream after `after` (exclusive), in order, as stored.
pub(crate) async fn read_events(
    conn: &mut PgConnection,
    aggregate_type: &str,
    aggregate_id: &str,
    after: u64,
) -> Result<Vec<RawEnvelope>> {
    let what = || format!("loading {aggregate_type}/{aggregate_id}");
    let rows = sqlx::query(&format!(
        "SELECT {EVENT_COLUMNS} FROM tidings_events \
         WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3 ORDER BY sequence"
    ))
    .bind(aggregate_type)
    .bind(aggregate_id)
    .bind(after as i64)
    .fetch_all(conn)
    .await
    .map_err(Error::db(what()))?;
    rows.iter()
        .map(|row| envelope_from_row(row).map_err(Error::db(what())))
        .collect()
}

pub(crate) async fn read_stream(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Vec<RawEnvelope>> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(Error::db("acquiring a connection"))?;
    read_events(&mut conn, aggregate_type, aggregate_id, 0).await
}

/// The latest usable snapshot of a stream: `None` when there is none, when it
/// is of another snapshot version, or when it does not decode.
async fn snapshot<A: Aggregate>(conn: &mut PgConnection, id: &str) -> Result<Option<(A, u64)>> {
    if A::SNAPSHOT_EVERY == 0 {
        return Ok(None);
    }
    let row: Option<(i64, i32, serde_json::Value)> = sqlx::query_as(
        "SELECT sequence, snapshot_version, state FROM tidings_snapshots \
         WHERE aggregate_type = $1 AND aggregate_id = $2",
    )
    .bind(A::TYPE)
    .bind(id)
    .fetch_optional(conn)
    .await
    .map_err(Error::db(format!(
        "loading the snapshot of {}/{id}",
        A::TYPE
    )))?;
    let Some((sequence, version, state)) = row else {
        return Ok(None);
    };
    if version as u32 != A::SNAPSHOT_VERSION {
        tracing::debug!(
            aggregate_type = A::TYPE,
            aggregate_id = id,
            stored = version,
            current = A::SNAPSHOT_VERSION,
            "ignoring a snapshot of another version"
        );
        return Ok(None);
    }
    match serde_json::from_value::<A>(state) {
        Ok(state) => Ok(Some((state, sequence as u64))),
        Err(error) => {
            tracing::warn!(
                aggregate_type = A::TYPE,
                aggregate_id = id,
                %error,
                "ignoring a snapshot that does not decode; replaying the stream"
            );
            Ok(None)
        }
    }
}

pub(crate) async fn load<A: Aggregate>(conn: &mut PgConnection, id: &str) -> Result<Loaded<A>> {
    let snapshot = snapshot::<A>(conn, id).await?;
    let from_snapshot = snapshot.is_some();
    let (state, sequence) = snapshot.unwrap_or_default();
    let mut loaded = Loaded {
        state,
        sequence,
        from_snapshot,
        head_event: None,
    };
    apply_all(
        &mut loaded,
        id,
        read_events(conn, A::TYPE, id, sequence).await?,
    )?;
    Ok(loaded)
}

/// Brings a state known at `head` up to date by reading only the events
/// after it, the way a conflict's retry does: a retry on a hot aggregate
/// reads what it missed, not the whole stream. The event at `head` is read
/// too and must still be the one the state was built from; if the history
/// does not go through it (a commit lost in a failover), the stream is
/// loaded whole.
pub(crate) async fn catch_up<A: Aggregate>(
    conn: &mut PgConnection,
    id: &str,
    state: A,
    head: Head,
) -> Result<Loaded<A>> {
    let mut envelopes = read_events(conn, A::TYPE, id, head.sequence.saturating_sub(1)).await?;
    let through_head = envelopes
        .first()
        .is_some_and(|e| e.sequence == head.sequence && e.event_id == head.event_id);
    if !through_head {
        return load::<A>(conn, id).await;
    }
    envelopes.remove(0);
    let mut loaded = Loaded {
        state,
        sequence: head.sequence,
        from_snapshot: false,
        head_event: Some(head.event_id),
    };
    apply_all(&mut loaded, id, envelopes)?;
    Ok(loaded)
}

/// Applies stored envelopes, in order, to a loaded state: each stored
/// event as what it reads as today (one event, a split's several, or none
/// for a retired type); the loaded sequence counts stored events.
fn apply_all<A: Aggregate>(
    loaded: &mut Loaded<A>,
    id: &str,
    envelopes: Vec<RawEnvelope>,
) -> Result<()> {
    for envelope in envelopes {
        let events = A::Event::read(
            &envelope.event_type,
            envelope.event_version,
            envelope.payload,
        )
        .map_err(|source| Error::Decode {
            context: format!(
                "loading {}/{id}: event {} (sequence {})",
                A::TYPE,
                envelope.event_id,
                envelope.sequence
            ),
            source,
        })?;
        for event in events {
            loaded.state.apply(&event);
        }
        loaded.sequence = envelope.sequence;
        loaded.head_event = Some(envelope.event_id);
    }
    Ok(())
}

pub(crate) async fn save_snapshot<A: Aggregate>(
    conn: &mut PgConnection,
    id: &str,
    sequence: u64,
    state: &A,
) -> Result<()> {
    // Snapshots are an optimisation: a state that does not serialize is
    // logged and the command goes on without one.
    let state = match serde_json::to_value(state) {
        Ok(state) => state,
        Err(error) => {
            tracing::warn!(
                aggregate_type = A::TYPE,
                aggregate_id = id,
                %error,
                "not snapshotting a state that does not serialize"
            );
            return Ok(());
        }
    };
    sqlx::query(
        "INSERT INTO tidings_snapshots (aggregate_type, aggregate_id, sequence, snapshot_version, state) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE \
         SET sequence = EXCLUDED.sequence, snapshot_version = EXCLUDED.snapshot_version, \
             state = EXCLUDED.state, taken_at = now() \
         WHERE tidings_snapshots.sequence < EXCLUDED.sequence \
            OR tidings_snapshots.snapshot_version <> EXCLUDED.snapshot_version",
    )
    .bind(A::TYPE)
    .bind(id)
    .bind(sequence as i64)
    .bind(A::SNAPSHOT_VERSION as i32)
    .bind(state)
    .execute(conn)
    .await
    .map_err(Error::db(format!("saving the snapshot of {}/{id}", A::TYPE)))?;
    Ok(())
}
