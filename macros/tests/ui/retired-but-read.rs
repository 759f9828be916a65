// Retiring a version a variant still reads.
#[derive(tidings::Event)]
#[event(retired(name = "OrderCreated", version = 1))]
enum OrderEvent {
    OrderCreated { order_id: String },
}

fn main() {}
