// `retired` must say up to which version the type is dropped.
#[derive(tidings::Event)]
#[event(retired(name = "GiftWrapped"))]
enum OrderEvent {
    OrderPlaced { order_id: String },
}

fn main() {}
