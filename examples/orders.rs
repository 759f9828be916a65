//! Orders, operated from the service's own binary.
//!
//! Run: `cargo run -p tidings-examples --example orders -- --help`
//! (with `DATABASE_URL` and `KAFKA_BROKERS` set, e.g. by `scripts/dev.sh env`).
//!
//! Shows how a service embeds every generic `tidings` command (`migrate`,
//! `relay`, `outbox status`, …) next to the commands that need its own code:
//! running, replaying and re-driving its projection, exporting and checking
//! its event schemas, and issuing commands.

use clap::{Parser, Subcommand};
use tidings::cli::{
    Command, GlobalArgs, ProjectionCommand, SchemaCommand, exit_code, init_logging,
};
use tidings::{Error, ExecuteError, Store, StoreConfig};
use tidings_examples::orders::{Order, OrderCommand};
use tidings_examples::summary::OrderSummary;

/// The orders service's operations.
#[derive(Debug, Parser)]
#[command(name = "orders")]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    /// Prefix of the topics (as the store and projections use it).
    #[arg(long, env = "TIDINGS_TOPIC_PREFIX", default_value = "", global = true)]
    topic_prefix: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    #[command(flatten)]
    Tidings(Command),
    /// The order summary projection: run, replay, redrive.
    #[command(subcommand)]
    Summary(ProjectionCommand),
    /// The order events' JSON Schemas: export, check against the lock.
    #[command(subcommand)]
    Schema(SchemaCommand),
    /// Place an order.
    Create {
        /// Order id.
        id: String,
        /// Customer id.
        user: String,
        /// Total.
        amount: f64,
    },
    /// Pay an order.
    Pay {
        /// Order id.
        id: String,
        /// Payment reference.
        payment_id: String,
        /// Amount paid.
        amount: f64,
    },
}

async fn run(cli: Cli) -> tidings::Result<()> {
    match cli.command {
        Cmd::Tidings(command) => command.run(&cli.global).await,
        Cmd::Schema(command) => command.run(&tidings_examples::catalog()),
        Cmd::Summary(command) => {
            let summary = OrderSummary::default();
            let pool = cli.global.pool().await?;
            summary.create_table(&pool).await?;
            let command = match command {
                ProjectionCommand::Run {
                    topic_prefix,
                    metrics_addr,
                    session_timeout_secs,
                    group_instance_id,
                } if topic_prefix.is_empty() => ProjectionCommand::Run {
                    topic_prefix: cli.topic_prefix,
                    metrics_addr,
                    session_timeout_secs,
                    group_instance_id,
                },
                other => other,
            };
            command.run(&cli.global, summary).await
        }
        Cmd::Create { id, user, amount } => {
            let command = OrderCommand::Create {
                order_id: id.clone(),
                user_id: user,
                amount,
                currency: "EUR".into(),
            };
            execute(&cli.global, &cli.topic_prefix, &id, command).await
        }
        Cmd::Pay {
            id,
            payment_id,
            amount,
        } => {
            execute(
                &cli.global,
                &cli.topic_prefix,
                &id,
                OrderCommand::Pay { payment_id, amount },
            )
            .await
        }
    }
}

async fn execute(
    global: &GlobalArgs,
    prefix: &str,
    id: &str,
    command: OrderCommand,
) -> tidings::Result<()> {
    let store = Store::with_config(
        global.pool().await?,
        StoreConfig::default().topic_prefix(prefix),
    );
    match store.execute::<Order>(id, command).await {
        Ok(committed) => {
            println!("order {id}: sequence {}", committed.sequence);
            Ok(())
        }
        // The order said no: a failure of the command (exit code 1), not
        // invalid usage (2).
        Err(ExecuteError::Rejected(why)) => Err(Error::Refused(format!("order {id}: {why}"))),
        Err(ExecuteError::Store(e)) => Err(e),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging();
    exit_code(run(cli).await)
}
