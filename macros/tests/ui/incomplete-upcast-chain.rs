fn up(v: tidings::__private::serde_json::Value) -> Result<tidings::__private::serde_json::Value, tidings::UpcastError> {
    Ok(v)
}

#[derive(tidings::Event)]
enum OrderEvent {
    #[event(version = 4, upcast(from = 1, json = up), upcast(from = 3, json = up))]
    OrderCreated { order_id: String },
}

fn main() {}
