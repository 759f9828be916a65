//! Every compile-time error of `#[derive(Event)]`, one file per mistake, and
//! the generated code compiling in crates that import nothing but `tidings`.
//!
//! The expected `.stderr` files hold the messages of the rustc named in the
//! workspace's `rust-toolchain.toml`; rustc words and places its notes
//! differently from release to release, so under another compiler the
//! comparison would fail for reasons that are not ours. The test says so
//! instead of comparing.

use std::process::Command;

/// The `channel` of the workspace's `rust-toolchain.toml`.
fn pinned_channel() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../rust-toolchain.toml");
    let text = std::fs::read_to_string(path).expect("rust-toolchain.toml at the workspace root");
    text.lines()
        .find_map(|line| {
            let (key, value) = line.split_once('=')?;
            (key.trim() == "channel").then(|| value.trim().trim_matches('"').to_owned())
        })
        .expect("a channel in rust-toolchain.toml")
}

/// The release of the rustc cargo runs (`RUSTC`, else `rustc`).
fn rustc_release() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let out = Command::new(&rustc)
        .arg("-vV")
        .output()
        .expect("rustc runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("release: ").map(str::to_owned))
        .expect("rustc -vV names its release")
}

#[test]
fn ui() {
    let (pinned, running) = (pinned_channel(), rustc_release());
    assert_eq!(
        running, pinned,
        "the compile-fail cases hold rustc {pinned}'s messages, and this is rustc {running}: \
         run the tests under the workspace's toolchain (rustup reads rust-toolchain.toml), \
         or write the expected messages anew with TRYBUILD=overwrite and review the diff"
    );
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
    t.pass("tests/pass/*.rs");
}
