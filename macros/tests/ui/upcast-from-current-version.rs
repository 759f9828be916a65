fn up(v: tidings::__private::serde_json::Value) -> Result<tidings::__private::serde_json::Value, tidings::UpcastError> {
    Ok(v)
}

#[derive(tidings::Event)]
enum OrderEvent {
    #[event(version = 2, upcast(from = 2, json = up))]
    OrderCreated { order_id: String },
}

fn main() {}
