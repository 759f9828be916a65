//! The `tidings` command line, also embeddable in a user's own binary.
//!
//! The generic binary offers what needs no user code: `migrate`, `relay`,
//! `outbox status`, `projections status`, `dlq list` and `stream show`. A user's binary can flatten
//! [`Command`] into its own clap command and add the commands that need its
//! code. Exit codes: 0 success, 1 operation failed, 2 invalid usage or
//! configuration.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::error::{Error, Result};
use crate::kafka::{KafkaConfig, TopicSpec};
use crate::relay::{Relay, RelayConfig};

/// Operate a tidings deployment: migrations, the outbox relay, status and streams.
#[derive(Debug, Parser)]
#[command(name = "tidings", version, about, long_about = None)]
pub struct Cli {
    /// Connection settings.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Settings every command shares. Its `Debug` output hides the database
/// password and secret Kafka properties.
#[derive(Clone, Args)]
pub struct GlobalArgs {
    /// PostgreSQL URL (postgres://user:password@host:port/database).
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "KAFKA_BROKERS", global = true)]
    pub brokers: Option<String>,
    /// A librdkafka property passed through as it is (repeatable), e.g.
    /// -X security.protocol=SASL_SSL -X sasl.mechanism=SCRAM-SHA-512.
    #[arg(
        short = 'X',
        long = "kafka-property",
        value_name = "KEY=VALUE",
        global = true
    )]
    pub kafka_properties: Vec<String>,
}

/// The generic commands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Apply the tidings migrations to the database.
    Migrate,
    /// Publish the outbox to Kafka until SIGTERM or Ctrl-C.
    Relay(RelayArgs),
    /// Inspect the outbox.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Inspect event streams.
    #[command(subcommand)]
    Stream(StreamCommand),
    /// Inspect projections.
    #[command(subcommand)]
    Projections(ProjectionsCommand),
    /// Inspect dead-lettered and parked events.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

/// `tidings projections …`.
#[derive(Debug, Clone, Subcommand)]
pub enum ProjectionsCommand {
    /// Generation, position, lag per partition and parked events of every projection.
    Status,
    /// Retire an old version after readers moved to its replacement: fence
    /// and stop its runners, delete its positions and parked events, its
    /// consumer groups and its dead letter topic.
    Retire {
        /// The projection to retire.
        name: String,
        /// Prefix of its topics (as its runners ran with).
        #[arg(long, env = "TIDINGS_TOPIC_PREFIX", default_value = "")]
        topic_prefix: String,
        /// Seconds to wait for its runners to leave the consumer group.
        #[arg(long, default_value_t = 30)]
        wait_secs: u64,
    },
}

/// `tidings dlq …`.
#[derive(Debug, Clone, Subcommand)]
pub enum DlqCommand {
    /// List parked events (the dead-lettered ones and those waiting behind them).
    List {
        /// Only this projection's.
        #[arg(long)]
        projection: Option<String>,
    },
    /// One parked event: why, where from, its key, headers and payload.
    Show {
        /// The parked event's id (from `dlq list`).
        id: i64,
    },
    /// Discard a dead letter for good (recorded with the note in
    /// `tidings_dlq_skipped`) so that its stream moves on; then re-drive the
    /// projection to apply the events parked behind it.
    Skip {
        /// The dead letter's id (from `dlq list`).
        id: i64,
        /// Why it is discarded (kept with it).
        #[arg(long)]
        note: String,
    },
}

/// Schema commands, which need the user's event types: offer them from
/// your own binary with `#[command(subcommand)] Schema(SchemaCommand)` and
/// [`SchemaCommand::run`].
#[derive(Debug, Clone, Subcommand)]
pub enum SchemaCommand {
    /// Write the JSON Schema of every event type and version as `<type>.v<version>.json`.
    Export {
        /// The folder to write into (created if missing).
        #[arg(long, default_value = "schemas")]
        dir: std::path::PathBuf,
    },
    /// Compare the schemas with the committed lock file: print each change
    /// as compatible or breaking, and exit 1 on a breaking change without a
    /// version bump, saying what to do (`TIDINGS_BLESS=1` rewrites the lock).
    Check {
        /// The lock file.
        #[arg(long, default_value = "events.lock")]
        lock: std::path::PathBuf,
    },
    /// Write an AsyncAPI 3.0 document of the topics, their messages and
    /// payload schemas.
    Asyncapi {
        /// Where to write it (`-` for standard output).
        #[arg(long, default_value = "-")]
        out: std::path::PathBuf,
        /// The service's name (default: this program's name).
        #[arg(long)]
        title: Option<String>,
        /// The service's version.
        #[arg(long, default_value = "1.0.0")]
        service_version: String,
        /// Prepended to every topic, as the relay does.
        #[arg(long, env = "TIDINGS_TOPIC_PREFIX", default_value = "")]
        topic_prefix: String,
    },
}

