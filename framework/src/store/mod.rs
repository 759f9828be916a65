//! The PostgreSQL event store and transactional outbox.
//!
//! # Guarantees
//!
//! - **Atomicity.** A command's events and their outbox rows are written by
//!   one statement, inside the transaction that runs the command, so they
//!   commit or roll back together, and together with the caller's own
//!   writes when the caller passes its transaction ([`Store::execute_in`]).
//!   An event reaches the outbox, hence Kafka, if and only if it committed.
//! - **Optimistic concurrency.** A unique key on (aggregate type, id,
//!   sequence) means two writers never both append after the same state. The
//!   loser gets [`Error::Conflict`]; [`Store::execute`] reloads and retries a
//!   bounded number of times with jittered backoff. Handlers are pure, so
//!   retrying is always safe.
//! - **One round trip per append**, whatever the number of events (`UNNEST`).
//! - **Snapshots** are an optimisation only: a snapshot of another
//!   [`Aggregate::SNAPSHOT_VERSION`], or one that does not decode, is
//!   ignored and the stream replayed.
//! - **Old events are never rewritten**: upcasting happens on read.
//!
//! Per aggregate, a higher sequence always has a higher outbox id, and a row
//! becomes visible only after every lower sequence of its stream committed
//! (the unique key makes a concurrent writer wait for, then fail on, the
//! earlier transaction). The relay relies on this for ordering.

mod append;
mod load;

use std::time::Duration;

use sqlx::{PgConnection, PgPool};

use crate::aggregate::Aggregate;
use crate::envelope::{EventContext, RawEnvelope};
use crate::error::{Error, Result};

pub use append::{MAX_ENVELOPE_BYTES, OUTBOX_LANES, lane_of};

/// How the store retries conflicts.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StoreConfig {
    /// How many times a conflicting command is retried before
    /// [`Error::Conflict`] is returned (default 20).
    pub max_conflict_retries: u32,
    /// The first backoff after a conflict; it doubles, with full jitter, up
    /// to [`StoreConfig::max_backoff`] (default 2 ms).
    pub base_backoff: Duration,
    /// The largest backoff between retries (default 200 ms).
    pub max_backoff: Duration,
    /// Prepended to every topic name, e.g. `staging.` (default empty).
    pub topic_prefix: String,
    /// How many aggregates [`Store::execute`] keeps in memory after a
    /// commit, to skip loading them next time (default 10,000; 0 disables).
    /// Safe with other writers: an append must follow the stream's last
    /// sequence, so a stale entry only causes a conflict and a reload.
    pub cache_capacity: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_conflict_retries: 20,
            base_backoff: Duration::from_millis(2),
            max_backoff: Duration::from_millis(200),
            topic_prefix: String::new(),
            cache_capacity: 10_000,
        }
    }
}

impl StoreConfig {
    /// Sets [`StoreConfig::max_conflict_retries`].
    pub fn max_conflict_retries(mut self, retries: u32) -> Self {
        self.max_conflict_retries = retries;
        self
    }

    /// Sets [`StoreConfig::cache_capacity`].
    pub fn cache_capacity(mut self, aggregates: usize) -> Self {
        self.cache_capacity = aggregates;
        self
    }

    /// Sets [`StoreConfig::topic_prefix`].
    pub fn topic_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.topic_prefix = prefix.into();
        self
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let cap = self
            .base_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_backoff);
        cap.mul_f64(fastrand::f64())
    }
}

/// An aggregate loaded from the store: its state and the sequence of its last event.
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    /// The state after every event.
    pub state: A,
    /// The sequence of the last event (0 for a stream that does not exist yet).
    pub sequence: u64,
    /// Whether a snapshot was used.
    pub from_snapshot: bool,
}

/// What a successful command committed.
#[derive(Debug, Clone)]
pub struct Committed<A> {
    /// The state after the new events.
    pub state: A,
    /// The stream's sequence after the new events.
    pub sequence: u64,
    /// The events appended (empty when the command produced none).
    pub envelopes: Vec<RawEnvelope>,
    /// How many conflicts were retried before this success.
    pub retries: u32,
}

