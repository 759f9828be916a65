#[derive(tidings::Event)]
enum OrderEvent<T> {
    OrderCreated { order_id: T },
}

fn main() {}
