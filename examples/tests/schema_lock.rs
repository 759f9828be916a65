//! The order events' schemas are locked: changing a payload's shape without
//! raising its version fails here. Accept an intended change with
//! `TIDINGS_BLESS=1 cargo test -p tidings-examples --test schema_lock`.

use tidings::schema::{check_lock, schemas_of};
use tidings_examples::auctions::AuctionEvent;
use tidings_examples::orders::OrderEvent;

#[test]
fn event_schemas_match_the_lock() {
    let lock = concat!(env!("CARGO_MANIFEST_DIR"), "/events.lock");
    let mut schemas = schemas_of::<OrderEvent>();
    schemas.extend(schemas_of::<AuctionEvent>());
    check_lock(&schemas, lock).unwrap_or_else(|mismatch| panic!("{mismatch}"));
}
