#[derive(tidings::Event)]
enum OrderEvent {
    #[event(name = "")]
    OrderCreated { order_id: String },
}

fn main() {}
