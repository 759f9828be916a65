//! What a projection does with events its code does not know: producers
//! and consumers deploy apart.
//!
//! # Guarantees
//!
//! - **A new event type never parks a stream by default.** An event whose
//!   type the projection's enum does not know is skipped: its stream's
//!   position moves past it (so later events apply, in order, with gaps
//!   still detected), and it is counted per type and version in
//!   `tidings_projection_ignored`, shown by `projections status` and the
//!   metrics. [`UnknownTypes::DeadLetter`] dead-letters it instead.
//! - **A newer version of a known type parks its stream by default**: it
//!   cannot be read safely by code that does not know its shape, so the
//!   stream waits for the new code (dead letter, then `redrive`).
//!   [`NewerVersions::Skip`] skips it like an unknown type.
//! - Skipping is decided in the batch's transaction, under the same locks
//!   and with the same duplicate and gap checks as applying: a skipped
//!   event is skipped once, and its count commits with the checkpoint.

/// What a projection does with an event of a type its enum does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum UnknownTypes {
    /// Skip it: its stream moves on; counted (the default).
    #[default]
    Skip,
    /// Dead-letter it and park its stream, as for a poison event.
    DeadLetter,
}

/// What a projection does with a version of a known event type newer than
/// its code knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum NewerVersions {
    /// Dead-letter it and park its stream until the new code re-drives it
    /// (the default).
    #[default]
    Park,
    /// Skip it: its stream moves on; counted.
    Skip,
}

/// Why an event was skipped unread, as stored and shown.
pub(crate) const UNKNOWN_TYPE: &str = "unknown type";
/// See [`UNKNOWN_TYPE`].
pub(crate) const NEWER_VERSION: &str = "newer version";
/// See [`UNKNOWN_TYPE`]: a type the projection's enum declares retired.
pub(crate) const RETIRED: &str = "retired";

/// Events a projection skipped unread, per type, version and reason.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IgnoredEvents {
    /// The event type as received.
    pub event_type: String,
    /// The version as received.
    pub event_version: i32,
    /// `unknown type` or `newer version`.
    pub reason: String,
    /// How many were skipped.
    pub events: i64,
}
