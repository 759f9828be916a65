//! Every compile-time error of `#[derive(Event)]`, one file per mistake, and
//! the generated code compiling in crates that import nothing but `tidings`.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
    t.pass("tests/pass/*.rs");
}
