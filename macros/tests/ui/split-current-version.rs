// Splitting the current version of a variant: it is read as itself.
fn placed(
    _: tidings::__private::serde_json::Value,
) -> Result<Vec<OrderEvent>, tidings::UpcastError> {
    Ok(vec![])
}

#[derive(tidings::Event)]
#[event(split(name = "OrderPlaced", version = 1, json = placed))]
enum OrderEvent {
    OrderPlaced { order_id: String },
}

fn main() {}