/// Why [`Store::execute`] did not commit: the aggregate refused the command,
/// or the infrastructure failed. The two stay apart.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError<E> {
    /// The aggregate refused the command (a domain error).
    #[error("command rejected: {0}")]
    Rejected(E),
    /// The store failed (including [`Error::Conflict`] once retries ran out).
    #[error(transparent)]
    Store(#[from] Error),
}

/// Counters of a store, shared by its clones.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Commands that appended events (with `execute_in`, counted when the
    /// events are written: the caller may still roll back).
    pub commands: std::sync::atomic::AtomicU64,
    /// Events appended.
    pub events_appended: std::sync::atomic::AtomicU64,
    /// Concurrency conflicts met (retried, or returned once retries ran out).
    pub conflicts: std::sync::atomic::AtomicU64,
}

/// Aggregates recently committed through this store: (type, id) →
/// (sequence, snapshot version, state as JSON).
type Cache = std::collections::HashMap<(&'static str, String), (u64, u32, serde_json::Value)>;

/// The event store on PostgreSQL.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    config: StoreConfig,
    stats: std::sync::Arc<StoreStats>,
    cache: std::sync::Arc<std::sync::Mutex<Cache>>,
}

impl Store {
    /// A store on `pool` with the default [`StoreConfig`]. The database must
    /// have the tidings migrations ([`crate::MIGRATOR`]).
    pub fn new(pool: PgPool) -> Self {
        Store::with_config(pool, StoreConfig::default())
    }

    /// A store with a custom configuration.
    pub fn with_config(pool: PgPool, config: StoreConfig) -> Self {
        Store {
            pool,
            config,
            stats: std::sync::Arc::default(),
            cache: std::sync::Arc::default(),
        }
    }

    /// The topic the events of `A` go to (the configured prefix, then
    /// [`Aggregate::topic`]).
    pub fn topic_of<A: Aggregate>(&self) -> String {
        format!("{}{}", self.config.topic_prefix, A::topic())
    }

    /// The store's counters (for metrics).
    pub fn stats(&self) -> std::sync::Arc<StoreStats> {
        std::sync::Arc::clone(&self.stats)
    }

    fn count(&self, committed: &Committed<impl Aggregate>) {
        use std::sync::atomic::Ordering::Relaxed;
        if !committed.envelopes.is_empty() {
            self.stats.commands.fetch_add(1, Relaxed);
            self.stats
                .events_appended
                .fetch_add(committed.envelopes.len() as u64, Relaxed);
        }
        self.stats
            .conflicts
            .fetch_add(u64::from(committed.retries), Relaxed);
    }

