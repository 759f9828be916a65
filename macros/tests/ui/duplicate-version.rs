#[derive(tidings::Event)]
enum OrderEvent {
    #[event(version = 2, version = 3)]
    OrderCreated { order_id: String },
}

fn main() {}
