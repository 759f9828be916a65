//! Aggregates: the pure decision logic of the write side.
//!
//! An aggregate is rebuilt from its events ([`Aggregate::apply`]) and decides
//! which events a command produces ([`Aggregate::handle`]). Both are
//! synchronous and free of I/O: whatever a decision needs from outside is
//! fetched before the command is issued. That keeps them deterministic, so
//! retrying a command after a concurrency conflict is always safe and tests
//! need no infrastructure (see [`crate::testing`]).

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::event::Event;

/// A consistency boundary: a stream of events with one id.
///
/// ```
/// use tidings::{Aggregate, Event};
///
/// #[derive(Debug, Clone, PartialEq, Event)]
/// enum CounterEvent { Incremented { by: u32 } }
///
/// #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
/// struct Counter { value: u32 }
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("the counter would overflow")]
/// struct Overflow;
///
/// impl Aggregate for Counter {
///     const TYPE: &'static str = "counter";
///     type Event = CounterEvent;
///     type Command = u32;
///     type Error = Overflow;
///
///     fn handle(&self, by: u32) -> Result<Vec<CounterEvent>, Overflow> {
///         self.value.checked_add(by).ok_or(Overflow)?;
///         Ok(vec![CounterEvent::Incremented { by }])
///     }
///
///     fn apply(&mut self, event: &CounterEvent) {
///         match event { CounterEvent::Incremented { by } => self.value += by }
///     }
/// }
/// ```
pub trait Aggregate:
    Clone + Default + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// The aggregate type, stored with every event (`aggregate_type`), e.g. `order`.
    const TYPE: &'static str;
    /// Take a snapshot every this many events (0: never).
    const SNAPSHOT_EVERY: u64 = 0;
    /// The version of the snapshot format. Raise it when the state's shape
    /// changes: older snapshots are then ignored and the stream replayed.
    const SNAPSHOT_VERSION: u32 = 1;

    /// The events of this aggregate.
    type Event: Event;
    /// What callers ask the aggregate to do.
    type Command: Send;
    /// Why a command is refused (a domain error).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decides the events a command produces, or refuses it. No I/O.
    fn handle(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Applies one event to the state. Never fails: events are facts.
    fn apply(&mut self, event: &Self::Event);

    /// The topic these events are published to: the event enum's
    /// `#[event(topic = "...")]`, else [`Aggregate::TYPE`].
    fn topic() -> &'static str {
        <Self::Event as Event>::TOPIC.unwrap_or(Self::TYPE)
    }
}
