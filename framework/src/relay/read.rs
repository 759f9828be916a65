//! Reading the outbox: the rows of the owned lanes, in id order.
//!
//! # Guarantees
//!
//! - **No cursor, no skipped row.** Every read takes whatever rows of the
//!   owned lanes are in the outbox now, leaving out only the rows this relay
//!   has in flight or is deleting, so a row with a lower id that commits
//!   after higher ones is simply taken by the next read.
//! - **Held aggregates stay held.** Rows of an aggregate with a dead row
//!   (set aside by [`super::dead`]) are left out until the dead row is
//!   retried, so the aggregate's order holds across the quarantine.
//! - **One wake per burst.** After a notification the relay takes every one
//!   already received, so a burst of commits costs one read, not one each.
//! - **Topics per topic.** Topics are described first (one all-topics
//!   metadata request, which never auto-creates) and only missing ones are
//!   created; a topic that cannot be created holds only its own rows.
//! - **A bad row is one row's problem.** Stored headers are decoded per
//!   row, so a row that cannot be read as expected is set aside, not an
//!   error of every read.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

use rdkafka::message::{Header, OwnedHeaders};
use sqlx::PgPool;
use sqlx::postgres::PgListener;

use super::publish::Enqueue;
use super::{OUTBOX_CHANNEL, Relay, settle, within};
use crate::envelope::{
    HEADER_AGGREGATE_TYPE, HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_EVENT_VERSION,
};
use crate::error::{Error, Result};
use crate::kafka::ensure_topics_each;
use crate::store::OUTBOX_LANES;

/// One outbox row, as the relay reads it.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct Row {
    pub(super) id: i64,
    pub(super) topic: String,
    pub(super) message_key: String,
    pub(super) aggregate_type: String,
    pub(super) aggregate_id: String,
    pub(super) event_id: uuid::Uuid,
    pub(super) event_type: Option<String>,
    pub(super) event_version: Option<i32>,
    /// Only on rows written before the header columns existed.
    pub(super) headers: Option<sqlx::types::Json<serde_json::Value>>,
    pub(super) envelope: String,
}

/// An aggregate, as the relay tracks failures.
pub(super) type Stream = (String, String);

impl Row {
    pub(super) fn stream(&self) -> Stream {
        (self.aggregate_type.clone(), self.aggregate_id.clone())
    }

    /// The message headers: the routing fields of the envelope. Fails for
    /// a row whose stored headers are not an object of strings.
    pub(super) fn headers(&self) -> std::result::Result<OwnedHeaders, String> {
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
            let Some(map) = stored.as_object() else {
                return Err("its stored headers are not a JSON object".into());
            };
            for (key, value) in map {
                let Some(value) = value.as_str() else {
                    return Err(format!("its stored header `{key}` is not a string"));
                };
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
        }
        Ok(headers)
    }
}