impl SchemaCommand {
    /// Runs the command over `catalog` (e.g. `Catalog::of::<OrderEvent>()`,
    /// with more enums added).
    pub fn run(self, catalog: &crate::schema::Catalog) -> Result<()> {
        match self {
            SchemaCommand::Export { dir } => {
                let written =
                    crate::schema::export_schemas(&catalog.schemas(), &dir).map_err(|e| {
                        Error::Config(format!("exporting schemas to {}: {e}", dir.display()))
                    })?;
                for path in written {
                    println!("{}", path.display());
                }
                Ok(())
            }
            SchemaCommand::Check { lock } => match catalog.check_lock(&lock) {
                Ok(report) => {
                    println!("{report}");
                    Ok(())
                }
                Err(mismatch) => Err(Error::SchemaMismatch(mismatch.to_string())),
            },
            SchemaCommand::Asyncapi {
                out,
                title,
                service_version,
                topic_prefix,
            } => {
                let title = title.unwrap_or_else(program_name);
                let mut info = crate::schema::AsyncApiInfo::new(title, service_version);
                info.topic_prefix = topic_prefix;
                let document = catalog
                    .asyncapi(&info)
                    .map_err(|e| Error::Config(format!("describing the topics: {e}")))?;
                let mut text = serde_json::to_string_pretty(&document)
                    .map_err(|e| Error::Config(e.to_string()))?;
                text.push('\n');
                if out.as_os_str() == "-" {
                    print!("{text}");
                    Ok(())
                } else {
                    std::fs::write(&out, text)
                        .map_err(|e| Error::Config(format!("writing {}: {e}", out.display())))
                }
            }
        }
    }
}

/// This program's file name, without extension.
fn program_name() -> String {
    std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "tidings".into())
}

/// Commands that need the user's projection code: offer them from your own
/// binary with `#[command(subcommand)] Projection(ProjectionCommand)` and
/// [`ProjectionCommand::run`].
#[derive(Debug, Clone, Subcommand)]
pub enum ProjectionCommand {
    /// Run the projection until SIGTERM or Ctrl-C.
    Run {
        /// Prefix of the topics read (as the store's topic prefix).
        #[arg(long, env = "TIDINGS_TOPIC_PREFIX", default_value = "")]
        topic_prefix: String,
        /// Serve /metrics, /health and /ready on this address.
        #[arg(long, env = "TIDINGS_METRICS_ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Seconds the group waits for a silent member before moving its
        /// partitions.
        #[arg(long, env = "TIDINGS_SESSION_TIMEOUT_SECS", default_value_t = 8)]
        session_timeout_secs: u64,
        /// Static membership: this instance's stable id in the group (each
        /// running instance needs its own).
        #[arg(long, env = "TIDINGS_GROUP_INSTANCE_ID")]
        group_instance_id: Option<String>,
    },
    /// Rebuild the read model from the beginning of the topics (running
    /// instances pick the new generation up by themselves).
    Replay,
    /// Re-apply parked events in order.
    Redrive {
        /// Only this stream, as `<aggregate type>/<aggregate id>`.
        #[arg(long)]
        stream: Option<String>,
    },
    /// Discard one dead letter (recorded with the note) and re-drive the
    /// events parked behind it.
    Skip {
        /// The dead letter's id (from `dlq list`).
        id: i64,
        /// Why it is discarded (kept with it).
        #[arg(long)]
        note: String,
    },
}

