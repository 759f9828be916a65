//! What the runnable examples share: a fresh database, the relay and
//! projection runners as background tasks, and waiting for a condition.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Executor, PgPool};
use tidings::kafka::{EmbeddedKafka, KafkaConfig};
use tidings::projection::{Projection, Runner, RunnerConfig, RunnerStats};
use tidings::relay::{Relay, RelayConfig, RelayStats};
use tokio::sync::oneshot;

/// Errors of the examples.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The database an example uses: `TIDINGS_EXAMPLE_DATABASE` when set (runs
/// side by side need their own), else `name`.
pub fn database_name(name: &str) -> String {
    std::env::var("TIDINGS_EXAMPLE_DATABASE").unwrap_or_else(|_| name.to_owned())
}

/// Drops and recreates database [`database_name`]`(name)` on the server of
/// `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) and
/// migrates it.
pub async fn fresh_database(name: &str) -> Result<PgPool, BoxError> {
    let name = database_name(name);
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("database name `{name}`: use letters, digits and `_`").into());
    }
    let server: PgConnectOptions = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
        .parse()?;
    let mut admin = server.connect().await?;
    admin
        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await?;
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await?;
    let pool = PgPool::connect_with(server.database(&name)).await?;
    tidings::MIGRATOR.run(&pool).await?;
    Ok(pool)
}

/// The broker of `KAFKA_BROKERS` (default `127.0.0.1:9092`).
pub fn kafka() -> KafkaConfig {
    KafkaConfig::new(std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into()))
}

/// The broker a quick start runs on, and what to say about it.
#[derive(Debug)]
pub struct QuickStartBroker {
    /// Settings for the relay and the runners.
    pub kafka: KafkaConfig,
    /// One line saying which broker it is and why.
    pub description: String,
    /// The embedded broker, when that is the one: it lives as long as this.
    pub embedded: Option<EmbeddedKafka>,
}

/// The quick start's broker: `KAFKA_BROKERS` when set (`embedded` asks for
/// the embedded one), else a broker answering on 127.0.0.1:9092, else an
/// embedded broker (librdkafka's mock cluster, in process), so that a first
/// run needs no broker installed.
///
/// Its arguments are librdkafka properties for a broker it is given, as
/// `-X key=value` (TLS, SASL).
pub fn quick_start_broker() -> Result<QuickStartBroker, BoxError> {
    let mut properties = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.strip_prefix("-X") {
            Some("") => properties.push(args.next().ok_or("-X needs key=value after it")?),
            Some(pair) => properties.push(pair.to_owned()),
            None => {
                return Err(format!(
                    "unknown argument `{arg}`: the quick start takes only -X key=value (librdkafka properties)"
                )
                .into());
            }
        }
    }
    let given = std::env::var("KAFKA_BROKERS").unwrap_or_default();
    let given = given.trim();
    if !given.is_empty() && given != "embedded" {
        return Ok(QuickStartBroker {
            kafka: KafkaConfig::new(given)
                .with_properties(properties.iter().map(String::as_str))?,
            description: format!("Kafka at {given} (KAFKA_BROKERS)"),
            embedded: None,
        });
    }
    let local = "127.0.0.1:9092";
    let answers = given.is_empty()
        && std::net::TcpStream::connect_timeout(&local.parse()?, Duration::from_millis(500))
            .is_ok();
    if answers {
        return Ok(QuickStartBroker {
            kafka: KafkaConfig::new(local)
                .with_properties(properties.iter().map(String::as_str))?,
            description: format!(
                "Kafka at {local} (a broker answers there; KAFKA_BROKERS picks another)"
            ),
            embedded: None,
        });
    }
    let embedded = EmbeddedKafka::start()?;
    let why = if given.is_empty() {
        format!("no KAFKA_BROKERS set and no broker answers on {local}")
    } else {
        "KAFKA_BROKERS=embedded".to_owned()
    };
    Ok(QuickStartBroker {
        kafka: embedded.config(),
        description: format!(
            "embedded Kafka broker (librdkafka's mock cluster, in this process) at {}: {why}; \
             set KAFKA_BROKERS to use a real one",
            embedded.brokers()
        ),
        embedded: Some(embedded),
    })
}

/// A topic prefix unique to this run, so that each run starts from empty topics.
pub fn unique_prefix(example: &str) -> String {
    format!("{example}-{}.", uuid::Uuid::now_v7().simple())
}

/// A task running until [`Background::stop`].
#[derive(Debug)]
pub struct Background {
    stop: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<tidings::Result<()>>,
}

impl Background {
    fn spawn<F: Future<Output = tidings::Result<()>> + Send + 'static>(
        run: impl FnOnce(oneshot::Receiver<()>) -> F,
    ) -> Self {
        let (stop, stopped) = oneshot::channel();
        Background {
            stop,
            handle: tokio::spawn(run(stopped)),
        }
    }

    /// Asks the task to stop gracefully and waits for it.
    pub async fn stop(self) -> Result<(), BoxError> {
        let _ = self.stop.send(());
        self.handle.await??;
        Ok(())
    }
}

/// Runs a relay in the background.
pub fn spawn_relay(
    pool: &PgPool,
    kafka: &KafkaConfig,
) -> Result<(Background, Arc<RelayStats>), BoxError> {
    let relay = Relay::new(pool.clone(), RelayConfig::new(kafka.clone()))?;
    let stats = relay.stats();
    let task = Background::spawn(|stopped| {
        relay.run(async move {
            let _ = stopped.await;
        })
    });
    Ok((task, stats))
}

/// Runs a projection in the background, reading the topics under `prefix`.
pub fn spawn_projection<P: Projection>(
    pool: &PgPool,
    projection: P,
    kafka: &KafkaConfig,
    prefix: &str,
) -> Result<(Background, Arc<RunnerStats>), BoxError> {
    let runner = Runner::new(
        pool.clone(),
        projection,
        RunnerConfig::new(kafka.clone()).topic_prefix(prefix),
    )?;
    let stats = runner.stats();
    let task = Background::spawn(|stopped| {
        runner.run(async move {
            let _ = stopped.await;
        })
    });
    Ok((task, stats))
}

/// Polls `condition` every 100 ms until it holds, failing after `within`.
pub async fn wait_until<F: Future<Output = Result<bool, BoxError>>>(
    what: &str,
    within: Duration,
    mut condition: impl FnMut() -> F,
) -> Result<Duration, BoxError> {
    let started = Instant::now();
    while !condition().await? {
        if started.elapsed() > within {
            return Err(format!("{what}: not reached within {within:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(started.elapsed())
}
