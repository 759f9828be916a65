fn v1(payload: serde_json::Value) -> Result<serde_json::Value, tidings::UpcastError> {
    Ok(payload)
}

#[derive(tidings::Event)]
enum OrderEvent {
    #[event(version = 2, upcast(from = 1, jsno = v1))]
    OrderCreated { order_id: String },
}

fn main() {}
