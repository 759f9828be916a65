// One (type, version) both retired and split.
fn checked_out(
    _: tidings::__private::serde_json::Value,
) -> Result<Vec<OrderEvent>, tidings::UpcastError> {
    Ok(vec![])
}

#[derive(tidings::Event)]
#[event(
    retired(name = "CheckedOut", version = 2),
    split(name = "CheckedOut", version = 1, json = checked_out)
)]
enum OrderEvent {
    OrderPlaced { order_id: String },
}

fn main() {}
