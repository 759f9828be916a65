//! The PostgreSQL event store and transactional outbox.
//!
//! # Guarantees
//!
//! - **Atomicity.** A command's events and their outbox rows are written by
//!   one statement, so they commit or roll back together. Under
//!   [`Store::execute`] that statement is the command's whole transaction
//!   (with a snapshot when one is due, a transaction holds both); under
//!   [`Store::execute_in`] it commits with the caller's own writes. An event
//!   reaches the outbox, hence Kafka, if and only if it committed.
//! - **Optimistic concurrency.** A unique key on (aggregate type, id,
//!   sequence) means two writers never both append after the same state. The
//!   loser gets [`Error::Conflict`]; [`Store::execute`] reloads and retries a
//!   bounded number of times with jittered backoff. Handlers are pure, so
//!   retrying is always safe.
//! - **No decision on stale state.** Recently committed aggregates are kept
//!   in memory (a clone, never a serde copy), but an append from a cached
//!   state must follow the exact head event it was built from, and a refusal
//!   or an empty result from a cached state is rechecked against the
//!   stream's head: another writer, another process or a rolled-back
//!   `execute_in` costs a reload, never a wrong answer.
//! - **Isolation levels.** Serialization failures and deadlocks (40001,
//!   40P01) are conflicts like any other. Under REPEATABLE READ or
//!   SERIALIZABLE, [`Store::execute_in`] returns the first conflict at once:
//!   its snapshot cannot see the other writer, so only the caller's retry of
//!   the whole transaction can succeed.
//! - **Valid keys.** An empty aggregate id, or one over
//!   [`MAX_AGGREGATE_ID_BYTES`], is refused at append (it would be an empty or
//!   unwieldy Kafka key).
//! - **One round trip per append**, whatever the number of events (`UNNEST`):
//!   a command on a cached aggregate, or a creation, sends one statement
//!   with no `BEGIN` or `COMMIT` around it (besides the pool's check of the
//!   connection it hands out). A command whose append is due a snapshot
//!   sends `BEGIN`, the append, the snapshot and `COMMIT`.
//! - **An unknown outcome is said to be one.** Once [`Store::execute`] has
//!   sent its append, the append commits on the server whether or not the
//!   answer comes back: a connection lost at that point, or an `execute`
//!   future dropped then (a timeout around it, a client gone), may leave
//!   the command committed, as a lost answer to a `COMMIT` would. The
//!   error then says so, and the events' ids are unique, so
//!   [`Store::read_stream`] tells whether they landed; retry a command
//!   after such an error only if it is idempotent or after that check. A
//!   conflict, a refusal or an error before the append was sent commits
//!   nothing.
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
mod cache;
mod load;
mod wake;

use std::time::Duration;

use sqlx::{PgConnection, PgPool};

use crate::aggregate::Aggregate;
use crate::envelope::{EventContext, RawEnvelope};
use crate::error::{Error, Result};

pub use append::{MAX_AGGREGATE_ID_BYTES, MAX_ENVELOPE_BYTES, OUTBOX_LANES, lane_of};
use cache::{AggregateCache, Head};
pub use wake::OUTBOX_CHANNEL;

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
    /// The aggregate value itself is kept (a clone), never a serialized
    /// copy. Safe with other writers and other processes: an append from a
    /// cached state must follow the exact head event the state was built
    /// from (sequence and event id), and a refusal or an empty result from
    /// a cached state is rechecked against the stream's head in the
    /// database (one indexed read) and decided again on a fresh load when
    /// the head moved. A stale entry costs a reload, never a wrong answer.
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

    /// Sets [`StoreConfig::base_backoff`] and [`StoreConfig::max_backoff`].
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.base_backoff = base;
        self.max_backoff = max.max(base);
        self
    }

    /// Sets [`StoreConfig::topic_prefix`].
    pub fn topic_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.topic_prefix = prefix.into();
        self
    }

    fn backoff_for(&self, attempt: u32) -> Duration {
        let cap = self
            .base_backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max_backoff);
        cap.mul_f64(fastrand::f64())
    }
}

/// Where a command's state comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// The cached state when there is one (checked by the append).
    Cached,
    /// After a conflict: the cached state brought up to date with the
    /// events after it, else a full load.
    CatchUp,
    /// Always a full load (inside a caller's transaction).
    Load,
    /// A creation: the empty state at sequence 0, nothing loaded.
    New,
}

