#[derive(tidings::Event)]
enum OrderEvent {
    #[event(version = 0)]
    OrderCreated { order_id: String },
}

fn main() {}
