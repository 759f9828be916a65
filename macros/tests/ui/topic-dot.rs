#[derive(tidings::Event)]
#[event(topic = "..")]
enum OrderEvent {
    OrderCreated { order_id: String },
}

fn main() {}