impl ProjectionCommand {
    /// Runs the command for `projection`.
    pub async fn run<P: crate::projection::Projection>(
        self,
        global: &GlobalArgs,
        projection: P,
    ) -> Result<()> {
        let pool = global.pool().await?;
        match self {
            ProjectionCommand::Run {
                topic_prefix,
                metrics_addr,
                session_timeout_secs,
                group_instance_id,
            } => {
                let kafka = global.kafka()?;
                let name = projection.name().to_owned();
                let mut config = crate::projection::RunnerConfig::new(kafka.clone())
                    .topic_prefix(topic_prefix)
                    .session_timeout(Duration::from_secs(session_timeout_secs));
                if let Some(id) = group_instance_id {
                    config = config.group_instance_id(id);
                }
                let runner = crate::projection::Runner::new(pool.clone(), projection, config)?;
                if let Some(addr) = metrics_addr {
                    let metrics = crate::metrics::Metrics::new(pool, Some(kafka));
                    metrics.runner(&name, runner.topics(), runner.stats());
                    let bound = crate::metrics::serve(addr, metrics, shutdown_signal()).await?;
                    tracing::info!(%bound, "serving /metrics, /health and /ready");
                }
                runner.run(shutdown_signal()).await
            }
            ProjectionCommand::Replay => {
                let generation = crate::projection::replay(&pool, &projection).await?;
                println!(
                    "projection {} reset; generation {generation} rebuilds from the beginning",
                    projection.name()
                );
                Ok(())
            }
            ProjectionCommand::Redrive { stream } => {
                let report = match stream {
                    None => crate::projection::redrive(&pool, &projection).await?,
                    Some(stream) => {
                        let (kind, id) = stream.split_once('/').ok_or_else(|| {
                            Error::Config(format!(
                                "--stream `{stream}` is not of the form <aggregate type>/<aggregate id>"
                            ))
                        })?;
                        crate::projection::redrive_stream(&pool, &projection, kind, id).await?
                    }
                };
                println!(
                    "re-driven: {} applied, {} already applied, {} still parked",
                    report.applied, report.skipped, report.still_parked
                );
                Ok(())
            }
            ProjectionCommand::Skip { id, note } => {
                let skipped = crate::projection::skip_dead_letter(&pool, id, &note).await?;
                let report = crate::projection::redrive_stream(
                    &pool,
                    &projection,
                    &skipped.aggregate_type,
                    &skipped.aggregate_id,
                )
                .await?;
                println!(
                    "skipped {} ({}/{} seq {}); re-driven behind it: {} applied, {} still parked",
                    skipped.id,
                    skipped.aggregate_type,
                    skipped.aggregate_id,
                    skipped.sequence.map_or("?".into(), |s| s.to_string()),
                    report.applied,
                    report.still_parked
                );
                Ok(())
            }
        }
    }
}

/// Options of `tidings relay`.
#[derive(Debug, Clone, Args)]
pub struct RelayArgs {
    /// Rows per batch.
    #[arg(long, env = "TIDINGS_RELAY_BATCH_SIZE", default_value_t = 5000)]
    pub batch_size: i64,
    /// Batches handed to the producer and not yet acknowledged, at most.
    #[arg(long, env = "TIDINGS_RELAY_PIPELINE_DEPTH", default_value_t = 4)]
    pub pipeline_depth: usize,
    /// Partitions of topics the relay creates.
    #[arg(long, env = "TIDINGS_TOPIC_PARTITIONS", default_value_t = 6)]
    pub partitions: i32,
    /// Replication factor of topics the relay creates (default: the broker's).
    #[arg(long, env = "TIDINGS_TOPIC_REPLICATION")]
    pub replication: Option<i32>,
    /// Do not create missing topics.
    #[arg(long)]
    pub no_create_topics: bool,
    /// Seconds a batch may wait for its acknowledgements before the relay
    /// purges the producer and retries from the first unacknowledged row.
    #[arg(long, env = "TIDINGS_DELIVERY_TIMEOUT_SECS", default_value_t = 30)]
    pub delivery_timeout_secs: u64,
    /// Seconds any one database call may take before it counts as failed.
    #[arg(long, env = "TIDINGS_DB_TIMEOUT_SECS", default_value_t = 10)]
    pub db_timeout_secs: u64,
    /// Seconds without progress after which the relay gives its lanes up.
    #[arg(long, env = "TIDINGS_STALL_TIMEOUT_SECS", default_value_t = 60)]
    pub stall_timeout_secs: u64,
    /// Seconds shutdown may take to settle what is in flight.
    #[arg(long, env = "TIDINGS_SHUTDOWN_TIMEOUT_SECS", default_value_t = 10)]
    pub shutdown_timeout_secs: u64,
    /// Serve /metrics, /health and /ready on this address (e.g. 127.0.0.1:9464).
    #[arg(long, env = "TIDINGS_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl RelayArgs {
    /// The relay's configuration these options ask for (timeouts of zero
    /// seconds count as one).
    pub fn config(&self, kafka: KafkaConfig) -> RelayConfig {
        let secs = |s: u64| Duration::from_secs(s.max(1));
        RelayConfig::new(kafka)
            .batch_size(self.batch_size)
            .pipeline_depth(self.pipeline_depth)
            .delivery_timeout(secs(self.delivery_timeout_secs))
            .db_timeout(secs(self.db_timeout_secs))
            .stall_timeout(secs(self.stall_timeout_secs))
            .shutdown_timeout(secs(self.shutdown_timeout_secs))
            .create_topics((!self.no_create_topics).then(|| TopicSpec {
                partitions: self.partitions,
                replication: self.replication,
                ..TopicSpec::default()
            }))
    }
}

