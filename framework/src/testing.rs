//! Testing: given/when/then for aggregates with no database, and (with the
//! `kafka` feature) a throwaway migrated database and an embedded Kafka
//! broker for integration tests of projections and relays
//! ([`TestDatabase`], [`EmbeddedKafka`]).
//!
//! Every event given, and every event produced, is encoded to JSON and
//! decoded back as the store would, so a payload that does not round-trip
//! fails the test too.
//!
//! ```
//! # use tidings::{Aggregate, Event};
//! # #[derive(Debug, Clone, PartialEq, Event)]
//! # enum CounterEvent { Incremented { by: u32 } }
//! # #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
//! # struct Counter { value: u32 }
//! # #[derive(Debug, PartialEq, thiserror::Error)] #[error("overflow")] struct Overflow;
//! # impl Aggregate for Counter {
//! #     const TYPE: &'static str = "counter";
//! #     type Event = CounterEvent; type Command = u32; type Error = Overflow;
//! #     fn handle(&self, by: u32) -> Result<Vec<CounterEvent>, Overflow> {
//! #         self.value.checked_add(by).ok_or(Overflow)?; Ok(vec![CounterEvent::Incremented { by }]) }
//! #     fn apply(&mut self, e: &CounterEvent) { match e { CounterEvent::Incremented { by } => self.value += by } }
//! # }
//! use tidings::testing::given;
//!
//! let counter = given::<Counter>([CounterEvent::Incremented { by: 2 }])
//!     .when(3)
//!     .then([CounterEvent::Incremented { by: 3 }]);
//! assert_eq!(counter.value, 5);
//!
//! given::<Counter>([CounterEvent::Incremented { by: u32::MAX }])
//!     .when(1)
//!     .then_error(Overflow);
//! ```

#[cfg(feature = "kafka")]
mod services;

#[cfg(feature = "kafka")]
pub use services::{EmbeddedKafka, TestDatabase};

use std::fmt::Debug;

use crate::aggregate::Aggregate;
use crate::event::Event;

/// Round-trips an event through its JSON payload, as the store does.
fn round_trip<E: Event>(event: &E) -> E {
    let payload = event
        .to_payload()
        .unwrap_or_else(|e| panic!("`{}` does not serialize: {e}", event.event_type()));
    E::decode(event.event_type(), event.event_version(), payload)
        .unwrap_or_else(|e| panic!("`{}` does not decode back: {e}", event.event_type()))
}

/// Starts a test from the aggregate's history.
pub fn given<A: Aggregate>(history: impl IntoIterator<Item = A::Event>) -> Given<A> {
    let mut state = A::default();
    for event in history {
        state.apply(&round_trip(&event));
    }
    Given { state }
}

/// An aggregate rebuilt from its history, ready for a command.
#[derive(Debug)]
pub struct Given<A> {
    state: A,
}

impl<A: Aggregate> Given<A> {
    /// Handles one command against the state.
    pub fn when(self, command: A::Command) -> Then<A> {
        let result = self
            .state
            .handle(command)
            .map(|events| events.iter().map(round_trip).collect::<Vec<_>>());
        Then {
            state: self.state,
            result,
        }
    }

    /// The state rebuilt from the history.
    pub fn state(&self) -> &A {
        &self.state
    }
}

/// The outcome of a command, to be checked.
#[derive(Debug)]
pub struct Then<A: Aggregate> {
    state: A,
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> Then<A>
where
    A::Event: PartialEq + Debug,
{
    /// Asserts the command produced exactly `expected`, and returns the state
    /// with them applied.
    #[track_caller]
    pub fn then(mut self, expected: impl IntoIterator<Item = A::Event>) -> A {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match self.result {
            Ok(events) => {
                assert_eq!(
                    events, expected,
                    "the command produced other events than expected"
                );
                for event in &events {
                    self.state.apply(event);
                }
                self.state
            }
            Err(error) => panic!("expected events {expected:?}, the command was refused: {error}"),
        }
    }

    /// Asserts the command was refused with an error equal to `expected`.
    #[track_caller]
    pub fn then_error(self, expected: A::Error)
    where
        A::Error: PartialEq,
    {
        match self.result {
            Ok(events) => {
                panic!("expected the error {expected:?}, the command produced {events:?}")
            }
            Err(error) => assert_eq!(
                error, expected,
                "the command was refused with another error"
            ),
        }
    }

    /// Returns the error the command was refused with, panicking if it succeeded.
    #[track_caller]
    pub fn error(self) -> A::Error {
        match self.result {
            Ok(events) => panic!("expected an error, the command produced {events:?}"),
            Err(error) => error,
        }
    }
}