/// How a command's writes commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writes {
    /// The connection is in no transaction: the append statement commits
    /// by itself, and writes that must commit together (an append and a
    /// snapshot) get a transaction of their own. Reads before it (loads,
    /// head checks) run as statements of their own too; the append checks
    /// the sequence they saw (and the head event's id when it is known), so
    /// nothing decided on them commits if the stream moved.
    Autocommit,
    /// Inside the caller's transaction (a savepoint): written, not committed.
    InTransaction,
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
    /// The id of the last event, when it was read (not when the state came
    /// from a snapshot alone).
    pub(crate) head_event: Option<uuid::Uuid>,
}

impl<A> Loaded<A> {
    fn head(&self) -> Option<Head> {
        self.head_event.map(|event_id| Head {
            sequence: self.sequence,
            event_id,
        })
    }
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

/// The event store on PostgreSQL.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    config: StoreConfig,
    stats: std::sync::Arc<StoreStats>,
    cache: AggregateCache,
    waker: std::sync::Arc<wake::Waker>,
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
            waker: std::sync::Arc::new(wake::Waker::new(pool.clone())),
            pool,
            cache: AggregateCache::new(config.cache_capacity),
            config,
            stats: std::sync::Arc::default(),
        }
    }

    /// The topic the events of `A` go to (the configured prefix, then
    /// [`Aggregate::topic`]).
    pub fn topic_of<A: Aggregate>(&self) -> String {
        format!("{}{}", self.config.topic_prefix, A::topic())
    }

    /// Wakes the relays soon (a coalesced `NOTIFY`, sent outside any
    /// transaction). [`Store::execute`] does it after each commit; commits
    /// made through [`Store::execute_in`] or [`Store::append`] in the
    /// caller's transaction are found by the relays' polling, which speeds
    /// up after these calls wake them; call this after such a commit for
    /// the lowest latency.
    pub fn notify_relays(&self) {
        self.waker.wake();
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

    /// Runs a command: load (or take the cached state), handle, and append,
    /// the events and outbox rows committing in one statement (in a
    /// transaction with the snapshot when one is due); concurrency
    /// conflicts are retried with jittered backoff. An error after the
    /// append was sent may leave the command committed (see the module's
    /// guarantees).
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
        self.run::<A>(id, command, context, Start::Cached).await
    }

    /// Runs a command on a stream that must not exist yet (a creation):
    /// decides on the empty state and appends at the stream's start without
    /// loading anything, one query fewer than [`Store::execute`]. If the
    /// stream exists, nothing is written and the result is
    /// [`Error::Conflict`] (with the stream's sequence as `actual`), never a
    /// retry: a creation that finds its stream is not the same command on
    /// another state.
    pub async fn create<A: Aggregate>(
        &self,
        id: &str,
        command: A::Command,
    ) -> Result<Committed<A>, ExecuteError<A::Error>>
    where
        A::Command: Clone,
    {
        self.create_with(id, command, &EventContext::default())
            .await
    }

    /// [`Store::create`] with correlation, causation and metadata for the events.
    #[tracing::instrument(
        name = "tidings.create",
        skip_all,
        fields(
            aggregate_type = A::TYPE,
            aggregate_id = id,
            correlation_id = context.correlation_id.as_deref(),
            causation_id = context.causation_id.as_deref()
        )
    )]
    pub async fn create_with<A: Aggregate>(
        &self,
        id: &str,
        command: A::Command,
        context: &EventContext,
    ) -> Result<Committed<A>, ExecuteError<A::Error>>
    where
        A::Command: Clone,
    {
        self.run::<A>(id, command, context, Start::New).await
    }

    /// Runs a command on a connection of its own, its first attempt from
    /// `first`, conflicts retried (except for a creation) from the cached
    /// state caught up.
    async fn run<A: Aggregate>(
        &self,
        id: &str,
        command: A::Command,
        context: &EventContext,
        first: Start,
    ) -> Result<Committed<A>, ExecuteError<A::Error>>
    where
        A::Command: Clone,
    {
        let mut attempt = 0;
        loop {
            let mut conn = self
                .pool
                .acquire()
                .await
                .map_err(Error::db("acquiring a connection"))?;
            let outcome = self
                .try_execute::<A>(
                    &mut conn,
                    id,
                    command.clone(),
                    context,
                    if attempt == 0 { first } else { Start::CatchUp },
                    Writes::Autocommit,
                )
                .await;
            drop(conn);
            match outcome {
                Ok((mut committed, head)) => {
                    committed.retries = attempt;
                    self.count(&committed);
                    if !committed.envelopes.is_empty() {
                        self.waker.wake();
                    }
                    match head {
                        Some(head) => self.cache.put(id, head, &committed.state),
                        None => self.cache.forget::<A>(id),
                    }
                    return Ok(committed);
                }
                Err(ExecuteError::Store(Error::Conflict { .. }))
                    if attempt < self.config.max_conflict_retries && first != Start::New =>
                {
                    // The cached state stays: the retry reads only the
                    // events after it (and checks it is still history).
                    tokio::time::sleep(self.config.backoff_for(attempt)).await;
                    attempt += 1;
                }
                Err(ExecuteError::Store(e)) => {
                    self.cache.forget::<A>(id);
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
    /// `conn` must be inside a transaction opened through sqlx (`pool.begin()`,
    /// `conn.begin()`): anything else is refused with [`Error::Config`],
    /// because a savepoint on a connection with no transaction would commit
    /// by itself.
    ///
    /// Under READ COMMITTED (PostgreSQL's default) conflicts are retried
    /// inside a savepoint, so the caller's earlier writes in the transaction
    /// are kept. Under REPEATABLE READ or SERIALIZABLE the transaction's
    /// snapshot is fixed, so a reload could never see the other writer's
    /// events: the first conflict is returned at once as [`Error::Conflict`],
    /// and the caller retries its whole transaction.
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
        if !conn.is_in_transaction() {
            return Err(Error::Config(format!(
                "execute_in on {}/{id}: the connection is not inside a transaction opened \
                 through sqlx (pool.begin() or conn.begin()); nothing was written",
                A::TYPE
            ))
            .into());
        }
        let mut attempt = 0;
        loop {
            let mut savepoint = conn
                .begin()
                .await
                .map_err(Error::db("creating a savepoint"))?;
            match self
                .try_execute::<A>(
                    &mut savepoint,
                    id,
                    command.clone(),
                    context,
                    Start::Load,
                    Writes::InTransaction,
                )
                .await
            {
                Ok((mut committed, _)) => {
                    savepoint
                        .commit()
                        .await
                        .map_err(Error::db("releasing a savepoint"))?;
                    committed.retries = attempt;
                    self.count(&committed);
                    // The caller decides whether this commits: forget the cached state.
                    self.cache.forget::<A>(id);
                    // Before the caller's commit: the relays poll faster after a wake.
                    if !committed.envelopes.is_empty() {
                        self.waker.wake();
                    }
                    return Ok(committed);
                }
                Err(ExecuteError::Store(e @ Error::Conflict { .. })) => {
                    savepoint
                        .rollback()
                        .await
                        .map_err(Error::db("rolling back a savepoint"))?;
                    self.cache.forget::<A>(id);
                    let fixed_snapshot = attempt == 0 && fixed_snapshot(conn).await?;
                    if fixed_snapshot || attempt >= self.config.max_conflict_retries {
                        if fixed_snapshot {
                            tracing::debug!(
                                "execute_in: conflict under a fixed snapshot; the caller retries its transaction"
                            );
                        }
                        return Err(ExecuteError::Store(self.with_actual(e).await));
                    }
                    tokio::time::sleep(self.config.backoff_for(attempt)).await;
                    attempt += 1;
                }
                Err(ExecuteError::Store(e)) => {
                    self.cache.forget::<A>(id);
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

    /// Loads (or takes from the cache), decides, appends. Returns what was
    /// committed (or, with [`Writes::InTransaction`], written) and the
    /// stream's head after it, when known.
    async fn try_execute<A: Aggregate>(
        &self,
        conn: &mut PgConnection,
        id: &str,
        command: A::Command,
        context: &EventContext,
        start: Start,
        writes: Writes,
    ) -> Result<(Committed<A>, Option<Head>), ExecuteError<A::Error>>
    where
        A::Command: Clone,
    {
        use sqlx::Connection;
        let cached = match start {
            Start::Cached | Start::CatchUp => self.cache.get::<A>(id),
            Start::Load | Start::New => None,
        };
        let from_cache = cached.is_some() && start == Start::Cached;
        let mut loaded = match cached {
            Some((state, head)) if start == Start::Cached => Loaded {
                state,
                sequence: head.sequence,
                from_snapshot: false,
                head_event: Some(head.event_id),
            },
            Some((state, head)) => load::catch_up::<A>(conn, id, state, head).await?,
            None if start == Start::New => Loaded {
                state: A::default(),
                sequence: 0,
                from_snapshot: false,
                head_event: None,
            },
            None => load::load::<A>(conn, id).await?,
        };
        let mut decision = loaded.state.handle(command.clone());
        // A creation whose decision no append will check (a refusal, no
        // events) is checked here: the stream must not exist.
        if start == Start::New
            && decision.as_ref().map_or(true, Vec::is_empty)
            && append::head(conn, A::TYPE, id).await?.is_some()
        {
            return Err(ExecuteError::Store(append::conflict(A::TYPE, id, 0)));
        }
        // A refusal or an empty result from a cached state reaches the
        // caller unchecked by any append: check the stream's head first and
        // decide again on a fresh load if it moved.
        if from_cache
            && decision.as_ref().map_or(true, Vec::is_empty)
            && append::head(conn, A::TYPE, id).await? != loaded.head()
        {
            loaded = load::load::<A>(conn, id).await?;
            decision = loaded.state.handle(command);
        }
        let events = decision.map_err(ExecuteError::Rejected)?;
        let head = loaded.head();
        let mut state = loaded.state;
        if events.is_empty() {
            let committed = Committed {
                state,
                sequence: loaded.sequence,
                envelopes: vec![],
                retries: 0,
            };
            return Ok((committed, head));
        }
        let sequence = loaded.sequence + events.len() as u64;
        let snapshot_due = A::SNAPSHOT_EVERY > 0
            && loaded.sequence / A::SNAPSHOT_EVERY != sequence / A::SNAPSHOT_EVERY;
        let target = append::Target {
            aggregate_type: A::TYPE,
            aggregate_id: id,
            topic: &self.topic_of::<A>(),
            expected_sequence: loaded.sequence,
            expected_head: loaded.head_event,
            commits_alone: writes == Writes::Autocommit && !snapshot_due,
        };
        let envelopes = if snapshot_due && writes == Writes::Autocommit {
            // Two writes that commit together: a transaction of their own.
            let mut tx = conn
                .begin()
                .await
                .map_err(Error::db("beginning a transaction"))?;
            let envelopes = append::append::<A::Event>(&mut tx, target, &events, context).await?;
            for event in &events {
                state.apply(event);
            }
            load::save_snapshot(&mut tx, id, sequence, &state).await?;
            match tx.commit().await {
                Ok(()) => envelopes,
                // A serialization failure at commit (SERIALIZABLE) is a
                // conflict like any other: retried after a reload.
                Err(e) if append::is_serialization_failure(&e) => {
                    return Err(append::conflict(A::TYPE, id, loaded.sequence).into());
                }
                Err(e) => {
                    return Err(
                        Error::db(format!("committing a command on {}/{id}", A::TYPE))(e).into(),
                    );
                }
            }
        } else {
            // Alone, the append statement is its own transaction: the
            // command commits in one round trip.
            let envelopes = append::append::<A::Event>(conn, target, &events, context).await?;
            for event in &events {
                state.apply(event);
            }
            if snapshot_due {
                load::save_snapshot(conn, id, sequence, &state).await?;
            }
            envelopes
        };
        let head = envelopes.last().map(|last| Head {
            sequence,
            event_id: last.event_id,
        });
        let committed = Committed {
            state,
            sequence,
            envelopes,
            retries: 0,
        };
        Ok((committed, head))
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
        // Whatever this store cached of the stream is about to be stale.
        self.cache.forget::<A>(id);
        let target = append::Target {
            aggregate_type: A::TYPE,
            aggregate_id: id,
            topic: &self.topic_of::<A>(),
            expected_sequence,
            expected_head: None,
            commits_alone: !sqlx::Connection::is_in_transaction(&*conn),
        };
        match append::append::<A::Event>(conn, target, events, context).await {
            Ok(envelopes) => {
                // Before the caller's commit: the relays poll faster after a wake.
                self.waker.wake();
                Ok(envelopes)
            }
            Err(e) => Err(self.with_actual(e).await),
        }
    }

    /// Reads a stream's envelopes as stored (not upcast), in sequence order.
    pub async fn read_stream(&self, aggregate_type: &str, id: &str) -> Result<Vec<RawEnvelope>> {
        load::read_stream(&self.pool, aggregate_type, id).await
    }
}

/// Whether the transaction on `conn` has a fixed snapshot (REPEATABLE
/// READ or SERIALIZABLE), in which a reload cannot see other writers.
async fn fixed_snapshot(conn: &mut PgConnection) -> Result<bool> {
    let level: String = sqlx::query_scalar("SELECT current_setting('transaction_isolation')")
        .fetch_one(&mut *conn)
        .await
        .map_err(Error::db("reading the transaction's isolation level"))?;
    Ok(level != "read committed")
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
    /// Rows refused for good and set aside (`tidings outbox dead list`);
    /// their aggregates' later rows wait behind them.
    pub dead: u64,
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
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM tidings_outbox_dead")
        .fetch_one(pool)
        .await
        .map_err(Error::db("counting dead outbox rows"))?;
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
        dead: dead as u64,
    })
}
