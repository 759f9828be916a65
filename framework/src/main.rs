//! The `tidings` command line: generic operations on a tidings deployment.
//! See `tidings --help`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tidings::cli::main().await
}
