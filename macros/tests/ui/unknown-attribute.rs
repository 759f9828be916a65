#[derive(tidings::Event)]
enum OrderEvent {
    #[event(versoin = 2)]
    OrderCreated { order_id: String },
}

fn main() {}
