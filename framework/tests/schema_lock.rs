//! The schema lock classifies changes: compatible ones pass and are
//! listed, breaking ones without a version bump fail saying what to do, a
//! type the code no longer reads fails, clashing names on a topic fail.
#![allow(clippy::enum_variant_names)] // event names as they are on the wire

use std::path::PathBuf;

use tidings::schema::{Catalog, ChangeKind};

/// The events as first published.
mod v1 {
    #[derive(Debug, Clone, tidings::Event)]
    #[event(topic = "orders")]
    pub(crate) enum OrderEvent {
        OrderCreated { order_id: String, amount: u64 },
        OrderCancelled { order_id: String },
    }
}

/// A new optional field, a documented field and a new event type: compatible.
mod compatible {
    #[derive(Debug, Clone, tidings::Event)]
    #[event(topic = "orders")]
    pub(crate) enum OrderEvent {
        OrderCreated {
            order_id: String,
            /// In cents.
            amount: u64,
            note: Option<String>,
        },
        OrderCancelled {
            order_id: String,
        },
        OrderShipped {
            order_id: String,
        },
    }
}

/// A field removed, a field retyped and a required field added, all at v1.
mod breaking {
    #[derive(Debug, Clone, tidings::Event)]
    #[event(topic = "orders")]
    pub(crate) enum OrderEvent {
        OrderCreated { order_id: u64, currency: String },
        OrderCancelled { order_id: String },
    }
}

/// The same change with a version bump and an upcaster.
mod bumped {
    use serde_json::{Value, json};
    use tidings::UpcastError;

    fn v1(mut payload: Value) -> Result<Value, UpcastError> {
        payload["currency"] = json!("EUR");
        Ok(payload)
    }

    #[derive(Debug, Clone, tidings::Event)]
    #[event(topic = "orders")]
    pub(crate) enum OrderEvent {
        #[event(version = 2, upcast(from = 1, json = v1))]
        OrderCreated {
            order_id: String,
            amount: u64,
            currency: String,
        },
        OrderCancelled {
            order_id: String,
        },
    }
}

/// `OrderCancelled` renamed without saying so: stored events of it become unreadable.
mod renamed {
    #[derive(Debug, Clone, tidings::Event)]
    #[event(topic = "orders")]
    pub(crate) enum OrderEvent {
        OrderCreated { order_id: String, amount: u64 },
        OrderVoided { order_id: String },
    }
}

/// The same rename, declared: the old name is read and upcast.
mod renamed_with_upcaster {
    #[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
    pub(crate) struct Cancelled {
        order_id: String,
    }
    impl From<Cancelled> for OrderEvent {
        fn from(c: Cancelled) -> Self {
            OrderEvent::OrderVoided {
                order_id: c.order_id,
            }
        }
    }

    #[derive(Debug, Clone, tidings::Event)]
    #[event(topic = "orders")]
    pub(crate) enum OrderEvent {
        OrderCreated {
            order_id: String,
            amount: u64,
        },
        #[event(version = 2, upcast(from = 1, name = "OrderCancelled", typed = Cancelled))]
        OrderVoided {
            order_id: String,
        },
    }
}

/// Another enum on the same topic with a type of the same name.
mod clash {
    #[derive(Debug, Clone, tidings::Event)]
    #[event(topic = "orders")]
    pub(crate) enum RefundEvent {
        OrderCancelled { refund_id: String },
    }
}

fn locked() -> PathBuf {
    let path = std::env::temp_dir().join(format!("tidings-{}.lock", uuid::Uuid::now_v7()));
    Catalog::of::<v1::OrderEvent>().write_lock(&path).unwrap();
    path
}

