#[derive(tidings::Event)]
enum OrderEvent {
    OrderCreated { order_id: String },
    #[event(name = "OrderCreated")]
    OrderPlaced { order_id: String },
}

fn main() {}
