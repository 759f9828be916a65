//! Projections: read models built from Kafka topics, exactly once.
//!
//! # Guarantees
//!
//! - **Exactly-once effect.** Delivery is at least once (redelivery after a
//!   rebalance or crash, republishing by the relay), but each event changes
//!   a read model once: the read model change, the partition checkpoint and
//!   the last sequence applied per stream commit in one PostgreSQL
//!   transaction. Messages below the checkpoint and events at or below the
//!   stream's last sequence are skipped.
//! - **Fenced.** A batch locks its partition's checkpoint row and checks the
//!   projection's generation in the same statement; an instance that lost
//!   the partition, or that runs a generation a replay has replaced, finds
//!   its messages already applied or its generation gone, and applies nothing.
//! - **In order per aggregate.** Events of a stream are applied in sequence
//!   order. A poison event (not an envelope, a version newer than the code
//!   knows, a payload that does not decode, a permanent handler error, a
//!   sequence gap) goes to the dead letter topic with the reason and its origin, and
//!   the later events of its stream are *parked* behind it, never applied out
//!   of order. [`redrive`] re-applies parked events in order once fixed.
//! - **Producers deploy apart.** An event of a type the projection does
//!   not know is skipped and counted, its stream moving on; a newer version
//!   of a known type parks its stream. Both are configurable
//!   ([`UnknownTypes`], [`NewerVersions`]).
//! - **PostgreSQL decides where reading starts.** Each partition assigned
//!   to a runner is paused, sought to its checkpoint in PostgreSQL (the
//!   beginning when it has none) and only then resumed: a group offset ahead
//!   of the checkpoint (a restored database, an offset reset) never skips an
//!   event. The group id carries the topic prefix and an identity of the
//!   projection's registration in this database
//!   (`tidings.<topic prefix><name>.<registration>.g<generation>`), so two
//!   databases never share a group by accident.
//! - **Dead letters never hold a batch.** A batch records its dead letters
//!   in `tidings_parked` and commits; they are copied to the dead letter
//!   topic afterwards (key and headers byte for byte), at least once. A copy
//!   the topic refuses for good is recorded with the error, counted and
//!   shown by the status, and not retried. A sequence outside
//!   `1..=i64::MAX` is dead-lettered; an already-applied duplicate that no
//!   longer decodes is skipped, not parked.
//! - **A panic is one event's poison.** A panic while decoding (a typed
//!   upcaster, a custom `Deserialize`) or applying dead-letters that event
//!   and parks its stream; nothing queued behind it is dropped.
//! - **Batches, set-based.** A partition's batch is planned under its locks
//!   (what is fresh, duplicate, a gap, poison or parked) before the
//!   projection sees it; [`Projection::apply_batch`] then gets what applies
//!   at once, in offset order, so it can write each batch with a few
//!   set-based statements. A refusal that names its event dead-letters that
//!   event and plans the batch again; one that names none, or a panic,
//!   applies the batch one event at a time in savepoints to find it.
//! - **Independent partitions.** Each partition is applied by its own task,
//!   in batches; a partition that retries a transient error is paused at the
//!   consumer while the others go on.
//! - **Replayable.** [`replay`] resets the read model and the positions and
//!   starts a new consumer group generation that reads the topics from the
//!   beginning. For zero downtime, run the new version under another name
//!   into its own tables while the old one serves, and let
//!   [`switch_when_caught_up`] move readers over atomically once it stayed
//!   caught up, refusing while it has dead letters, and [`retire`] the old
//!   version (its rows, consumer groups and dead letter topic).

mod apply;
mod batch;
mod dead_letters;
mod dlq;
mod evolution;
mod plan;
mod runner;
mod setup;
mod status;
mod switch;

use async_trait::async_trait;
use sqlx::PgConnection;

use crate::envelope::Envelope;
use crate::event::Event;

pub use batch::{Batch, BatchError, StreamEvents};
pub use dlq::{
    ParkedEvent, ParkedMessage, RedriveReport, list_parked, redrive, redrive_stream, show_parked,
    skip_dead_letter,
};
pub use evolution::{IgnoredEvents, NewerVersions, UnknownTypes};
pub use runner::{Runner, RunnerConfig, RunnerStats};
pub use setup::set_up_read_model;
pub use status::{
    PartitionLag, ProjectionStatus, Watermarks, generation, projection_status, registered_topics,
    replay, status_with,
};
pub use switch::{Retire, RetireReport, Switch, SwitchReport, retire, switch_when_caught_up};

/// A boxed error from user code.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a projection could not apply an event.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Worth retrying (a lost connection, a lock timeout): the batch is
    /// rolled back and retried with exponential backoff.
    #[error("transient: {0}")]
    Transient(BoxError),
    /// Retrying cannot help: the event is dead-lettered and its stream parked.
    #[error("permanent: {0}")]
    Permanent(BoxError),
}

impl ApplyError {
    /// A permanent error with a message.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        ApplyError::Permanent(error.into())
    }

    /// A transient error with a message.
    pub fn transient(error: impl Into<BoxError>) -> Self {
        ApplyError::Transient(error.into())
    }
}

/// Database errors are transient, except those that can never succeed on
/// the same input (cardinality, data and constraint errors), which are
/// permanent.
impl From<sqlx::Error> for ApplyError {
    fn from(error: sqlx::Error) -> Self {
        if never_succeeds(&error) {
            return ApplyError::Permanent(Box::new(error));
        }
        ApplyError::Transient(Box::new(error))
    }
}

