#[derive(tidings::Event)]
#[event(topic = "orders and payments")]
enum OrderEvent {
    OrderCreated { order_id: String },
}

fn main() {}
