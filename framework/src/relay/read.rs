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
//! - **A bad row is one row's problem.** Stored headers are decoded per
//!   row, so a row that cannot be read as expected is set aside, not an
//!   error of every read.

use std::fmt::Write as _;

use rdkafka::message::{Header, OwnedHeaders};
use sqlx::PgPool;

use crate::envelope::{
    HEADER_AGGREGATE_TYPE, HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_EVENT_VERSION,
};
use crate::error::{Error, Result};

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
pub(super) async fn read_rows(
    pool: PgPool,
    lanes: Vec<i32>,
    size: i64,
    busy: String,
) -> Result<Vec<Row>> {
    sqlx::query_as(
        "SELECT id, topic, message_key, aggregate_type, aggregate_id, event_id, event_type, \
         event_version, headers, envelope \
         FROM tidings_outbox o WHERE lane = ANY($1) AND NOT ((SELECT $3::int8multirange) @> id) \
         AND NOT EXISTS (SELECT 1 FROM tidings_outbox_dead d \
                         WHERE d.aggregate_type = o.aggregate_type AND d.aggregate_id = o.aggregate_id) \
         ORDER BY id LIMIT $2",
    )
    .bind(&lanes)
    .bind(size)
    .bind(busy)
    .fetch_all(&pool)
    .await
    .map_err(Error::db("reading the outbox"))
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
