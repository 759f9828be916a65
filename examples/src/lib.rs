//! Domains from the problem space, written against tidings as a user would.
//!
//! - [`orders`]: orders with an upcast event version, payments and
//!   cancellation rules; [`summary`]: their read model.
//! - [`auctions`]: concurrent bidders on one auction and the leading bid.
//! - [`reports`]: daily totals from order and payment events, rebuilt by replay.
//! - [`demo`]: what the runnable examples share (a fresh database, a relay
//!   and runners in the background).

pub mod auctions;
pub mod demo;
pub mod orders;
pub mod reports;
pub mod summary;

/// The events these examples publish, with their topics: what the schema
/// lock checks and the AsyncAPI document describes.
pub fn catalog() -> tidings::schema::Catalog {
    tidings::schema::Catalog::new()
        .with_aggregate::<orders::Order>()
        .with_aggregate::<auctions::Auction>()
}
