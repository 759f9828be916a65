fn up(v: tidings::__private::serde_json::Value) -> Result<tidings::__private::serde_json::Value, tidings::UpcastError> {
    Ok(v)
}

#[derive(tidings::Event)]
enum OrderEvent {
    OrderPlaced { order_id: String },
    #[event(version = 2, upcast(from = 1, name = "OrderPlaced", json = up))]
    OrderCreated { order_id: String },
}

fn main() {}
