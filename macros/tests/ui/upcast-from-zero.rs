fn v0(payload: serde_json::Value) -> Result<serde_json::Value, tidings::UpcastError> {
    Ok(payload)
}

#[derive(tidings::Event)]
enum OrderEvent {
    #[event(version = 2, upcast(from = 0, json = v0))]
    OrderCreated { order_id: String },
}

fn main() {}
