//! Property tests (fuzzing) of envelope decoding and upcasting: whatever the
//! bytes or the JSON, decoding returns a value or a clear error and never
//! panics; well-formed events round-trip.

use proptest::prelude::*;
use serde_json::{Value, json};
use tidings::{Event, RawEnvelope, UpcastError};

fn v1(mut payload: Value) -> Result<Value, UpcastError> {
    // A careless upcaster: indexing panics on non-objects. Decoding must still not panic.
    payload["currency"] = json!("USD");
    Ok(payload)
}

fn v2(payload: Value) -> Result<Value, UpcastError> {
    let amount = payload
        .get("amount")
        .and_then(Value::as_f64)
        .ok_or_else(|| UpcastError::missing_field("amount"))?;
    let mut payload = payload;
    payload["amount_cents"] = json!((amount * 100.0).round() as i64);
    Ok(payload)
}

#[derive(Debug, Clone, PartialEq, Event)]
enum OrderEvent {
    #[event(version = 3, upcast(from = 1, json = v1), upcast(from = 2, json = v2))]
    OrderCreated {
        order_id: String,
        amount_cents: i64,
        currency: String,
    },
    Cancelled {
        reason: Option<String>,
    },
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = RawEnvelope::from_slice(&bytes);
    }

    #[test]
    fn arbitrary_payloads_types_and_versions_never_panic(
        payload in json_value(),
        event_type in prop_oneof![Just("OrderCreated".to_owned()), Just("Cancelled".to_owned()), ".{0,12}"],
        version in 0u32..6,
    ) {
        match OrderEvent::decode(&event_type, version, payload) {
            Ok(event) => prop_assert!(OrderEvent::TYPES.iter().any(|t| t.name == event.event_type())),
            // A typed error that names the event type and a version (the
            // received one, or the step of the upcaster chain that failed).
            Err(error) => {
                let message = error.to_string();
                prop_assert!(
                    message.contains(&format!("`{event_type}`")) && message.contains("version"),
                    "{}", message
                );
            }
        }
    }

    /// What a runner reads from a payload's text equals what `read` makes
    /// of the parsed payload, for any payload, type and version.
    #[test]
    fn reading_from_text_agrees_with_reading_from_the_value(
        payload in json_value(),
        event_type in prop_oneof![Just("OrderCreated".to_owned()), Just("Cancelled".to_owned()), ".{0,12}"],
        version in 0u32..6,
    ) {
        let text = serde_json::value::RawValue::from_string(payload.to_string()).unwrap();
        let from_text = OrderEvent::read_json(&event_type, version, &text);
        let from_value = OrderEvent::read(&event_type, version, payload);
        match (from_text, from_value) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(_), Err(_)) => {}
            (a, b) => prop_assert!(false, "{:?} / {:?}", a, b),
        }
    }

    #[test]
    fn envelopes_with_arbitrary_fields_parse_or_fail_cleanly(payload in json_value(), sequence in any::<i64>(), id in ".{0,16}") {
        let text = json!({
            "event_type": "OrderCreated", "event_version": 1, "event_id": "0196a0b2-6a4e-7b6c-9d7e-3f2a1b0c9d8e",
            "timestamp": "2026-04-16T10:30:00Z", "aggregate_type": "order", "aggregate_id": id,
            "sequence": sequence, "correlation_id": null, "causation_id": null, "metadata": {}, "payload": payload,
        }).to_string();
        if let Ok(envelope) = RawEnvelope::from_slice(text.as_bytes()) {
            prop_assert!(sequence >= 0);
            let _ = envelope.decode::<OrderEvent>();
        }
    }

    #[test]
    fn current_events_round_trip(order_id in ".{0,24}", amount_cents in any::<i64>(), currency in "[A-Z]{3}", reason in proptest::option::of(".{0,24}")) {
        for event in [
            OrderEvent::OrderCreated { order_id: order_id.clone(), amount_cents, currency: currency.clone() },
            OrderEvent::Cancelled { reason: reason.clone() },
        ] {
            let back = OrderEvent::decode(event.event_type(), event.event_version(), event.to_payload().unwrap()).unwrap();
            prop_assert_eq!(back, event);
        }
    }

    #[test]
    fn old_versions_upcast_through_the_chain(order_id in "[A-Z0-9-]{1,12}", amount in 0.0f64..1.0e9) {
        let v1 = json!({"order_id": order_id, "amount": amount});
        let event = OrderEvent::decode("OrderCreated", 1, v1).unwrap();
        let expected = OrderEvent::OrderCreated { order_id, amount_cents: (amount * 100.0).round() as i64, currency: "USD".into() };
        prop_assert_eq!(event, expected);
    }
}

/// Version 1 of a reading carried text; the typed upcaster parses it and,
/// like a careless user, panics on text that is not a number.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct ReadingV1 {
    value: String,
}

impl From<ReadingV1> for ReadingEvent {
    fn from(v1: ReadingV1) -> Self {
        ReadingEvent::Read {
            value: v1.value.parse().expect("a number"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Event)]
enum ReadingEvent {
    #[event(version = 2, upcast(from = 1, typed = ReadingV1))]
    Read { value: i64 },
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn typed_upcasters_that_panic_give_a_typed_error_not_a_panic(value in prop_oneof![".{0,12}", any::<i64>().prop_map(|n| n.to_string())]) {
        match ReadingEvent::decode("Read", 1, json!({ "value": value })) {
            Ok(ReadingEvent::Read { value: read }) => prop_assert_eq!(read.to_string(), value),
            Err(error) => {
                let message = error.to_string();
                prop_assert!(value.parse::<i64>().is_err(), "{}", message);
                prop_assert!(message.contains("`Read` version 1") && message.contains("panicked"), "{}", message);
            }
        }
    }
}
