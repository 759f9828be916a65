#[derive(tidings::Event)]
#[event(topik = "orders")]
enum OrderEvent {
    OrderCreated { order_id: String },
}

fn main() {}