    /// The pool the store uses.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Loads an aggregate: the latest valid snapshot, then the later events,
    /// upcast to their current versions.
    pub async fn load<A: Aggregate>(&self, id: &str) -> Result<Loaded<A>> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(Error::db("acquiring a connection"))?;
        load::load::<A>(&mut conn, id).await
    }

    /// Runs a command: load, handle, append and commit in one transaction,
    /// retrying concurrency conflicts with jittered backoff.
    pub async fn execute<A: Aggregate>(
        &self,
        id: &str,
        command: A::Command,
    ) -> Result<Committed<A>, ExecuteError<A::Error>>
    where
        A::Command: Clone,
    {
        self.execute_with(id, command, &EventContext::default())
            .await
    }

    /// [`Store::execute`] with correlation, causation and metadata for the events.
    #[tracing::instrument(
        name = "tidings.execute",
        skip_all,
        fields(
            aggregate_type = A::TYPE,
            aggregate_id = id,
            correlation_id = context.correlation_id.as_deref(),
            causation_id = context.causation_id.as_deref()
        )
    )]
    pub async fn execute_with<A: Aggregate>(
        &self,
        id: &str,
        command: A::Command,
        context: &EventContext,
    ) -> Result<Committed<A>, ExecuteError<A::Error>>
    where
        A::Command: Clone,
    {
        let mut attempt = 0;
        loop {
            let mut tx = self
                .pool
                .begin()
                .await
                .map_err(Error::db("beginning a transaction"))?;
            match self
                .try_execute::<A>(&mut tx, id, command.clone(), context, attempt == 0)
                .await
            {
                Ok(mut committed) => {
                    if let Err(e) = tx.commit().await {
                        self.remember::<A>(id, None);
                        return Err(
                            Error::db(format!("committing a command on {}/{id}", A::TYPE))(e)
                                .into(),
                        );
                    }
                    committed.retries = attempt;
                    self.count(&committed);
                    self.remember(id, Some(&committed));
                    return Ok(committed);
                }
                Err(ExecuteError::Store(Error::Conflict { .. }))
                    if attempt < self.config.max_conflict_retries =>
                {
                    drop(tx);
                    self.remember::<A>(id, None);
                    tokio::time::sleep(self.config.backoff(attempt)).await;
                    attempt += 1;
                }
                Err(ExecuteError::Store(e)) => {
                    self.remember::<A>(id, None);
                    return Err(ExecuteError::Store(self.with_actual(e).await));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs a command inside the caller's transaction, so the caller's own
    /// writes, the events and the outbox rows commit or roll back together.
    /// Nothing is committed here: the caller commits.
    ///
    /// Conflicts are retried inside a savepoint, so the caller's earlier
    /// writes in the transaction are kept.
    #[tracing::instrument(
        name = "tidings.execute_in",
        skip_all,
        fields(
            aggregate_type = A::TYPE,
            aggregate_id = id,
            correlation_id = context.correlation_id.as_deref(),
            causation_id = context.causation_id.as_deref()
        )
    )]
    pub async fn execute_in<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        id: &str,
        command: A::Command,
        context: &EventContext,
    ) -> Result<Committed<A>, ExecuteError<A::Error>>
    where
        A::Command: Clone,
    {
        use sqlx::Connection;
        let mut attempt = 0;
        loop {
            let mut savepoint = conn
                .begin()
                .await
                .map_err(Error::db("creating a savepoint"))?;
            match self
                .try_execute::<A>(&mut savepoint, id, command.clone(), context, false)
                .await
            {
                Ok(mut committed) => {
                    savepoint
                        .commit()
                        .await
                        .map_err(Error::db("releasing a savepoint"))?;
                    committed.retries = attempt;
                    self.count(&committed);
                    // The caller decides whether this commits: forget the cached state.
                    self.remember::<A>(id, None);
                    return Ok(committed);
                }
                Err(ExecuteError::Store(Error::Conflict { .. }))
                    if attempt < self.config.max_conflict_retries =>
                {
                    savepoint
                        .rollback()
                        .await
                        .map_err(Error::db("rolling back a savepoint"))?;
                    tokio::time::sleep(self.config.backoff(attempt)).await;
                    attempt += 1;
                }
                Err(ExecuteError::Store(e)) => {
                    return Err(ExecuteError::Store(self.with_actual(e).await));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Fills in the stream's actual sequence in a conflict error.
    async fn with_actual(&self, error: Error) -> Error {
        match error {
            Error::Conflict {
                aggregate_type,
                aggregate_id,
                expected,
                ..
            } => {
                let actual = append::current_sequence(&self.pool, &aggregate_type, &aggregate_id)
                    .await
                    .unwrap_or(0);
                Error::Conflict {
                    aggregate_type,
                    aggregate_id,
                    expected,
                    actual,
                }
            }
            other => other,
        }
    }

    /// The cached state of an aggregate, if any and of the current snapshot version.
    fn cached<A: Aggregate>(&self, id: &str) -> Option<Loaded<A>> {
        let cache = self.cache.lock().ok()?;
        let (sequence, version, state) = cache.get(&(A::TYPE, id.to_owned()))?;
        if *version != A::SNAPSHOT_VERSION {
            return None;
        }
        let state = serde_json::from_value(state.clone()).ok()?;
        Some(Loaded {
            state,
            sequence: *sequence,
            from_snapshot: false,
        })
    }

    /// Remembers a committed state (or forgets the aggregate with `None`).
    fn remember<A: Aggregate>(&self, id: &str, committed: Option<&Committed<A>>) {
        if self.config.cache_capacity == 0 {
            return;
        }
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        let key = (A::TYPE, id.to_owned());
        match committed.and_then(|c| serde_json::to_value(&c.state).ok().map(|v| (c.sequence, v))) {
            Some((sequence, state)) => {
                if cache.len() >= self.config.cache_capacity && !cache.contains_key(&key) {
                    cache.clear();
                }
                cache.insert(key, (sequence, A::SNAPSHOT_VERSION, state));
            }
            None => {
                cache.remove(&key);
            }
        }
    }

    async fn try_execute<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        id: &str,
        command: A::Command,
        context: &EventContext,
        use_cache: bool,
    ) -> Result<Committed<A>, ExecuteError<A::Error>> {
        let cached = if use_cache {
            self.cached::<A>(id)
        } else {
            None
        };
        let loaded = match cached {
            Some(loaded) => loaded,
            None => load::load::<A>(conn, id).await?,
        };
        let events = loaded
            .state
            .handle(command)
            .map_err(ExecuteError::Rejected)?;
        let mut state = loaded.state;
        if events.is_empty() {
            return Ok(Committed {
                state,
                sequence: loaded.sequence,
                envelopes: vec![],
                retries: 0,
            });
        }
        let envelopes = append::append::<A::Event>(
            conn,
            A::TYPE,
            id,
            &self.topic_of::<A>(),
            loaded.sequence,
            &events,
            context,
        )
        .await?;
        for event in &events {
            state.apply(event);
        }
        let sequence = loaded.sequence + events.len() as u64;
        if A::SNAPSHOT_EVERY > 0
            && loaded.sequence / A::SNAPSHOT_EVERY != sequence / A::SNAPSHOT_EVERY
        {
            load::save_snapshot(conn, id, sequence, &state).await?;
        }
        Ok(Committed {
            state,
            sequence,
            envelopes,
            retries: 0,
        })
    }

    /// Appends events to a stream directly, expecting it to be at
    /// `expected_sequence` (0 for a new stream). For importers and tools;
    /// commands go through [`Store::execute`].
    pub async fn append<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        id: &str,
        expected_sequence: u64,
        events: &[A::Event],
        context: &EventContext,
    ) -> Result<Vec<RawEnvelope>> {
        match append::append::<A::Event>(
            conn,
            A::TYPE,
            id,
            &self.topic_of::<A>(),
            expected_sequence,
            events,
            context,
        )
        .await
        {
            Ok(envelopes) => Ok(envelopes),
            Err(e) => Err(self.with_actual(e).await),
        }
    }

    /// Reads a stream's envelopes as stored (not upcast), in sequence order.
    pub async fn read_stream(&self, aggregate_type: &str, id: &str) -> Result<Vec<RawEnvelope>> {
        load::read_stream(&self.pool, aggregate_type, id).await
    }
}

/// How much is waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct OutboxStatus {
    /// Rows not yet published.
    pub depth: u64,
    /// Age of the oldest row, if any.
    pub oldest_age: Option<Duration>,
    /// Rows waiting per topic.
    pub topics: Vec<(String, u64)>,
}

/// Reads the outbox depth, the age of its oldest row and the depth per topic.
pub async fn outbox_status(pool: &PgPool) -> Result<OutboxStatus> {
    let rows: Vec<(String, i64, f64)> = sqlx::query_as(
        "SELECT topic, count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8 \
         FROM tidings_outbox GROUP BY topic ORDER BY topic",
    )
    .fetch_all(pool)
    .await
    .map_err(Error::db("reading the outbox status"))?;
    let depth = rows.iter().map(|(_, n, _)| *n as u64).sum();
    let oldest_age = rows
        .iter()
        .map(|(_, _, age)| *age)
        .reduce(f64::max)
        .map(|age| Duration::from_secs_f64(age.max(0.0)));
    Ok(OutboxStatus {
        depth,
        oldest_age,
        topics: rows.into_iter().map(|(t, n, _)| (t, n as u64)).collect(),
    })
}
