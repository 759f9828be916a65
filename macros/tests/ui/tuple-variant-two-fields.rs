#[derive(tidings::Event)]
enum OrderEvent {
    OrderCreated(String, u64),
}

fn main() {}
