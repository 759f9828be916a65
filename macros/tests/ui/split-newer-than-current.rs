// Splitting a version newer than the variant's current one.
fn placed(
    _: tidings::__private::serde_json::Value,
) -> Result<Vec<OrderEvent>, tidings::UpcastError> {
    Ok(vec![])
}

#[derive(tidings::Event)]
#[event(split(name = "OrderPlaced", version = 3, json = placed))]
enum OrderEvent {
    OrderPlaced { order_id: String },
}

fn main() {}
