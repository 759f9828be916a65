fn up(v: String) -> String {
    v
}

#[derive(tidings::Event)]
enum OrderEvent {
    #[event(version = 2, upcast(from = 1, json = up))]
    OrderCreated { order_id: String },
}

fn main() {}
