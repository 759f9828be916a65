// `retired` takes a name and a version only.
#[derive(tidings::Event)]
#[event(retired(name = "Wrapped", json = nothing))]
enum OrderEvent {
    OrderPlaced { order_id: String },
}

fn main() {}
