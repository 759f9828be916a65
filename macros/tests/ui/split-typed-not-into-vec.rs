// A typed split's payload type must convert into the events.
#[derive(serde::Deserialize, schemars::JsonSchema)]
struct CheckedOutV1 {
    total: i64,
}

#[derive(tidings::Event)]
#[event(split(name = "CheckedOut", version = 1, typed = CheckedOutV1))]
enum OrderEvent {
    OrderPlaced { total: i64 },
}

fn main() {}