/// The ids as an `int8multirange` literal: `{[1,5001),[5003,5004)}`.
pub(super) fn multirange(ids: &mut [i64]) -> String {
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

/// Reads up to `size` rows of `lanes` in id order, leaving out `busy` (an
/// `int8multirange`, cast once per statement) and the rows of held
/// aggregates.
///
/// A relay that owns only some lanes first finds where its rows start (the
/// lowest free id of each lane, one probe of the `(lane, id)` index per
/// lane) and scans in id order from there, so other lanes' backlog ahead
/// of its rows is never walked, and a deleted head not yet vacuumed is
/// skipped by the index. What the scan still passes over are other lanes'
/// rows interleaved with its own: rows written at the same time, not the
/// backlog. That read runs in a transaction of its own with the plans that
/// would read a whole lane or table (bitmap and sequential scans, sorts,
/// hash joins) turned off, so stale statistics about the lanes after a
/// burst cannot make one read fetch and sort a deep backlog. A relay that
/// owns every lane reads with one plain statement (a round trip instead of
/// four: 0.5 ms of an idle relay's commit-to-produced latency): its filter
/// on the lanes selects every row, and the planner scales a stale row count
/// with the table's current size, so its ordered scan stays the cheapest.
pub(super) async fn read_rows(
    pool: PgPool,
    lanes: Vec<i32>,
    size: i64,
    busy: String,
) -> Result<Vec<Row>> {
    if lanes.len() >= OUTBOX_LANES as usize {
        return sqlx::query_as(READ_ALL)
            .bind(&lanes)
            .bind(size)
            .bind(busy)
            .fetch_all(&pool)
            .await
            .map_err(Error::db("reading the outbox"));
    }
    let mut tx = pool
        .begin()
        .await
        .map_err(Error::db("reading the outbox"))?;
    let conn: &mut sqlx::PgConnection = &mut tx;
    sqlx::query(
        "SELECT set_config('enable_bitmapscan', 'off', true), set_config('enable_sort', 'off', true), \
         set_config('enable_hashjoin', 'off', true), set_config('enable_seqscan', 'off', true)",
    )
    .execute(&mut *conn)
    .await
    .map_err(Error::db("reading the outbox"))?;
    let rows = sqlx::query_as(READ_FROM_START)
        .bind(&lanes)
        .bind(size)
        .bind(busy)
        .fetch_all(&mut *conn)
        .await
        .map_err(Error::db("reading the outbox"))?;
    tx.commit().await.map_err(Error::db("reading the outbox"))?;
    Ok(rows)
}

/// The read of a relay that owns some lanes: from the lowest free id of
/// its lanes.
const READ_FROM_START: &str = "WITH busy AS MATERIALIZED (SELECT $3::int8multirange AS ids), \
     start AS (SELECT min(f.id) AS id FROM unnest($1::int4[]) AS l(lane), LATERAL ( \
         SELECT o.id FROM tidings_outbox o WHERE o.lane = l.lane \
         AND NOT ((SELECT ids FROM busy) @> o.id) ORDER BY o.id LIMIT 1) f) \
     SELECT id, topic, message_key, aggregate_type, aggregate_id, event_id, event_type, \
     event_version, headers, envelope FROM tidings_outbox o \
     WHERE o.id >= (SELECT id FROM start) AND lane = ANY($1) AND NOT ((SELECT ids FROM busy) @> id) \
     AND NOT EXISTS (SELECT 1 FROM tidings_outbox_dead d \
                     WHERE d.aggregate_type = o.aggregate_type AND d.aggregate_id = o.aggregate_id) \
     ORDER BY id LIMIT $2";

/// The read of a relay that owns every lane: no other lane's rows can be
/// ahead of its own.
const READ_ALL: &str = "SELECT id, topic, message_key, aggregate_type, aggregate_id, event_id, \
     event_type, event_version, headers, envelope FROM tidings_outbox o \
     WHERE lane = ANY($1) AND NOT ((SELECT $3::int8multirange) @> id) \
     AND NOT EXISTS (SELECT 1 FROM tidings_outbox_dead d \
                     WHERE d.aggregate_type = o.aggregate_type AND d.aggregate_id = o.aggregate_id) \
     ORDER BY id LIMIT $2";

/// Reads one batch as the relay would, without publishing or marking
/// anything: for measuring the read (the benchmark program). Returns the
/// rows read.
#[doc(hidden)]
pub async fn read_batch_for_measurement(pool: &PgPool, lanes: &[i32], size: i64) -> Result<usize> {
    Ok(read_rows(pool.clone(), lanes.to_vec(), size, "{}".into())
        .await?
        .len())
}

impl Relay {
    pub(super) async fn listen(&mut self) -> Option<PgListener> {
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
    pub(super) async fn read_and_enqueue(&mut self) -> Result<bool> {
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
        self.last_read_rows = rows.len();
        tracing::Span::current().record("rows", rows.len());
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

    /// Makes sure the batch's topics exist, creating missing ones when
    /// configured to (each topic on its own: one that cannot be created
    /// holds only its own rows). Returns the topics that are not available,
    /// with why.
    async fn ensure_topics(&mut self, rows: &[Row]) -> HashMap<String, Error> {
        let mut unavailable = HashMap::new();
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
pub(super) async fn wait_notification(listener: &mut Option<PgListener>) -> bool {
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
