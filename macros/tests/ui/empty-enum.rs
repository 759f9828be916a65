#[derive(tidings::Event)]
enum OrderEvent {}

fn main() {}
