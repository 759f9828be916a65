#[derive(tidings::Event)]
enum OrderEvent {
    #[event(version = 2, upcast(from = 1))]
    OrderCreated { order_id: String },
}

fn main() {}
