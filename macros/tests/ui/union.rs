#[derive(tidings::Event)]
union OrderEvent {
    created: u32,
}

fn main() {}