/// `tidings outbox …`.
#[derive(Debug, Clone, Subcommand)]
pub enum OutboxCommand {
    /// Depth of the outbox, age of its oldest row, depth per topic, dead rows.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Rows refused for good by the broker or the client, set aside.
    #[command(subcommand)]
    Dead(DeadCommand),
}

/// `tidings outbox dead …`.
#[derive(Debug, Clone, Subcommand)]
pub enum DeadCommand {
    /// The dead rows with their reasons and how many rows each holds back.
    List {
        /// Print JSON lines instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Moves dead rows back into the outbox (after fixing the cause), so
    /// they and the rows held behind them are published in order.
    Retry {
        /// Outbox ids of the rows to retry.
        #[arg(required_unless_present = "all")]
        ids: Vec<i64>,
        /// Retry every dead row.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

/// `tidings stream …`.
#[derive(Debug, Clone, Subcommand)]
pub enum StreamCommand {
    /// Print a stream's envelopes as stored, one JSON object per line.
    Show {
        /// The aggregate type, e.g. `order`.
        aggregate_type: String,
        /// The aggregate id.
        id: String,
    },
}

impl std::fmt::Debug for GlobalArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let properties: Vec<String> = self
            .kafka_properties
            .iter()
            .map(|p| match p.split_once('=') {
                Some((k, _)) if crate::kafka::is_secret_property(k) => format!("{k}=<redacted>"),
                _ => p.clone(),
            })
            .collect();
        f.debug_struct("GlobalArgs")
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_url),
            )
            .field("brokers", &self.brokers)
            .field("kafka_properties", &properties)
            .finish()
    }
}

/// A URL with its password (if any) replaced by `<redacted>`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => match authority[..at].split_once(':') {
            Some((user, _)) => format!(
                "{}{user}:<redacted>{}",
                &url[..scheme_end + 3],
                &url[scheme_end + 3 + at..]
            ),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

impl GlobalArgs {
    /// Connects to the database named by `--database-url`/`DATABASE_URL`.
    pub async fn pool(&self) -> Result<PgPool> {
        let url = self.database_url.as_deref().ok_or_else(|| {
            Error::Config("no database: pass --database-url or set DATABASE_URL".into())
        })?;
        let options: sqlx::postgres::PgConnectOptions = url
            .parse()
            .map_err(|_| Error::Config("DATABASE_URL is not a valid PostgreSQL URL".into()))?;
        PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(Error::db("connecting to PostgreSQL"))
    }

    /// The Kafka settings named by `--brokers`/`KAFKA_BROKERS` and `-X`.
    pub fn kafka(&self) -> Result<KafkaConfig> {
        let brokers = self.brokers.clone().ok_or_else(|| {
            Error::Config("no Kafka brokers: pass --brokers or set KAFKA_BROKERS".into())
        })?;
        KafkaConfig::new(brokers).with_properties(self.kafka_properties.iter().map(String::as_str))
    }
}

