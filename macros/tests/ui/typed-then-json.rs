fn up(v: tidings::__private::serde_json::Value) -> Result<tidings::__private::serde_json::Value, tidings::UpcastError> {
    Ok(v)
}

struct OrderCreatedV1 {
    id: String,
}

#[derive(tidings::Event)]
enum OrderEvent {
    #[event(version = 3, upcast(from = 1, typed = OrderCreatedV1), upcast(from = 2, json = up))]
    OrderCreated { order_id: String },
}

fn main() {}