#[test]
fn a_missing_lock_reports_every_type_as_new_and_a_written_one_is_current() {
    let path = std::env::temp_dir().join(format!("tidings-{}.lock", uuid::Uuid::now_v7()));
    let report = Catalog::of::<v1::OrderEvent>()
        .check_lock_with(&path, false)
        .unwrap();
    assert!(!report.is_current());
    assert!(
        report.changes.iter().all(|c| c.kind == ChangeKind::NewType),
        "{report}"
    );
    Catalog::of::<v1::OrderEvent>().write_lock(&path).unwrap();
    let report = Catalog::of::<v1::OrderEvent>()
        .check_lock_with(&path, false)
        .unwrap();
    assert!(report.is_current(), "{report}");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"topic\": \"orders\""), "{text}");
    assert!(
        text.contains("\"order_id\""),
        "the lock keeps the schemas: {text}"
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_new_optional_field_a_description_and_a_new_type_are_compatible_and_listed() {
    let path = locked();
    let report = Catalog::of::<compatible::OrderEvent>()
        .check_lock_with(&path, false)
        .unwrap_or_else(|e| panic!("compatible changes failed the check: {e}"));
    let text = report.to_string();
    assert!(text.contains("optional field `.note` added"), "{text}");
    assert!(text.contains("descriptions or titles changed"), "{text}");
    assert!(text.contains("new event type `OrderShipped` v1"), "{text}");
    assert!(text.contains("TIDINGS_BLESS=1"), "{text}");

    Catalog::of::<compatible::OrderEvent>()
        .check_lock_with(&path, true)
        .expect("blessing succeeds");
    let report = Catalog::of::<compatible::OrderEvent>()
        .check_lock_with(&path, false)
        .unwrap();
    assert!(report.is_current(), "blessing recorded them: {report}");
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_breaking_change_without_a_version_bump_fails_naming_each_field_and_what_to_do() {
    let path = locked();
    let mismatch = Catalog::of::<breaking::OrderEvent>()
        .check_lock_with(&path, false)
        .unwrap_err();
    assert_eq!(mismatch.problems.len(), 1, "only OrderCreated: {mismatch}");
    let text = mismatch.to_string();
    for expected in [
        "`OrderCreated` v1 changed without a version bump",
        "breaking: field `.order_id` changed type from string to integer (uint64)",
        "breaking: field `.amount` removed",
        "breaking: required field `.currency` added",
        "raise `OrderCreated`'s `version` to 2 and add `upcast(from = 1, ...)`",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
    std::fs::remove_file(path).unwrap();
}

#[test]
fn the_same_change_with_a_version_bump_and_an_upcaster_is_a_compatible_new_version() {
    let path = locked();
    let report = Catalog::of::<bumped::OrderEvent>()
        .check_lock_with(&path, false)
        .unwrap_or_else(|e| panic!("{e}"));
    let text = report.to_string();
    assert!(
        text.contains("new version `OrderCreated` v2 (changes from v1:"),
        "{text}"
    );
    assert!(text.contains("required field `.currency` added"), "{text}");

    // Blessed, the lock keeps v1's schema: the code reads v1 through a JSON
    // upcaster and has no schema of it any more.
    Catalog::of::<bumped::OrderEvent>()
        .check_lock_with(&path, true)
        .unwrap();
    let lock: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let versions: Vec<(String, u64)> = lock["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["version"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(
        versions.contains(&("OrderCreated".into(), 1)),
        "{versions:?}"
    );
    assert!(
        versions.contains(&("OrderCreated".into(), 2)),
        "{versions:?}"
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_type_renamed_without_an_upcaster_fails_and_with_one_passes() {
    let path = locked();
    let mismatch = Catalog::of::<renamed::OrderEvent>()
        .check_lock_with(&path, false)
        .unwrap_err();
    let text = mismatch.to_string();
    assert!(
        text.contains("`OrderCancelled` v1 (topic `orders`) is in the lock but no event type reads it any more"),
        "{text}"
    );
    assert!(
        text.contains("upcast(from = 1, name = \"OrderCancelled\""),
        "{text}"
    );
    assert!(text.contains("retired(name = \"OrderCancelled\""), "{text}");

    let report = Catalog::of::<renamed_with_upcaster::OrderEvent>()
        .check_lock_with(&path, false)
        .unwrap_or_else(|e| panic!("the declared rename failed: {e}"));
    assert!(
        report
            .to_string()
            .contains("new event type `OrderVoided` v2"),
        "{report}"
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn two_event_types_with_one_name_on_one_topic_are_an_error() {
    let catalog = Catalog::of::<v1::OrderEvent>().with::<clash::RefundEvent>();
    let error = catalog.validate().unwrap_err().to_string();
    assert!(
        error.contains("event type `OrderCancelled` is on topic `orders` twice"),
        "{error}"
    );
    let path = locked();
    let mismatch = catalog.check_lock_with(&path, true).unwrap_err();
    assert!(
        mismatch.to_string().contains("is on topic `orders` twice"),
        "blessing does not accept a clash: {mismatch}"
    );
    // The same enum twice is one enum; on another topic the name is fine.
    Catalog::of::<v1::OrderEvent>()
        .with::<v1::OrderEvent>()
        .with_on::<clash::RefundEvent>("refunds")
        .validate()
        .unwrap();
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_lock_of_the_first_format_is_read_and_blessing_keeps_other_topics() {
    let path = std::env::temp_dir().join(format!("tidings-{}.lock", uuid::Uuid::now_v7()));
    let fingerprint = |name: &str| {
        tidings::schema::schemas_of::<v1::OrderEvent>()
            .into_iter()
            .find(|s| s.event_type == name)
            .unwrap()
            .fingerprint()
    };
    std::fs::write(
        &path,
        format!(
            "# an older lock\nOrderCreated v1 {}\nOrderCancelled v1 {}\n",
            fingerprint("OrderCreated"),
            fingerprint("OrderCancelled")
        ),
    )
    .unwrap();
    let report = Catalog::of::<v1::OrderEvent>()
        .check_lock_with(&path, false)
        .unwrap();
    assert!(report.is_current(), "{report}");
    // A changed shape against an entry without a schema cannot be classified.
    let mismatch = Catalog::of::<compatible::OrderEvent>()
        .check_lock_with(&path, false)
        .unwrap_err();
    assert!(
        mismatch
            .to_string()
            .contains("keeps no schema to compare with"),
        "{mismatch}"
    );

    // Blessing writes the current format and keeps another topic's entries.
    Catalog::new()
        .with_on::<clash::RefundEvent>("refunds")
        .write_lock(&path)
        .unwrap();
    Catalog::of::<compatible::OrderEvent>()
        .check_lock_with(&path, true)
        .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"topic\": \"refunds\""), "{text}");
    assert!(text.contains("OrderShipped"), "{text}");
    std::fs::remove_file(path).unwrap();
}

/// Version 2 of `OrderCreated`, reading v1 through a typed upcaster that
/// needs only the id.
mod typed_old_version {
    #[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
    pub(crate) struct CreatedV1 {
        order_id: String,
    }
    impl From<CreatedV1> for OrderEvent {
        fn from(v1: CreatedV1) -> Self {
            OrderEvent::OrderCreated {
                order_id: v1.order_id,
                amount_cents: 0,
            }
        }
    }

    #[derive(Debug, Clone, tidings::Event)]
    #[event(topic = "orders")]
    pub(crate) enum OrderEvent {
        #[event(version = 2, upcast(from = 1, typed = CreatedV1))]
        OrderCreated {
            order_id: String,
            amount_cents: u64,
        },
        OrderCancelled {
            order_id: String,
        },
    }
}

#[test]
fn an_upcaster_that_reads_fewer_fields_of_an_old_version_is_compatible() {
    let path = locked();
    let report = Catalog::of::<typed_old_version::OrderEvent>()
        .check_lock_with(&path, false)
        .unwrap_or_else(|e| panic!("an upcaster reading less failed the check: {e}"));
    let text = report.to_string();
    assert!(
        text.contains("field `.amount` is no longer read by the upcaster"),
        "{text}"
    );
    assert!(text.contains("new version `OrderCreated` v2"), "{text}");
    std::fs::remove_file(path).unwrap();
}
