//! Events: names, versions, upcasting, decoding errors, envelopes, schemas.

use serde_json::{Value, json};
use tidings::{DecodeError, Envelope, Event, EventContext, RawEnvelope, UpcastError};

/// Version 1 of `OrderCreated` was called `OrderPlaced` and had no currency.
fn order_placed_v1(mut payload: Value) -> Result<Value, UpcastError> {
    let object = payload
        .as_object_mut()
        .ok_or_else(|| UpcastError::new("not an object"))?;
    if !object.contains_key("order_id") {
        return Err(UpcastError::missing_field("order_id"));
    }
    object.insert("currency".into(), json!("EUR"));
    Ok(payload)
}

/// Version 2: amounts in cents.
#[derive(serde::Deserialize, schemars::JsonSchema)]
struct OrderCreatedV2 {
    order_id: String,
    amount_cents: i64,
    currency: String,
}

impl From<OrderCreatedV2> for OrderEvent {
    fn from(v2: OrderCreatedV2) -> Self {
        OrderEvent::OrderCreated {
            order_id: v2.order_id,
            amount: v2.amount_cents as f64 / 100.0,
            currency: v2.currency,
            note: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct Payment {
    order_id: String,
    payment_id: String,
}

/// Version 1 of `LegacyRefund`: JSON-only chain of two steps.
fn refund_v1(mut payload: Value) -> Result<Value, UpcastError> {
    payload["reason"] = json!("unspecified");
    Ok(payload)
}

fn refund_v2(mut payload: Value) -> Result<Value, UpcastError> {
    let cents = payload["cents"]
        .as_i64()
        .ok_or_else(|| UpcastError::missing_field("cents"))?;
    payload["amount"] = json!(cents as f64 / 100.0);
    payload.as_object_mut().unwrap().remove("cents");
    Ok(payload)
}

#[derive(Debug, Clone, PartialEq, Event)]
#[event(topic = "orders")]
enum OrderEvent {
    /// An order was created.
    #[event(
        version = 3,
        upcast(from = 1, name = "OrderPlaced", json = order_placed_v1),
        upcast(from = 2, typed = OrderCreatedV2)
    )]
    OrderCreated {
        order_id: String,
        amount: f64,
        currency: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
    PaymentProcessed(Payment),
    #[event(name = "OrderCancelled")]
    Cancelled,
    #[event(version = 3, upcast(from = 1, json = refund_v1), upcast(from = 2, json = refund_v2))]
    Refunded {
        amount: f64,
        reason: String,
    },
}

#[test]
fn names_versions_and_topic() {
    assert_eq!(OrderEvent::TOPIC, Some("orders"));
    let types: Vec<(&str, u32)> = OrderEvent::TYPES
        .iter()
        .map(|t| (t.name, t.version))
        .collect();
    assert_eq!(
        types,
        [
            ("OrderCreated", 3),
            ("PaymentProcessed", 1),
            ("OrderCancelled", 1),
            ("Refunded", 3)
        ]
    );
    assert_eq!(OrderEvent::Cancelled.event_type(), "OrderCancelled");
    assert_eq!(OrderEvent::Cancelled.event_version(), 1);
    assert_eq!(OrderEvent::Cancelled.to_payload().unwrap(), json!({}));
}

#[test]
fn current_versions_round_trip() {
    let events = [
        OrderEvent::OrderCreated {
            order_id: "ORD-1".into(),
            amount: 1499.99,
            currency: "USD".into(),
            note: Some("gift".into()),
        },
        OrderEvent::PaymentProcessed(Payment {
            order_id: "ORD-1".into(),
            payment_id: "P-9".into(),
        }),
        OrderEvent::Cancelled,
        OrderEvent::Refunded {
            amount: 3.5,
            reason: "broken".into(),
        },
    ];
    for event in events {
        let payload = event.to_payload().unwrap();
        let back = OrderEvent::decode(event.event_type(), event.event_version(), payload).unwrap();
        assert_eq!(back, event);
    }
}

#[test]
fn field_serde_attributes_apply() {
    let event = OrderEvent::OrderCreated {
        order_id: "ORD-1".into(),
        amount: 1.0,
        currency: "EUR".into(),
        note: None,
    };
    assert_eq!(
        event.to_payload().unwrap(),
        json!({"order_id": "ORD-1", "amount": 1.0, "currency": "EUR"})
    );
}

#[test]
fn renamed_json_then_typed_upcast_reaches_the_current_version() {
    // v1 was `OrderPlaced`; JSON upcaster to v2, typed upcaster to v3.
    let v1 = json!({"order_id": "ORD-7", "amount_cents": 1250});
    let event = OrderEvent::decode("OrderPlaced", 1, v1).unwrap();
    assert_eq!(
        event,
        OrderEvent::OrderCreated {
            order_id: "ORD-7".into(),
            amount: 12.5,
            currency: "EUR".into(),
            note: None
        }
    );
    let v2 = json!({"order_id": "ORD-8", "amount_cents": 100, "currency": "USD"});
    let event = OrderEvent::decode("OrderCreated", 2, v2).unwrap();
    assert_eq!(event.event_version(), 3);
}

#[test]
fn multi_step_json_upcasting() {
    let v1 = json!({"cents": 250});
    assert_eq!(
        OrderEvent::decode("Refunded", 1, v1).unwrap(),
        OrderEvent::Refunded {
            amount: 2.5,
            reason: "unspecified".into()
        }
    );
    let v2 = json!({"cents": 100, "reason": "late"});
    assert_eq!(
        OrderEvent::decode("Refunded", 2, v2).unwrap(),
        OrderEvent::Refunded {
            amount: 1.0,
            reason: "late".into()
        }
    );
}

#[test]
fn decoding_errors_name_the_type_and_version() {
    let error = OrderEvent::decode("OrderShipped", 1, json!({})).unwrap_err();
    assert!(
        matches!(&error, DecodeError::UnknownType { event_type, version: 1 } if event_type == "OrderShipped")
    );
    assert_eq!(
        error.to_string(),
        "unknown event type `OrderShipped` (version 1)"
    );

    let error = OrderEvent::decode("OrderCreated", 4, json!({})).unwrap_err();
    assert!(matches!(
        error,
        DecodeError::FutureVersion {
            version: 4,
            current: 3,
            ..
        }
    ));
    assert!(
        error
            .to_string()
            .contains("newer than the current version 3")
    );

    // `OrderCreated` v1 does not exist: v1 was called `OrderPlaced`.
    let error = OrderEvent::decode("OrderCreated", 1, json!({})).unwrap_err();
    assert!(matches!(
        error,
        DecodeError::NoUpcaster {
            version: 1,
            current: 3,
            ..
        }
    ));

    let error = OrderEvent::decode("OrderCreated", 3, json!({"order_id": 5})).unwrap_err();
    assert!(
        matches!(&error, DecodeError::Payload { event_type, version: 3, .. } if event_type == "OrderCreated")
    );

    let error = OrderEvent::decode("OrderPlaced", 1, json!({"amount_cents": 1})).unwrap_err();
    assert!(matches!(error, DecodeError::Upcast { version: 1, .. }));
    assert!(
        error.to_string().contains("missing field `order_id`"),
        "{error}"
    );

    // This upcaster indexes into a string and panics: still just an error.
    let error = OrderEvent::decode("Refunded", 1, json!("not an object")).unwrap_err();
    assert!(
        matches!(error, DecodeError::Upcast { version: 1, .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains("the upcaster panicked"),
        "{error}"
    );
}

#[test]
fn malformed_envelopes_are_errors() {
    for bytes in [
        &b""[..],
        b"{",
        b"\x00\xff\x10garbage",
        br#"{"event_type":"OrderCreated"}"#,
        br#"{"event_type":"OrderCreated","event_version":-1,"event_id":"x"}"#,
        br#"[1,2,3]"#,
    ] {
        let error = RawEnvelope::from_slice(bytes).unwrap_err();
        assert!(matches!(error, DecodeError::Envelope(_)), "{error}");
    }
}

#[test]
fn envelope_json_round_trips_exactly() {
    let json = r#"{"event_type":"OrderCreated","event_version":1,"event_id":"0196a0b2-6a4e-7b6c-9d7e-3f2a1b0c9d8e","timestamp":"2026-04-16T10:30:00.123456Z","aggregate_type":"order","aggregate_id":"ORD-123","sequence":1,"correlation_id":"req-1","causation_id":null,"metadata":{"tenant":"acme"},"payload":{"order_id":"ORD-123","user_id":"USR-456","amount":1499.99}}"#;
    let envelope = RawEnvelope::from_slice(json.as_bytes()).unwrap();
    assert_eq!(envelope.to_json(), json);
    assert_eq!(envelope.metadata["tenant"], "acme");
    let headers = envelope.headers();
    assert_eq!(headers[0], ("event_type", "OrderCreated".to_owned()));
    assert_eq!(headers[1], ("event_version", "1".to_owned()));
}

#[test]
fn envelopes_encode_and_decode_typed_events() {
    let context = EventContext::new()
        .correlation_id("req-7")
        .metadata("tenant", "acme");
    let event = OrderEvent::PaymentProcessed(Payment {
        order_id: "O".into(),
        payment_id: "P".into(),
    });
    let typed = Envelope::new("order", "O", 2, event.clone(), &context);
    let raw = typed.encode().unwrap();
    assert_eq!(raw.event_type, "PaymentProcessed");
    assert_eq!(raw.correlation_id.as_deref(), Some("req-7"));
    let parsed = RawEnvelope::from_slice(raw.to_json().as_bytes()).unwrap();
    assert_eq!(parsed, raw);
    let decoded = parsed.decode::<OrderEvent>().unwrap();
    assert_eq!(decoded.payload, event);
    assert_eq!(decoded.event_id, typed.event_id);
    assert_eq!(decoded.timestamp, typed.timestamp);

    // An old version on the wire arrives upcast, with the current type and version.
    let mut old = raw.clone();
    old.event_type = "OrderPlaced".into();
    old.event_version = 1;
    old.payload = json!({"order_id": "O", "amount_cents": 500});
    let decoded = old.decode::<OrderEvent>().unwrap();
    assert_eq!(
        (decoded.event_type.as_str(), decoded.event_version),
        ("OrderCreated", 3)
    );

    let caused = EventContext::caused_by(&decoded);
    assert_eq!(caused.correlation_id.as_deref(), Some("req-7"));
    assert_eq!(caused.causation_id, Some(decoded.event_id.to_string()));
}

#[test]
fn schemas_cover_current_and_typed_old_versions_and_export() {
    let schemas = OrderEvent::schemas();
    let mut keys: Vec<(&str, u32)> = schemas.iter().map(|s| (s.event_type, s.version)).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            ("OrderCancelled", 1),
            ("OrderCreated", 2),
            ("OrderCreated", 3),
            ("PaymentProcessed", 1),
            ("Refunded", 3)
        ]
    );
    let created = schemas
        .iter()
        .find(|s| (s.event_type, s.version) == ("OrderCreated", 3))
        .unwrap();
    let value = created.schema.as_value();
    assert_eq!(value["title"], "OrderCreated");
    assert_eq!(value["description"], "An order was created.");
    let required: Vec<&str> = value["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(required, ["order_id", "amount", "currency"]);

    let dir = std::env::temp_dir().join(format!("tidings-schemas-{}", uuid::Uuid::now_v7()));
    let written = tidings::schema::export::<OrderEvent>(&dir).unwrap();
    assert_eq!(written.len(), 5);
    let text = std::fs::read_to_string(dir.join("OrderCreated.v3.json")).unwrap();
    let parsed: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(&parsed, value);
    assert!(dir.join("OrderCreated.v2.json").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

mod retired_and_split {
    use serde_json::Value;
    use tidings::UpcastError;

    /// `Checked` v1 carried an order and its payment; read as both today.
    #[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
    pub(crate) struct CheckedV1 {
        pub(crate) total: i64,
        pub(crate) by: String,
    }

    impl From<CheckedV1> for Vec<ShopEvent> {
        fn from(v1: CheckedV1) -> Self {
            vec![
                ShopEvent::Placed { total: v1.total },
                ShopEvent::Paid { by: v1.by },
            ]
        }
    }

    /// `Bundled` v1 held several items, read as one `Added` each.
    pub(crate) fn bundled(payload: Value) -> Result<Vec<ShopEvent>, UpcastError> {
        let items = payload["skus"]
            .as_array()
            .ok_or_else(|| UpcastError::missing_field("skus"))?;
        Ok(items
            .iter()
            .filter_map(|s| s.as_str())
            .map(|sku| ShopEvent::Added { sku: sku.into() })
            .collect())
    }

    #[derive(Debug, Clone, PartialEq, tidings::Event)]
    #[event(
        topic = "shop",
        retired(name = "Wrapped", version = 2),
        split(name = "Checked", version = 1, typed = CheckedV1),
        split(name = "Bundled", version = 1, json = bundled)
    )]
    pub(crate) enum ShopEvent {
        Added { sku: String },
        Placed { total: i64 },
        Paid { by: String },
    }
}

#[test]
fn retired_types_read_as_nothing_and_split_ones_as_their_parts_in_order() {
    use retired_and_split::ShopEvent;
    use tidings::Reading;

    for version in [1, 2] {
        assert_eq!(
            ShopEvent::read("Wrapped", version, json!({"note": "x"})).unwrap(),
            Reading::Retired
        );
    }
    assert!(matches!(
        ShopEvent::read("Wrapped", 3, json!({})),
        Err(DecodeError::UnknownType { .. })
    ));
    assert_eq!(
        ShopEvent::read("Checked", 1, json!({"total": 5, "by": "card"}))
            .unwrap()
            .into_vec(),
        vec![
            ShopEvent::Placed { total: 5 },
            ShopEvent::Paid { by: "card".into() }
        ]
    );
    assert_eq!(
        ShopEvent::read("Bundled", 1, json!({"skus": ["a", "b", "c"]}))
            .unwrap()
            .into_vec()
            .len(),
        3
    );
    assert_eq!(
        ShopEvent::read("Added", 1, json!({"sku": "a"})).unwrap(),
        Reading::One(ShopEvent::Added { sku: "a".into() })
    );

    // Through an envelope, a split's parts keep the stored sequence; the
    // first keeps the event id, the others get their own, the same on
    // every read.
    let stored = RawEnvelope {
        event_type: "Checked".into(),
        event_version: 1,
        event_id: uuid::Uuid::now_v7(),
        timestamp: tidings::now_micros(),
        aggregate_type: "shop".into(),
        aggregate_id: "S-1".into(),
        sequence: 7,
        correlation_id: None,
        causation_id: None,
        metadata: Default::default(),
        payload: json!({"total": 5, "by": "card"}),
    };
    let parts = stored.clone().read::<ShopEvent>().unwrap().into_vec();
    let again = stored.clone().read::<ShopEvent>().unwrap().into_vec();
    assert_eq!(parts.len(), 2);
    assert!(parts.iter().all(|p| p.sequence == 7));
    assert_eq!(parts[0].event_id, stored.event_id);
    assert_ne!(parts[1].event_id, stored.event_id);
    assert_eq!(parts[1].event_id, again[1].event_id);
    assert_eq!(parts[1].event_id, tidings::part_id(stored.event_id, 1));
    assert_eq!(
        (parts[0].event_type.as_str(), parts[1].event_type.as_str()),
        ("Placed", "Paid")
    );

    // `decode` reads only what is one event, and says why not.
    let retired = ShopEvent::decode("Wrapped", 1, json!({})).unwrap_err();
    assert!(
        matches!(retired, DecodeError::Retired { version: 1, .. }),
        "{retired}"
    );
    let split = ShopEvent::decode("Checked", 1, json!({"total": 5, "by": "card"})).unwrap_err();
    assert!(
        matches!(split, DecodeError::Split { count: 2, .. }),
        "{split}"
    );
    assert_eq!(
        ShopEvent::decode("Bundled", 1, json!({"skus": ["a"]})).unwrap(),
        ShopEvent::Added { sku: "a".into() }
    );
    let refused = ShopEvent::read("Bundled", 1, json!({})).unwrap_err();
    assert!(
        refused.to_string().contains("`Bundled` version 1") && refused.to_string().contains("skus"),
        "{refused}"
    );

    // What the schema lock and the catalog see: every (name, version) read,
    // and a schema for the typed split.
    let mut reads: Vec<(&str, u32)> = ShopEvent::READS
        .iter()
        .map(|t| (t.name, t.version))
        .collect();
    reads.sort_unstable();
    assert_eq!(
        reads,
        [
            ("Added", 1),
            ("Bundled", 1),
            ("Checked", 1),
            ("Paid", 1),
            ("Placed", 1),
            ("Wrapped", 1),
            ("Wrapped", 2)
        ]
    );
    assert!(
        ShopEvent::schemas()
            .iter()
            .any(|s| s.event_type == "Checked" && s.version == 1)
    );
}

/// `read_json` (what a projection runner calls on a message's payload text)
/// reads what `read` reads from the parsed payload: current versions straight
/// into the type, retired, split and upcast ones through `read`.
#[test]
fn reading_a_payload_from_its_text_reads_what_reading_its_value_does() {
    use retired_and_split::ShopEvent;
    use serde_json::value::RawValue;

    let cases = [
        ("Added", 1, json!({"sku": "a"})),
        ("Wrapped", 1, json!({"note": "x"})),
        ("Wrapped", 2, json!({})),
        ("Wrapped", 3, json!({})),
        ("Checked", 1, json!({"total": 5, "by": "card"})),
        ("Bundled", 1, json!({"skus": ["a", "b", "c"]})),
        ("Added", 1, json!({"sku": 7})),
        ("Nope", 1, json!({})),
    ];
    for (event_type, version, payload) in cases {
        let text = RawValue::from_string(payload.to_string()).unwrap();
        let from_text = ShopEvent::read_json(event_type, version, &text);
        let from_value = ShopEvent::read(event_type, version, payload);
        match (&from_text, &from_value) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{event_type} v{version}"),
            (Err(a), Err(b)) => assert_eq!(
                std::mem::discriminant(a),
                std::mem::discriminant(b),
                "{event_type} v{version}: {a} / {b}"
            ),
            _ => panic!("{event_type} v{version}: {from_text:?} / {from_value:?}"),
        }
    }

    // Upcast versions go through the upcasters; the current one is read straight.
    let v1 =
        RawValue::from_string(r#"{"order_id": "ORD-7", "amount_cents": 1250}"#.to_owned()).unwrap();
    let expected = OrderEvent::OrderCreated {
        order_id: "ORD-7".into(),
        amount: 12.5,
        currency: "EUR".into(),
        note: None,
    };
    assert_eq!(
        OrderEvent::read_json("OrderPlaced", 1, &v1).unwrap(),
        tidings::Reading::One(expected.clone())
    );
    let current = RawValue::from_string(expected.to_payload().unwrap().to_string()).unwrap();
    assert_eq!(
        OrderEvent::read_json("OrderCreated", 3, &current).unwrap(),
        tidings::Reading::One(expected)
    );

    // Read straight, a repeated key is refused, naming the type and version.
    let repeated = RawValue::from_string(r#"{"sku": "a", "sku": "b"}"#.to_owned()).unwrap();
    let error = ShopEvent::read_json("Added", 1, &repeated).unwrap_err();
    assert!(
        matches!(error, DecodeError::Payload { version: 1, .. })
            && error.to_string().contains("duplicate field"),
        "{error}"
    );
}
