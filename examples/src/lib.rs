//! Domains from the problem space, written against tidings as a user would.
//!
//! - [`orders`]: orders with an upcast event version, payments and
//!   cancellation rules.

pub mod orders;
pub mod summary;
