//! The examples' event schemas are locked: a breaking change to a payload
//! without a version bump fails here, and so does a compatible change not
//! yet recorded. Accept an intended change with
//! `TIDINGS_BLESS=1 cargo test -p tidings-examples --test schema_lock`.

#[test]
fn event_schemas_match_the_lock() {
    let lock = concat!(env!("CARGO_MANIFEST_DIR"), "/events.lock");
    let report = tidings_examples::catalog()
        .check_lock(lock)
        .unwrap_or_else(|mismatch| panic!("{mismatch}"));
    assert!(report.is_current(), "{report}");
}
