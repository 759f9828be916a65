//! The one error type of tidings' infrastructure.
//!
//! Domain errors (an aggregate refusing a command) are never mixed into it:
//! [`crate::ExecuteError`] keeps them apart. Every message carries context,
//! e.g. "appending 3 events to order/ORD-123: …".

use crate::event::DecodeError;

/// `Result` with tidings' [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in the store, the relay, a projection or the configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another writer appended to the stream first (optimistic concurrency).
    #[error(
        "concurrency conflict on {aggregate_type}/{aggregate_id}: expected to append after sequence {expected}, the stream is at {actual}"
    )]
    Conflict {
        /// The aggregate type.
        aggregate_type: String,
        /// The aggregate id.
        aggregate_id: String,
        /// The sequence the writer had loaded.
        expected: u64,
        /// The sequence the stream had when the append was refused.
        actual: u64,
    },
    /// A database operation failed.
    #[cfg(feature = "postgres")]
    #[error("{context}: {source}")]
    Database {
        /// What was being done.
        context: String,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// Migrations could not be applied or are missing.
    #[cfg(feature = "postgres")]
    #[error("{context}: {source}")]
    Migrate {
        /// What was being done.
        context: String,
        /// The migrator's error.
        source: sqlx::migrate::MigrateError,
    },
    /// A Kafka client operation failed.
    #[cfg(feature = "kafka")]
    #[error("{context}: {source}")]
    Kafka {
        /// What was being done.
        context: String,
        /// The client's error.
        source: rdkafka::error::KafkaError,
    },
    /// A stored event could not be decoded.
    #[error("{context}: {source}")]
    Decode {
        /// Which event.
        context: String,
        /// Why.
        source: DecodeError,
    },
    /// An event's envelope is larger than a Kafka message may be.
    #[error("{context}: the envelope is {bytes} bytes, over the limit of {limit}")]
    EventTooLarge {
        /// Which event.
        context: String,
        /// Its size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// An aggregate id that cannot be stored and published in order (empty,
    /// or longer than `tidings::store::MAX_AGGREGATE_ID_BYTES`).
    #[error("aggregate id {aggregate_id:?} of type `{aggregate_type}` is refused: {reason}")]
    InvalidAggregateId {
        /// The aggregate type.
        aggregate_type: String,
        /// The id (its first 64 characters).
        aggregate_id: String,
        /// Why.
        reason: String,
    },
    /// An event could not be serialized.
    #[error("{context}: {source}")]
    Encode {
        /// Which event.
        context: String,
        /// Why.
        source: serde_json::Error,
    },
    /// A database or broker call got no answer in time (a server or a
    /// network that went silent); retried like a lost connection.
    #[error("{context}: no answer within {after:?}")]
    Timeout {
        /// What was being done.
        context: String,
        /// The limit that passed.
        after: std::time::Duration,
    },
    /// A setting or a name is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The projection was retired (readers were switched to its new
    /// version): it is not run, replayed or registered again under its name.
    #[error(
        "projection {name} was retired at {at}: run its new version, or delete its row from tidings_projections to start it afresh"
    )]
    Retired {
        /// The projection.
        name: String,
        /// When it was retired.
        at: String,
    },
    /// User code (a projection's handler) reported a transient failure:
    /// the operation changed nothing and may succeed when tried again.
    #[error("{0}")]
    Transient(String),
    /// An operation declined because going on would hide or lose data; the
    /// message says what to do instead.
    #[error("refused: {0}")]
    Refused(String),
    /// Event schemas differ from the committed lock.
    #[error("{0}")]
    SchemaMismatch(String),
    /// The tidings tables are missing or older than this version: run
    /// `tidings migrate`.
    #[error(
        "the tidings tables are missing or out of date in this database: run `tidings migrate` (or tidings::MIGRATOR) first"
    )]
    NotMigrated,
}

impl Error {
    /// Whether the operation may succeed if retried as it is (conflicts, lost
    /// connections, broker hiccups); decode and configuration errors never do.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Conflict { .. } | Error::Timeout { .. } | Error::Transient(_) => true,
            #[cfg(feature = "postgres")]
            Error::Database { source, .. } => !matches!(
                source,
                sqlx::Error::ColumnDecode { .. }
                    | sqlx::Error::ColumnNotFound(_)
                    | sqlx::Error::TypeNotFound { .. }
                    | sqlx::Error::Decode(_)
                    | sqlx::Error::Configuration(_)
            ),
            #[cfg(feature = "kafka")]
            Error::Kafka { .. } => true,
            _ => false,
        }
    }

    #[cfg(feature = "postgres")]
    pub(crate) fn db(context: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Error {
        let context = context.into();
        move |source| {
            if let sqlx::Error::Database(db) = &source {
                // undefined_table, undefined_column: the schema is not
                // there, or not all of it.
                if matches!(db.code().as_deref(), Some("42P01" | "42703")) {
                    return Error::NotMigrated;
                }
            }
            Error::Database { context, source }
        }
    }
}
