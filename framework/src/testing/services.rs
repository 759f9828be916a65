//! Services for a service's own integration tests: a throwaway migrated
//! database per test and an embedded Kafka broker.
//!
//! # Guarantees
//!
//! - **Each test its own database.** [`TestDatabase::create`] makes a
//!   database with a unique name on the server given, runs
//!   [`crate::MIGRATOR`] on it and drops it (`WITH (FORCE)`) when the value
//!   is dropped, so tests run in parallel and leave nothing behind.
//! - **No broker to install.** [`EmbeddedKafka`] runs librdkafka's mock
//!   cluster in process; the relay and the runners use it through
//!   [`EmbeddedKafka::config`] like any broker (see its module docs for
//!   what it lacks). PostgreSQL is still needed: the store, the outbox and
//!   the checkpoints are the real thing.
//!
//! With sqlx's own test macro instead, pass tidings' migrations:
//! `#[sqlx::test(migrator = "tidings::MIGRATOR")]`.
//!
//! # A projection test and a relay test
//!
//! PostgreSQL must answer on `DATABASE_URL`; no broker is installed.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use sqlx::PgConnection;
//! use tidings::projection::{ApplyError, Projection, Runner, RunnerConfig};
//! use tidings::relay::{Relay, RelayConfig};
//! use tidings::testing::{EmbeddedKafka, TestDatabase};
//! use tidings::{Envelope, Store};
//! # use tidings::{Aggregate, Event};
//! # #[derive(Debug, Clone, PartialEq, Event)]
//! # #[event(topic = "counters")]
//! # enum CounterEvent { Incremented { by: u32 } }
//! # #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
//! # struct Counter { value: u32 }
//! # #[derive(Debug, thiserror::Error)] #[error("never")] struct Never;
//! # impl Aggregate for Counter {
//! #     const TYPE: &'static str = "counter";
//! #     type Event = CounterEvent; type Command = u32; type Error = Never;
//! #     fn handle(&self, by: u32) -> Result<Vec<CounterEvent>, Never> {
//! #         Ok(vec![CounterEvent::Incremented { by }]) }
//! #     fn apply(&mut self, e: &CounterEvent) { match e { CounterEvent::Incremented { by } => self.value += by } }
//! # }
//!
//! /// The projection under test: a total per counter.
//! struct Totals;
//!
//! #[async_trait::async_trait]
//! impl Projection for Totals {
//!     type Event = CounterEvent;
//!     fn name(&self) -> &str {
//!         "totals"
//!     }
//!     async fn apply(&self, conn: &mut PgConnection, e: &Envelope<CounterEvent>) -> Result<(), ApplyError> {
//!         let CounterEvent::Incremented { by } = e.payload;
//!         sqlx::query(
//!             "INSERT INTO totals VALUES ($1, $2) \
//!              ON CONFLICT (id) DO UPDATE SET total = totals.total + $2",
//!         )
//!         .bind(&e.aggregate_id)
//!         .bind(i64::from(by))
//!         .execute(conn)
//!         .await?;
//!         Ok(())
//!     }
//!     async fn reset(&self, conn: &mut PgConnection) -> Result<(), ApplyError> {
//!         sqlx::query("TRUNCATE totals").execute(conn).await?;
//!         Ok(())
//!     }
//! }
//!
//! #[tokio::test(flavor = "multi_thread")]
//! async fn totals_follow_the_counters() -> Result<(), Box<dyn std::error::Error>> {
//!     // A database of its own on the server of DATABASE_URL, migrated.
//!     let db = TestDatabase::from_env().await?;
//!     sqlx::query("CREATE TABLE totals (id TEXT PRIMARY KEY, total BIGINT NOT NULL)")
//!         .execute(db.pool())
//!         .await?;
//!     let kafka = EmbeddedKafka::start()?;
//!     let store = Store::new(db.pool().clone());
//!     store.execute::<Counter>("c-1", 2).await?;
//!     store.execute::<Counter>("c-1", 3).await?;
//!
//!     // The relay publishes what the store committed (creating the topic)...
//!     let relay = Relay::new(db.pool().clone(), RelayConfig::new(kafka.config()))?;
//!     let (stop_relay, stopped) = tokio::sync::oneshot::channel::<()>();
//!     let relay = tokio::spawn(relay.run(async { stopped.await.ok(); }));
//!     // ...and the projection builds its read model from the topic.
//!     let runner = Runner::new(db.pool().clone(), Totals, RunnerConfig::new(kafka.config()))?;
//!     let (stop_runner, stopped) = tokio::sync::oneshot::channel::<()>();
//!     let runner = tokio::spawn(runner.run(async { stopped.await.ok(); }));
//!
//!     let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
//!     loop {
//!         let total: Option<i64> = sqlx::query_scalar("SELECT total FROM totals WHERE id = 'c-1'")
//!             .fetch_optional(db.pool())
//!             .await?;
//!         if total == Some(5) {
//!             break;
//!         }
//!         assert!(tokio::time::Instant::now() < deadline, "total is {total:?}, not 5");
//!         tokio::time::sleep(Duration::from_millis(50)).await;
//!     }
//!     stop_runner.send(()).ok();
//!     runner.await??;
//!     stop_relay.send(()).ok();
//!     relay.await??;
//!     Ok(())
//! }
//! ```

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, PgPool};

use crate::error::{Error, Result};

pub use crate::kafka::EmbeddedKafka;

/// A database made for one test, migrated, and dropped with the value.
#[derive(Debug)]
pub struct TestDatabase {
    pool: PgPool,
    name: String,
    server: PgConnectOptions,
}

impl TestDatabase {
    /// A fresh database on the server of `DATABASE_URL` (default
    /// `postgres://postgres@127.0.0.1:5432/postgres`).
    pub async fn from_env() -> Result<TestDatabase> {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        TestDatabase::create(&url).await
    }

    /// A fresh database on the server of `server_url` (any database of
    /// that server: the URL's own database is only used to connect),
    /// migrated with [`crate::MIGRATOR`].
    pub async fn create(server_url: &str) -> Result<TestDatabase> {
        let server: PgConnectOptions = server_url
            .parse()
            .map_err(|e| Error::Config(format!("database URL `{server_url}`: {e}")))?;
        let name = format!("tidings_test_{}", uuid::Uuid::now_v7().simple());
        let mut admin = server.connect().await.map_err(Error::db(
            "connecting to PostgreSQL to create a test database",
        ))?;
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .map_err(Error::db("creating a test database"))?;
        let _ = admin.close().await;
        let database = TestDatabase {
            pool: PgPoolOptions::new()
                .max_connections(10)
                .acquire_timeout(Duration::from_secs(30))
                .connect_lazy_with(server.clone().database(&name)),
            name,
            server,
        };
        crate::MIGRATOR
            .run(&database.pool)
            .await
            .map_err(|e| Error::Config(format!("migrating the test database: {e}")))?;
        Ok(database)
    }

    /// A pool connected to the test database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The test database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connection options for the test database (for a second pool, or a
    /// child process).
    pub fn connect_options(&self) -> PgConnectOptions {
        self.server.clone().database(&self.name)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop may run inside or outside a runtime: a thread of its own.
        // The server ends this database's connections (FORCE).
        let (server, name) = (self.server.clone(), self.name.clone());
        let dropper = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                let mut admin = server.connect().await.ok()?;
                admin
                    .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                    .await
                    .ok()?;
                admin.close().await.ok()
            })
        });
        let _ = dropper.join();
    }
}
