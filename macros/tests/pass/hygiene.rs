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

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct CheckoutV1 {
    id: String,
}

impl From<CheckoutV1> for Vec<events::OrderEvent> {
    fn from(v1: CheckoutV1) -> Self {
        vec![events::OrderEvent::OrderCreated { order_id: v1.id, amount: 0 }, events::OrderEvent::Cancelled]
    }
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

    struct Reading;
    struct DecodeError;

    #[derive(Debug, Clone, PartialEq, ::tidings::Event)]
    #[event(
        topic = "orders",
        retired(name = "GiftWrapped", version = 2),
        split(name = "Checkout", version = 1, typed = super::CheckoutV1)
    )]
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
    assert_eq!(events::OrderEvent::schemas().len(), 5);
    let retired = events::OrderEvent::read("GiftWrapped", 2, tidings::__private::serde_json::json!({})).unwrap();
    assert_eq!(retired, tidings::Reading::Retired);
    let split = events::OrderEvent::read("Checkout", 1, tidings::__private::serde_json::json!({"id": "O"})).unwrap();
    assert_eq!(split.into_vec().len(), 2);
}