/// Completes on SIGTERM or Ctrl-C (SIGINT) received after this call: the
/// handlers are installed when it is called, not when the future is first
/// polled, so a signal that arrives while a process is still starting (a
/// runner setting up, a metrics server already listening) is not missed.
/// Must be called inside a Tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            match (term, int) {
                (Some(mut term), Some(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                (Some(mut term), None) => {
                    term.recv().await;
                }
                (None, Some(mut int)) => {
                    int.recv().await;
                }
                (None, None) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

impl Command {
    /// Runs the command.
    pub async fn run(self, global: &GlobalArgs) -> Result<()> {
        match self {
            Command::Migrate => {
                let pool = global.pool().await?;
                crate::MIGRATOR
                    .run(&pool)
                    .await
                    .map_err(|source| Error::Migrate {
                        context: "applying the tidings migrations".into(),
                        source,
                    })?;
                println!("migrations applied");
                Ok(())
            }
            Command::Relay(args) => {
                let config = args.config(global.kafka()?);
                let pool = global.pool().await?;
                tracing::info!(brokers = %config.kafka.brokers, "relay starting");
                let relay = Relay::new(pool.clone(), config)?;
                if let Some(addr) = args.metrics_addr {
                    let metrics = crate::metrics::Metrics::new(pool, None);
                    metrics.relay(relay.stats());
                    let bound = crate::metrics::serve(addr, metrics, shutdown_signal()).await?;
                    tracing::info!(%bound, "serving /metrics, /health and /ready");
                }
                relay.run(shutdown_signal()).await
            }
            Command::Outbox(OutboxCommand::Status { json }) => {
                let pool = global.pool().await?;
                let status = crate::store::outbox_status(&pool).await?;
                let age = status.oldest_age.map(|a| a.as_secs_f64());
                if json {
                    let topics: serde_json::Map<String, serde_json::Value> = status
                        .topics
                        .iter()
                        .map(|(t, n)| (t.clone(), serde_json::json!(n)))
                        .collect();
                    println!(
                        "{}",
                        serde_json::json!({"depth": status.depth, "oldest_age_seconds": age, "topics": topics, "dead": status.dead})
                    );
                } else {
                    println!("depth: {}", status.depth);
                    println!("dead: {}", status.dead);
                    match age {
                        Some(age) => println!("oldest: {age:.3} s"),
                        None => println!("oldest: -"),
                    }
                    for (topic, n) in &status.topics {
                        println!("  {topic}: {n}");
                    }
                }
                Ok(())
            }
            Command::Outbox(OutboxCommand::Dead(DeadCommand::List { json })) => {
                let pool = global.pool().await?;
                let rows = crate::relay::dead_rows(&pool).await?;
                for row in &rows {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({
                                "id": row.id, "topic": row.topic,
                                "aggregate_type": row.aggregate_type,
                                "aggregate_id": row.aggregate_id, "sequence": row.sequence,
                                "event_id": row.event_id, "reason": row.reason,
                                "dead_at": row.dead_at, "held": row.held,
                            })
                        );
                    } else {
                        println!(
                            "{} {} {}/{}#{} held {}: {}",
                            row.id,
                            row.topic,
                            row.aggregate_type,
                            row.aggregate_id,
                            row.sequence,
                            row.held,
                            row.reason
                        );
                    }
                }
                if !json {
                    println!("{} dead rows", rows.len());
                }
                Ok(())
            }
            Command::Outbox(OutboxCommand::Dead(DeadCommand::Retry { ids, all })) => {
                let pool = global.pool().await?;
                let moved =
                    crate::relay::retry_dead_rows(&pool, (!all).then_some(ids.as_slice())).await?;
                println!("{moved} rows moved back into the outbox");
                Ok(())
            }
            Command::Projections(ProjectionsCommand::Retire {
                name,
                topic_prefix,
                wait_secs,
            }) => {
                let pool = global.pool().await?;
                let config = crate::projection::RunnerConfig::new(global.kafka()?)
                    .topic_prefix(topic_prefix);
                let old = crate::projection::Retire::new(name, config)
                    .wait(Duration::from_secs(wait_secs));
                let report = crate::projection::retire(&pool, &old).await?;
                println!(
                    "projection {} retired: {} consumer groups deleted, dead letter topic {}",
                    report.name,
                    report.groups_deleted.len(),
                    if report.dead_letter_topic_deleted {
                        "deleted"
                    } else {
                        "absent"
                    }
                );
                for left in &report.left {
                    println!("  left: {left} (run retire again to finish)");
                }
                if report.left.is_empty() {
                    Ok(())
                } else {
                    Err(Error::Refused(format!(
                        "{} items of projection {} are left in Kafka",
                        report.left.len(),
                        report.name
                    )))
                }
            }
            Command::Projections(ProjectionsCommand::Status) => {
                let pool = global.pool().await?;
                let kafka = global.kafka()?;
                // The topics its runners registered, and any it has
                // checkpoints on (registered before the topics were kept).
                let projections: Vec<(String, Vec<String>, Option<String>)> = sqlx::query_as(
                    "SELECT p.name, ARRAY(SELECT unnest(p.topics) UNION \
                     SELECT c.topic FROM tidings_checkpoints c WHERE c.projection = p.name \
                     ORDER BY 1), p.retired_at::text \
                     FROM tidings_projections p ORDER BY p.name",
                )
                .fetch_all(&pool)
                .await
                .map_err(Error::db("listing projections"))?;
                if projections.is_empty() {
                    println!("no projection has run against this database");
                }
                let watermarks = crate::projection::Watermarks::new(&kafka)?;
                for (name, topics, retired) in projections {
                    if let Some(at) = retired {
                        println!("{name}: retired at {at}");
                        continue;
                    }
                    let status =
                        match crate::projection::status_with(&pool, &watermarks, &name, &topics)
                            .await
                        {
                            Ok(status) => status,
                            Err(error) => {
                                println!("{name}: lag unknown: {error}");
                                continue;
                            }
                        };
                    println!(
                        "{name}: generation {}, lag {}, dead-lettered {}, parked {}{}",
                        status.generation,
                        status.lag(),
                        status.dead_lettered,
                        status.parked,
                        if status.undeliverable > 0 {
                            format!(
                                ", {} dead letters refused by the dead letter topic (see dlq list)",
                                status.undeliverable
                            )
                        } else {
                            String::new()
                        }
                    );
                    if !status.ignored.is_empty() {
                        println!(
                            "  skipped unread: {} events ({})",
                            status.ignored_events(),
                            status
                                .ignored
                                .iter()
                                .map(|i| format!(
                                    "{} v{}: {} ({})",
                                    i.event_type, i.event_version, i.events, i.reason
                                ))
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                    }
                    for p in &status.partitions {
                        if p.checkpoint_ahead {
                            println!(
                                "  {}[{}]: STOPPED: checkpoint {} is beyond the partition's end {} \
                                 (topic recreated or offsets reset?): replay the projection",
                                p.topic, p.partition, p.position, p.high_watermark
                            );
                        } else {
                            println!(
                                "  {}[{}]: position {} of {} (lag {})",
                                p.topic, p.partition, p.position, p.high_watermark, p.lag
                            );
                        }
                    }
                }
                Ok(())
            }
            Command::Dlq(DlqCommand::List { projection }) => {
                let pool = global.pool().await?;
                let parked = crate::projection::list_parked(&pool, projection.as_deref()).await?;
                if parked.is_empty() {
                    println!("no parked events");
                }
                for p in parked {
                    println!(
                        "{} {} {}/{} seq {} from {}[{}]@{}: {}{}{}",
                        p.id,
                        p.projection,
                        p.aggregate_type,
                        p.aggregate_id,
                        p.sequence.map_or("?".into(), |s| s.to_string()),
                        p.topic,
                        p.partition,
                        p.offset,
                        if p.dead_letter {
                            "dead-lettered: "
                        } else {
                            "parked: "
                        },
                        p.reason,
                        p.dlq_error
                            .as_deref()
                            .map(|e| format!(" (not on the dead letter topic: {e})"))
                            .unwrap_or_default()
                    );
                }
                Ok(())
            }
            Command::Dlq(DlqCommand::Show { id }) => {
                let pool = global.pool().await?;
                let Some(parked) = crate::projection::show_parked(&pool, id).await? else {
                    return Err(Error::Config(format!("no parked event {id}")));
                };
                let e = &parked.event;
                let value = parked.value.as_deref().map(String::from_utf8_lossy);
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "id": e.id, "projection": e.projection,
                        "aggregate_type": e.aggregate_type, "aggregate_id": e.aggregate_id,
                        "sequence": e.sequence, "topic": e.topic, "partition": e.partition,
                        "offset": e.offset, "dead_letter": e.dead_letter, "reason": e.reason,
                        "dlq_error": e.dlq_error,
                        "key": parked.key, "headers": parked.headers, "value": value,
                    }))
                    .expect("JSON values serialize")
                );
                Ok(())
            }
            Command::Dlq(DlqCommand::Skip { id, note }) => {
                let pool = global.pool().await?;
                let skipped = crate::projection::skip_dead_letter(&pool, id, &note).await?;
                println!(
                    "skipped {} ({}/{} seq {}); re-drive {} to apply the events parked behind it",
                    skipped.id,
                    skipped.aggregate_type,
                    skipped.aggregate_id,
                    skipped.sequence.map_or("?".into(), |s| s.to_string()),
                    skipped.projection
                );
                Ok(())
            }
            Command::Stream(StreamCommand::Show { aggregate_type, id }) => {
                let pool = global.pool().await?;
                let store = crate::store::Store::new(pool);
                let stream = store.read_stream(&aggregate_type, &id).await?;
                if stream.is_empty() {
                    eprintln!("no events for {aggregate_type}/{id}");
                }
                for envelope in stream {
                    println!("{}", envelope.to_json());
                }
                Ok(())
            }
        }
    }
}

