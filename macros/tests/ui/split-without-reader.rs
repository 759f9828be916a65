// A split must say how the old payload becomes events.
#[derive(tidings::Event)]
#[event(split(name = "CheckedOut", version = 1))]
enum OrderEvent {
    OrderPlaced { order_id: String },
}

fn main() {}
