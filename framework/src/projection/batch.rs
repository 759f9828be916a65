//! Batches handed to [`Projection::apply_batch`](super::Projection::apply_batch).
//!
//! # Guarantees
//!
//! - A [`Batch`] holds only events the runner decided to apply, under its
//!   locks: fresh (past the partition's checkpoint and the stream's
//!   position), with duplicates, gaps, poison and parked streams already
//!   taken out. Its events are in offset order, hence in sequence order
//!   within each stream, and each stream's events follow each other without
//!   a gap. The one exception is a split event (one stored event read as
//!   several, see [`Reading`](crate::Reading)): its parts follow each other
//!   with the same sequence, each with its own event id
//!   ([`part_id`](crate::part_id)).
//! - What the projection writes for a batch commits with the positions and
//!   the checkpoint, or not at all: a failed call rolls back everything it
//!   wrote.
//! - The result must equal applying [`Batch::events`] one by one in order.
//!   Folding each stream's events in order ([`Batch::by_stream`]) and then
//!   writing one statement per table is enough; what several streams add up
//!   to (a daily sum) must not depend on their order.

use std::collections::HashMap;

use crate::envelope::Envelope;
use crate::projection::{ApplyError, BoxError};

/// The events of one batch of one partition, in offset order.
#[derive(Debug)]
pub struct Batch<'a, E> {
    events: Vec<&'a Envelope<E>>,
}

impl<E> Clone for Batch<'_, E> {
    fn clone(&self) -> Self {
        Batch {
            events: self.events.clone(),
        }
    }
}

/// One stream's events in a [`Batch`], in sequence order.
#[derive(Debug)]
pub struct StreamEvents<'a, E> {
    /// The aggregate type of the stream.
    pub aggregate_type: &'a str,
    /// The aggregate id of the stream.
    pub aggregate_id: &'a str,
    /// Its events, in sequence order, each with its index in
    /// [`Batch::events`] (for [`BatchError::Permanent`]).
    pub events: Vec<(usize, &'a Envelope<E>)>,
}

impl<'a, E> Batch<'a, E> {
    /// A batch of these events (in the order given). The runner builds the
    /// batches it applies; this is for tests and for a projection whose
    /// [`apply`](super::Projection::apply) calls its own `apply_batch`.
    pub fn new(events: Vec<&'a Envelope<E>>) -> Self {
        Batch { events }
    }

    /// A batch of one event.
    pub fn one(envelope: &'a Envelope<E>) -> Self {
        Batch {
            events: vec![envelope],
        }
    }

    /// The events, in offset order.
    pub fn events(&self) -> &[&'a Envelope<E>] {
        &self.events
    }

    /// How many events the batch holds.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether the batch holds no event (the runner never calls a
    /// projection with one).
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The events grouped by stream, streams in the order of their first
    /// event, each stream's events in sequence order.
    pub fn by_stream(&self) -> Vec<StreamEvents<'a, E>> {
        let mut index: HashMap<(&'a str, &'a str), usize, foldhash::fast::RandomState> =
            HashMap::default();
        let mut streams: Vec<StreamEvents<'a, E>> = Vec::new();
        for (i, envelope) in self.events.iter().copied().enumerate() {
            let key = (
                envelope.aggregate_type.as_str(),
                envelope.aggregate_id.as_str(),
            );
            let at = *index.entry(key).or_insert_with(|| {
                streams.push(StreamEvents {
                    aggregate_type: key.0,
                    aggregate_id: key.1,
                    events: Vec::new(),
                });
                streams.len() - 1
            });
            streams[at].events.push((i, envelope));
        }
        streams
    }
}

/// Why a projection could not apply a batch.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// Worth retrying (a lost connection, a lock timeout): the batch is
    /// rolled back and retried with exponential backoff.
    #[error("transient: {0}")]
    Transient(BoxError),
    /// `events()[index]` can never be applied: it is dead-lettered and its
    /// stream parked from there; the rest of the batch is planned again and
    /// applied.
    #[error("permanent (event {index} of the batch): {error}")]
    Permanent {
        /// The index of the event in [`Batch::events`].
        index: usize,
        /// Why.
        error: BoxError,
    },
    /// Retrying the batch cannot help, but the projection cannot tell
    /// which event is at fault (a constraint a set-based statement broke):
    /// the runner applies the batch again one event at a time, each in a
    /// savepoint, and dead-letters the events that fail.
    #[error("permanent, event unknown: {0}")]
    Unattributed(BoxError),
}

impl BatchError {
    /// The error of one event's [`ApplyError`], at `index` in the batch.
    pub fn at(index: usize, error: ApplyError) -> Self {
        match error {
            ApplyError::Transient(e) => BatchError::Transient(e),
            ApplyError::Permanent(error) => BatchError::Permanent { index, error },
        }
    }

    /// A permanent error of the event at `index`, with a message.
    pub fn permanent(index: usize, error: impl Into<BoxError>) -> Self {
        BatchError::Permanent {
            index,
            error: error.into(),
        }
    }
}

/// Database errors are transient, except those that can never succeed on
/// the same input (cardinality, data and constraint errors: classes 21,
/// 22 and 23), which are permanent with no event named: a set-based
/// statement cannot say which row broke it. Class 21 is what an upsert
/// touching one row twice raises (`ON CONFLICT DO UPDATE command cannot
/// affect row a second time`): fold each stream's events into one row
/// first ([`Batch::by_stream`]).
impl From<sqlx::Error> for BatchError {
    fn from(error: sqlx::Error) -> Self {
        if super::never_succeeds(&error) {
            return BatchError::Unattributed(Box::new(error));
        }
        BatchError::Transient(Box::new(error))
    }
}

/// For a projection whose [`apply`](super::Projection::apply) calls its own
/// `apply_batch` with [`Batch::one`]: any permanent error is that event's.
impl From<BatchError> for ApplyError {
    fn from(error: BatchError) -> Self {
        match error {
            BatchError::Transient(e) => ApplyError::Transient(e),
            BatchError::Permanent { error, .. } | BatchError::Unattributed(error) => {
                ApplyError::Permanent(error)
            }
        }
    }
}