/// Whether a database error can never succeed on the same input. Class 21:
/// cardinality violation (an upsert touching a row twice); class 22: data
/// exception; class 23: integrity constraint violation.
fn never_succeeds(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = error else {
        return false;
    };
    db.code().is_some_and(|code| {
        ["21", "22", "23"]
            .iter()
            .any(|class| code.starts_with(class))
    })
}

/// A read model built from events.
///
/// ```no_run
/// use tidings::projection::{ApplyError, Projection};
/// use tidings::{Envelope, Event};
/// use sqlx::PgConnection;
///
/// # #[derive(Debug, Clone, Event)] #[event(topic = "orders")]
/// # enum OrderEvent { OrderCreated { amount: f64 } }
/// struct OrderTotals;
///
/// #[async_trait::async_trait]
/// impl Projection for OrderTotals {
///     type Event = OrderEvent;
///     fn name(&self) -> &str { "order_totals" }
///
///     async fn apply(&self, conn: &mut PgConnection, e: &Envelope<OrderEvent>) -> Result<(), ApplyError> {
///         let OrderEvent::OrderCreated { amount } = &e.payload;
///         sqlx::query("INSERT INTO order_totals (id, amount) VALUES ($1, $2)")
///             .bind(&e.aggregate_id).bind(amount).execute(conn).await?;
///         Ok(())
///     }
///
///     async fn reset(&self, conn: &mut PgConnection) -> Result<(), ApplyError> {
///         sqlx::query("TRUNCATE order_totals").execute(conn).await?;
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// The events this projection reads; they arrive upcast to their
    /// current versions.
    type Event: Event;

    /// A stable name: it keys checkpoints, the consumer group and the dead
    /// letter topic. ASCII letters, digits, `_`, `-` and `.`.
    fn name(&self) -> &str;

    /// The topics to read (before the runner's topic prefix). Default: the
    /// event enum's `#[event(topic = "...")]`.
    fn topics(&self) -> Vec<String> {
        <Self::Event as Event>::TOPIC
            .map(|t| vec![t.to_owned()])
            .unwrap_or_default()
    }

    /// Applies one event inside the runner's transaction. Use `?` on sqlx
    /// errors; return [`ApplyError::Permanent`] for an event that can never
    /// be applied.
    async fn apply(
        &self,
        conn: &mut PgConnection,
        envelope: &Envelope<Self::Event>,
    ) -> Result<(), ApplyError>;

    /// Applies a batch of events inside the runner's transaction: what the
    /// runner decided to apply of one partition's batch, in offset order
    /// (see [`Batch`] for what it holds and what the result must equal).
    ///
    /// The default calls [`apply`](Projection::apply) for each event.
    /// Override it to write each batch with a few set-based statements
    /// (fold [`Batch::by_stream`], then `INSERT … SELECT FROM UNNEST`):
    /// that is what makes a replay fast. Return
    /// [`BatchError::Permanent`] naming the event that can never apply, or
    /// [`BatchError::Unattributed`] (what a constraint error becomes through
    /// `?`) when it is not known: the runner then applies the batch one
    /// event at a time, each in a savepoint, to find it. A panic is handled
    /// like an unattributed error.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        batch: &Batch<'_, Self::Event>,
    ) -> Result<(), BatchError> {
        apply_each(self, conn, batch).await
    }

    /// Empties the read model, for a replay. Runs in the replay's transaction.
    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ApplyError>;
}

/// The message of a caught panic.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

/// Applies a batch one event at a time with [`Projection::apply`]: what
/// the default [`Projection::apply_batch`] does, for an override that
/// falls back to it.
pub async fn apply_each<P: Projection + ?Sized>(
    projection: &P,
    conn: &mut PgConnection,
    batch: &Batch<'_, P::Event>,
) -> Result<(), BatchError> {
    for (index, envelope) in batch.events().iter().enumerate() {
        projection
            .apply(conn, envelope)
            .await
            .map_err(|error| BatchError::at(index, error))?;
    }
    Ok(())
}

/// Checks a projection name: it becomes part of group ids and topic names.
pub fn validate_projection_name(name: &str) -> crate::Result<()> {
    if name.is_empty()
        || name.len() > 200
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(crate::Error::Config(format!(
            "invalid projection name `{name}`: use 1 to 200 ASCII letters, digits, `_`, `-` or `.`"
        )));
    }
    Ok(())
}

/// Headers a dead-lettered message carries, besides its original ones.
pub mod dlq_headers {
    /// Why it was dead-lettered.
    pub const REASON: &str = "tidings.dlq.reason";
    /// Which projection refused it.
    pub const PROJECTION: &str = "tidings.dlq.projection";
    /// The topic it came from.
    pub const TOPIC: &str = "tidings.dlq.topic";
    /// The partition it came from.
    pub const PARTITION: &str = "tidings.dlq.partition";
    /// Its offset there.
    pub const OFFSET: &str = "tidings.dlq.offset";
    /// The projection's generation that refused it (a replay starts a new one).
    pub const GENERATION: &str = "tidings.dlq.generation";
    /// Present when the value was too large to copy (it is kept in
    /// `tidings_parked`).
    pub const VALUE_OMITTED: &str = "tidings.dlq.value_omitted";
}