/// Sets up logging to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Maps a command's outcome to an exit code, printing the error:
/// 0 success, 2 configuration, 1 anything else.
pub fn exit_code(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            match error {
                Error::Config(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// The whole generic binary: parse arguments, set up logging, run.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    exit_code(cli.command.run(&cli.global).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug_output() {
        let args = GlobalArgs {
            database_url: Some(
                "postgres://app:s3cret-pw@db.internal:5432/shop?sslmode=require".into(),
            ),
            brokers: Some("broker:9093".into()),
            kafka_properties: vec![
                "sasl.password=hunter2".into(),
                "security.protocol=SASL_SSL".into(),
            ],
        };
        let shown = format!("{args:?}");
        assert!(
            !shown.contains("s3cret-pw") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert!(
            shown.contains("postgres://app:<redacted>@db.internal:5432/shop"),
            "{shown}"
        );
        assert!(shown.contains("security.protocol=SASL_SSL"), "{shown}");

        let kafka = args.kafka().unwrap();
        let shown = format!("{kafka:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("<redacted>"),
            "{shown}"
        );
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    /// The relay's options as `tidings relay` parses them into its config.
    fn relay_config(args: &[&str]) -> RelayConfig {
        let cli = Cli::try_parse_from(["tidings", "relay"].iter().chain(args)).unwrap();
        let Command::Relay(relay) = cli.command else {
            panic!("parsed as another command")
        };
        relay.config(KafkaConfig::new("127.0.0.1:9092"))
    }

    #[test]
    fn every_relay_option_reaches_the_relay_config() {
        let config = relay_config(&[
            "--batch-size",
            "7",
            "--pipeline-depth",
            "9",
            "--partitions",
            "3",
            "--replication",
            "2",
            "--delivery-timeout-secs",
            "11",
            "--db-timeout-secs",
            "12",
            "--stall-timeout-secs",
            "13",
            "--shutdown-timeout-secs",
            "0",
        ]);
        assert_eq!(config.batch_size, 7);
        assert_eq!(config.pipeline_depth, 9);
        assert_eq!(config.delivery_timeout, Duration::from_secs(11));
        assert_eq!(config.db_timeout, Duration::from_secs(12));
        assert_eq!(config.stall_timeout, Duration::from_secs(13));
        assert_eq!(
            config.shutdown_timeout,
            Duration::from_secs(1),
            "0 counts as 1"
        );
        let spec = config.create_topics.expect("topics created by default");
        assert_eq!((spec.partitions, spec.replication), (3, Some(2)));

        let config = relay_config(&["--no-create-topics"]);
        assert!(config.create_topics.is_none(), "--no-create-topics");
    }
}
