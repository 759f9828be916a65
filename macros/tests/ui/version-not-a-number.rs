#[derive(tidings::Event)]
enum OrderEvent {
    #[event(version = 99999999999)]
    OrderCreated { order_id: String },
}

fn main() {}
