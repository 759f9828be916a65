#[derive(tidings::Event)]
struct OrderCreated {
    order_id: String,
}

fn main() {}
