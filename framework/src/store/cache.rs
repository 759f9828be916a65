//! Aggregates recently committed through a store, kept in memory to skip
//! their load on the next command.
//!
//! # Guarantees
//!
//! - The cache holds the aggregate value itself (a clone, behind an `Arc`),
//!   never a serde round trip: what a command is decided on is exactly the
//!   state that was committed, whatever the aggregate's `Serialize` does.
//! - An entry names the head of the stream it was built from: the sequence
//!   *and* the event id of the last event. The store never lets a decision
//!   that reaches the caller rest on an entry alone: an append is checked
//!   against that head by the append statement itself, and a refusal or an
//!   empty result is rechecked against the stream's head in the database
//!   (see [`crate::Store::execute`]).
//! - Bounded by a well-kept concurrent cache (moka, TinyLFU admission,
//!   LRU eviction), shared by the store's clones.

use std::any::Any;
use std::sync::Arc;

use crate::aggregate::Aggregate;

/// The head of a stream: the sequence of its last event and that event's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) sequence: u64,
    pub(crate) event_id: uuid::Uuid,
}

#[derive(Clone)]
struct Entry {
    head: Head,
    state: Arc<dyn Any + Send + Sync>,
}

/// A bounded map (aggregate type, id) → (head, state).
#[derive(Clone)]
pub(crate) struct AggregateCache {
    inner: Option<moka::sync::Cache<(&'static str, String), Entry>>,
}

impl std::fmt::Debug for AggregateCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregateCache")
            .field("entries", &self.inner.as_ref().map(|c| c.entry_count()))
            .finish()
    }
}

impl AggregateCache {
    /// A cache of at most `capacity` aggregates (0: no cache).
    pub(crate) fn new(capacity: usize) -> Self {
        AggregateCache {
            inner: (capacity > 0).then(|| moka::sync::Cache::new(capacity as u64)),
        }
    }

    /// The cached state of an aggregate and the head it was built from.
    pub(crate) fn get<A: Aggregate>(&self, id: &str) -> Option<(A, Head)> {
        let entry = self.inner.as_ref()?.get(&(A::TYPE, id.to_owned()))?;
        let state = entry.state.downcast_ref::<A>()?.clone();
        Some((state, entry.head))
    }

    /// Remembers the state of an aggregate at `head`.
    pub(crate) fn put<A: Aggregate>(&self, id: &str, head: Head, state: &A) {
        if let Some(cache) = &self.inner {
            let state: Arc<dyn Any + Send + Sync> = Arc::new(state.clone());
            cache.insert((A::TYPE, id.to_owned()), Entry { head, state });
        }
    }

    /// Forgets an aggregate.
    pub(crate) fn forget<A: Aggregate>(&self, id: &str) {
        if let Some(cache) = &self.inner {
            cache.invalidate(&(A::TYPE, id.to_owned()));
        }
    }
}
