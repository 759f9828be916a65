//! The generated code needs nothing in scope but the derive itself: no serde,
//! serde_json or schemars imports; local items named like theirs, or like
//! std's, do not break it.

#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq)]
struct Payment {
    id: String,
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct OrderCreatedV1 {
    id: String,
}

mod events {
    #![allow(dead_code)]
    // Shadows of what generated code could wrongly refer to.
    mod serde {}
    mod serde_json {}
    mod schemars {}
    struct Result;
    struct Option;
    struct Vec;
    struct Value;

    #[derive(Debug, Clone, PartialEq, ::tidings::Event)]
    #[event(topic = "orders")]
    pub(crate) enum OrderEvent {
        #[event(version = 2, upcast(from = 1, typed = super::OrderCreatedV1))]
        OrderCreated { order_id: ::std::string::String, amount: u64 },
        PaymentProcessed(super::Payment),
        Cancelled,
    }

    impl ::core::convert::From<super::OrderCreatedV1> for OrderEvent {
        fn from(v1: super::OrderCreatedV1) -> Self {
            OrderEvent::OrderCreated { order_id: v1.id, amount: 0 }
        }
    }
}

fn main() {
    use tidings::Event as _;
    let event = events::OrderEvent::Cancelled;
    assert_eq!(event.event_type(), "Cancelled");
    let payload = tidings::__private::serde_json::json!({"id": "ORD-1"});
    let upcast = events::OrderEvent::decode("OrderCreated", 1, payload).unwrap();
    assert_eq!(upcast, events::OrderEvent::OrderCreated { order_id: "ORD-1".into(), amount: 0 });
    assert_eq!(events::OrderEvent::schemas().len(), 4);
}
