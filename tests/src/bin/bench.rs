//! Benchmarks against real PostgreSQL and the real broker, each figure with
//! its raw baseline measured in the same run:
//!
//! `cargo run --release -p tidings-tests --bin bench -- all`
//! (after `scripts/dev.sh up`; sizes by flags, see `--help`).
//!
//! - append: `Store::execute` vs raw sqlx inserts of the same rows, one
//!   transaction per command, same concurrency (three raw writers: events
//!   and outbox rows between `BEGIN` and `COMMIT`, the events alone, and
//!   both in one statement with no `BEGIN`/`COMMIT`);
//! - cache: the same commands on existing aggregates with and without the
//!   aggregate cache (commands/s and the client's CPU per command);
//! - outbox: one relay read of 500 rows with a backlog of other lanes
//!   ahead of them, and with deleted rows at the head of its own lanes, vs
//!   the single index scan in id order that earlier versions made;
//! - relay: draining a pre-filled outbox (the `tidings relay` process) vs a
//!   raw idempotent producer sending the same payloads;
//! - replay: rebuilding the order summary (the `orders summary run`
//!   process) vs a raw consumer writing each batch of 500 with one
//!   `INSERT … SELECT FROM UNNEST`;
//! - end to end: latency from command commit to read model updated at a
//!   fixed offered rate;
//! - peak RSS of the relay and runner processes.
//!
//! Prints a table and writes JSON (`--json`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Executor, PgPool};
use tidings::{Aggregate, Event, EventContext, RawEnvelope, Store};
use tidings_tests::cpu::{self, Role};
use tidings_tests::{Spawned, database_url, example_bin, kafka_config, tidings_bin, unique};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// tidings benchmarks (real PostgreSQL and broker; see the module docs).
#[derive(Debug, Parser)]
struct Args {
    /// Which: all, append, cache, outbox, relay, replay, e2e.
    #[arg(default_value = "all")]
    which: String,
    /// Commands per append configuration.
    #[arg(long, default_value_t = 2000)]
    commands: usize,
    /// Events in the relay and replay runs.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Offered command rate of the end-to-end run (commands/s).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of the end-to-end run.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Alternated runs of each append cell (the medians are reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Rows of other lanes ahead of the relay's in the outbox-read run.
    #[arg(long, default_value_t = 300_000)]
    backlog: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-results.json")]
    json: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Event)]
enum BenchEvent {
    Recorded { n: u64, note: String },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Counter {
    n: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl Aggregate for Counter {
    const TYPE: &'static str = "counter";
    type Event = BenchEvent;
    type Command = usize;
    type Error = Never;

    fn handle(&self, events: usize) -> Result<Vec<BenchEvent>, Never> {
        Ok((0..events)
            .map(|i| BenchEvent::Recorded {
                n: self.n + i as u64,
                note: "benchmark payload".into(),
            })
            .collect())
    }

    fn apply(&mut self, _: &BenchEvent) {
        self.n += 1;
    }
}

#[derive(Debug, Serialize)]
struct Figure {
    name: String,
    unit: String,
    tidings: f64,
    baseline: Option<f64>,
}

impl Figure {
    fn ratio(&self) -> Option<f64> {
        self.baseline
            .map(|b| if b > 0.0 { self.tidings / b } else { 0.0 })
    }
}

/// The benchmark's database: `TIDINGS_BENCH_DATABASE` when set (runs side
/// by side need their own), else `tidings_bench`.
fn bench_database() -> String {
    std::env::var("TIDINGS_BENCH_DATABASE").unwrap_or_else(|_| "tidings_bench".into())
}

async fn fresh_pool() -> Result<PgPool, BoxError> {
    let server: PgConnectOptions = database_url().parse()?;
    let mut admin = server.connect().await?;
    let name = bench_database();
    admin
        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await?;
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await?;
    let pool = PgPoolOptions::new()
        .max_connections(40)
        .connect_with(server.database(&name))
        .await?;
    tidings::MIGRATOR.run(&pool).await?;
    Ok(pool)
}

fn db_url() -> String {
    let base = database_url();
    match base.rfind('/') {
        Some(i) if base[..i].contains("://") && base[..i].matches('/').count() >= 2 => {
            format!("{}/{}", &base[..i], bench_database())
        }
        _ => format!("{base}/{}", bench_database()),
    }
}

async fn reset(pool: &PgPool) -> Result<(), BoxError> {
    pool.execute("TRUNCATE tidings_events, tidings_outbox, tidings_snapshots")
        .await?;
    Ok(())
}

/// The median of `values` (the middle one; the upper middle of an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or_default()
}

/// `Store::execute`, `writers` at once, each on its own 50 aggregates (the
/// first command on each is `Store::create`).
async fn append_tidings(
    pool: &PgPool,
    writers: usize,
    per: usize,
    commands: usize,
) -> Result<f64, BoxError> {
    append_tidings_with(Store::new(pool.clone()), writers, per, commands).await
}

/// This process's CPU time so far: the nanoseconds on CPU of each of its
/// threads (`/proc/self/task/*/schedstat`), summed. The tokio workers that
/// run the commands live for the whole program, so none is lost.
fn cpu_time() -> Duration {
    let tasks = std::fs::read_dir("/proc/self/task").into_iter().flatten();
    let nanos: u64 = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(nanos)
}

/// The aggregate cache measured alone: the same commands on aggregates that
/// already have events (each aggregate's later commands), through a store
/// whose cache holds them and through one without a cache (every command
/// loads its stream). Returns commands/s and this process's CPU
/// microseconds per command for each: (cached, uncached).
async fn cache_cost(pool: &PgPool, commands: usize) -> Result<[(f64, f64); 2], BoxError> {
    let mut out = [(0.0, 0.0); 2];
    for (slot, capacity) in [(0, 10_000), (1, 0)] {
        reset(pool).await?;
        let store = Store::with_config(
            pool.clone(),
            tidings::StoreConfig::default().cache_capacity(capacity),
        );
        let cpu = cpu_time();
        let rate = append_tidings_with(store, 4, 1, commands).await?;
        let micros = (cpu_time() - cpu).as_secs_f64() * 1e6 / commands as f64;
        out[slot] = (rate, micros);
    }
    Ok(out)
}

async fn append_tidings_with(
    store: Store,
    writers: usize,
    per: usize,
    commands: usize,
) -> Result<f64, BoxError> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for c in 0..commands / writers {
                    let id = format!("w{w}-{}", c % 50);
                    // The first command on an aggregate creates it: like
                    // the raw writer, the store then knows it starts empty.
                    let executed = if c < 50 {
                        store.create::<Counter>(&id, per).await
                    } else {
                        store.execute::<Counter>(&id, per).await
                    };
                    executed.map_err(|e| e.to_string())?;
                }
                Ok::<_, String>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok((commands / writers * writers) as f64 / started.elapsed().as_secs_f64())
}

/// A raw command's `per` rows after the stream's last sequence `seq`
/// (advanced past them): event ids, sequences and payloads.
fn raw_rows(seq: &mut i64, per: usize) -> (Vec<uuid::Uuid>, Vec<i64>, Vec<String>) {
    let ids = (0..per).map(|_| uuid::Uuid::now_v7()).collect();
    let seqs: Vec<i64> = (0..per as i64).map(|i| *seq + 1 + i).collect();
    *seq += per as i64;
    let payloads = seqs
        .iter()
        .map(|s| format!(r#"{{"n":{s},"note":"benchmark payload"}}"#))
        .collect();
    (ids, seqs, payloads)
}

/// The same rows with plain sqlx: per command, one transaction inserting the
/// events and (with `outbox`) the outbox rows, set-based, as a careful
/// hand-written outbox would; without `outbox`, what event stores without
/// one write.
async fn append_raw(
    pool: &PgPool,
    writers: usize,
    per: usize,
    commands: usize,
    outbox: bool,
) -> Result<f64, BoxError> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut next: BTreeMap<usize, i64> = BTreeMap::new();
                for c in 0..commands / writers {
                    let id = format!("raw-w{w}-{}", c % 50);
                    let (ids, seqs, payloads) = raw_rows(next.entry(c % 50).or_insert(0), per);
                    let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
                    sqlx::query(
                        "INSERT INTO tidings_events (event_id, aggregate_type, aggregate_id, sequence, event_type, \
                         event_version, recorded_at, payload) \
                         SELECT e, 'counter', $1, s, 'Recorded', 1, now(), p::jsonb FROM UNNEST($2::uuid[], $3::bigint[], $4::text[]) AS t(e, s, p)",
                    )
                    .bind(&id)
                    .bind(&ids)
                    .bind(&seqs)
                    .bind(&payloads)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| e.to_string())?;
                    if outbox {
                        sqlx::query(
                            "INSERT INTO tidings_outbox (lane, topic, message_key, aggregate_type, aggregate_id, sequence, \
                             event_id, event_type, event_version, envelope) \
                             SELECT 0, 'counter', $1, 'counter', $1, s, e, 'Recorded', 1, p FROM UNNEST($2::uuid[], $3::bigint[], $4::text[]) AS t(e, s, p)",
                        )
                        .bind(&id)
                        .bind(&ids)
                        .bind(&seqs)
                        .bind(&payloads)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| e.to_string())?;
                    }
                    tx.commit().await.map_err(|e| e.to_string())?;
                }
                Ok::<_, String>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok((commands / writers * writers) as f64 / started.elapsed().as_secs_f64())
}

/// The same rows as [`append_raw`] with its outbox, written by one
/// statement per command (a writable CTE inserting the events and the
/// outbox rows) with no `BEGIN` or `COMMIT` around it: the statement is the
/// transaction. What a hand-written outbox tuned for round trips does.
async fn append_raw_one_statement(
    pool: &PgPool,
    writers: usize,
    per: usize,
    commands: usize,
) -> Result<f64, BoxError> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut next: BTreeMap<usize, i64> = BTreeMap::new();
                for c in 0..commands / writers {
                    let id = format!("raw1-w{w}-{}", c % 50);
                    let (ids, seqs, payloads) = raw_rows(next.entry(c % 50).or_insert(0), per);
                    sqlx::query(
                        "WITH t AS (SELECT * FROM UNNEST($2::uuid[], $3::bigint[], $4::text[]) AS t(e, s, p)), \
                         ev AS (INSERT INTO tidings_events (event_id, aggregate_type, aggregate_id, sequence, event_type, \
                         event_version, recorded_at, payload) \
                         SELECT e, 'counter', $1, s, 'Recorded', 1, now(), p::jsonb FROM t) \
                         INSERT INTO tidings_outbox (lane, topic, message_key, aggregate_type, aggregate_id, sequence, \
                         event_id, event_type, event_version, envelope) \
                         SELECT 0, 'counter', $1, 'counter', $1, s, e, 'Recorded', 1, p FROM t",
                    )
                    .bind(&id)
                    .bind(&ids)
                    .bind(&seqs)
                    .bind(&payloads)
                    .execute(&pool)
                    .await
                    .map_err(|e| e.to_string())?;
                }
                Ok::<_, String>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok((commands / writers * writers) as f64 / started.elapsed().as_secs_f64())
}

/// Waits for the 16 hot writers; their rate and the conflicts they retried.
async fn hot_rate(
    tasks: Vec<tokio::task::JoinHandle<Result<u64, String>>>,
    commands: usize,
    started: Instant,
) -> Result<(f64, u64), BoxError> {
    let mut retries = 0;
    for task in tasks {
        retries += task.await??;
    }
    Ok((
        (commands / 16 * 16) as f64 / started.elapsed().as_secs_f64(),
        retries,
    ))
}

/// `Store::execute` from 16 writers on 8 shared aggregates: conflicts, retried.
async fn append_tidings_hot(pool: &PgPool, commands: usize) -> Result<(f64, u64), BoxError> {
    let store = Store::new(pool.clone());
    let started = Instant::now();
    let tasks: Vec<_> = (0..16)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut retries = 0u64;
                for c in 0..commands / 16 {
                    let id = format!("hot-{}", (w + c) % 8);
                    let committed = store
                        .execute::<Counter>(&id, 1)
                        .await
                        .map_err(|e| e.to_string())?;
                    retries += u64::from(committed.retries);
                }
                Ok::<_, String>(retries)
            })
        })
        .collect();
    hot_rate(tasks, commands, started).await
}

/// The raw writer on the same 8 hot aggregates, with the store's retry
/// policy: read the stream's last sequence, insert the next event and its
/// outbox row; on a unique violation roll back, back off (2 ms doubling to
/// 200 ms, jittered) and try again.
async fn append_raw_hot(pool: &PgPool, commands: usize) -> Result<(f64, u64), BoxError> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..16)
        .map(|w| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut retries = 0u64;
                for c in 0..commands / 16 {
                    let id = format!("rawhot-{}", (w + c) % 8);
                    let mut attempt = 0u32;
                    loop {
                        let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
                        let last: i64 = sqlx::query_scalar(
                            "SELECT coalesce(max(sequence), 0) FROM tidings_events \
                             WHERE aggregate_type = 'counter' AND aggregate_id = $1",
                        )
                        .bind(&id)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(|e| e.to_string())?;
                        let event = uuid::Uuid::now_v7();
                        let payload = format!(r#"{{"n":{},"note":"benchmark payload"}}"#, last + 1);
                        let inserted = sqlx::query(
                            "WITH e AS (INSERT INTO tidings_events (event_id, aggregate_type, aggregate_id, sequence, \
                             event_type, event_version, recorded_at, payload) \
                             VALUES ($1, 'counter', $2, $3, 'Recorded', 1, now(), $4::jsonb) RETURNING 1) \
                             INSERT INTO tidings_outbox (lane, topic, message_key, aggregate_type, aggregate_id, sequence, \
                             event_id, event_type, event_version, envelope) \
                             SELECT 0, 'counter', $2, 'counter', $2, $3, $1, 'Recorded', 1, $4 FROM e",
                        )
                        .bind(event)
                        .bind(&id)
                        .bind(last + 1)
                        .bind(&payload)
                        .execute(&mut *tx)
                        .await;
                        let done = match inserted {
                            Ok(_) => tx.commit().await.map(|_| true),
                            Err(e) => Err(e),
                        };
                        match done {
                            Ok(_) => break,
                            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
                                retries += 1;
                                let cap = Duration::from_millis(2)
                                    .saturating_mul(1 << attempt.min(16))
                                    .min(Duration::from_millis(200));
                                tokio::time::sleep(cap.mul_f64(fastrand::f64())).await;
                                attempt += 1;
                            }
                            Err(e) => return Err(e.to_string()),
                        }
                    }
                }
                Ok::<_, String>(retries)
            })
        })
        .collect();
    hot_rate(tasks, commands, started).await
}

/// Puts back (or removes) the NOTIFY trigger earlier versions had in every
/// appending transaction, to measure what its removal changed.
async fn old_notify_trigger(pool: &PgPool, present: bool) -> Result<(), BoxError> {
    if present {
        pool.execute(
            "CREATE OR REPLACE FUNCTION tidings_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN PERFORM pg_notify('tidings_outbox', ''); RETURN NULL; END $$; \
             CREATE TRIGGER tidings_outbox_notify AFTER INSERT ON tidings_outbox \
             FOR EACH STATEMENT EXECUTE FUNCTION tidings_outbox_notify();",
        )
        .await?;
    } else {
        pool.execute(
            "DROP TRIGGER IF EXISTS tidings_outbox_notify ON tidings_outbox; \
             DROP FUNCTION IF EXISTS tidings_outbox_notify();",
        )
        .await?;
    }
    Ok(())
}

fn order_envelope(i: usize) -> RawEnvelope {
    let id = format!("ORD-{i:07}");
    RawEnvelope {
        event_type: "OrderCreated".into(),
        event_version: 2,
        event_id: uuid::Uuid::now_v7(),
        timestamp: tidings::now_micros(),
        aggregate_type: "order".into(),
        aggregate_id: id.clone(),
        sequence: 1,
        correlation_id: None,
        causation_id: None,
        metadata: BTreeMap::new(),
        payload: serde_json::json!({"order_id": id, "user_id": "USR-1", "amount": 1499.99, "currency": "EUR"}),
    }
}

/// The outbox read of earlier versions: one scan in id order over every
/// lane, filtered. Kept here to measure the per-lane read against.
const SINGLE_SCAN_READ: &str = "SELECT id, topic, message_key, aggregate_type, aggregate_id, event_id, event_type, \
     event_version, headers, envelope \
     FROM tidings_outbox o WHERE lane = ANY($1) AND NOT ((SELECT $3::int8multirange) @> id) \
     AND NOT EXISTS (SELECT 1 FROM tidings_outbox_dead d \
                     WHERE d.aggregate_type = o.aggregate_type AND d.aggregate_id = o.aggregate_id) \
     ORDER BY id LIMIT $2";

/// Inserts `n` outbox rows spread over `lanes`, with envelopes of the usual size.
async fn outbox_rows(pool: &PgPool, lanes: std::ops::Range<i32>, n: usize) -> Result<(), BoxError> {
    sqlx::query(
        "INSERT INTO tidings_outbox (lane, topic, message_key, aggregate_type, aggregate_id, sequence, \
         event_id, event_type, event_version, envelope) \
         SELECT $1 + g % $2, 'bench.orders', 'O-' || g, 'order', 'O-' || g, 1, gen_random_uuid(), \
         'OrderCreated', 2, repeat('x', 400) FROM generate_series(1, $3::int) g",
    )
    .bind(lanes.start)
    .bind(lanes.end - lanes.start)
    .bind(n as i32)
    .execute(pool)
    .await?;
    Ok(())
}

/// Median milliseconds of 15 reads of 500 rows of lanes 0-31, after 15
/// more that warm the prepared plans: the relay's read and the single
/// scan. Both must find the 500 rows.
async fn time_reads(pool: &PgPool) -> Result<(f64, f64), BoxError> {
    let lanes: Vec<i32> = (0..32).collect();
    let mut ours = Vec::new();
    let mut single = Vec::new();
    for _ in 0..30 {
        let started = Instant::now();
        let n = tidings::relay::read_batch_for_measurement(pool, &lanes, 500).await?;
        ours.push(started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        let rows = sqlx::query(SINGLE_SCAN_READ)
            .bind(&lanes)
            .bind(500_i64)
            .bind("{}")
            .fetch_all(pool)
            .await?;
        single.push(started.elapsed().as_secs_f64() * 1e3);
        if n != 500 || rows.len() != 500 {
            return Err(format!("a read found {n} and {} rows, not 500", rows.len()).into());
        }
    }
    let mut ours = ours.split_off(15);
    let mut single = single.split_off(15);
    ours.sort_by(f64::total_cmp);
    single.sort_by(f64::total_cmp);
    Ok((ours[7], single[7]))
}

/// One relay read of lanes 0-31 in three states of the outbox: a backlog
/// of lanes 32-63 ahead (statistics from before it arrived), as many
/// deleted rows at the head of lanes 0-31 (not vacuumed yet), and the same
/// after a vacuum. Autovacuum is off for the run, so the states hold.
async fn outbox_read(pool: &PgPool, backlog: usize) -> Result<Vec<Figure>, BoxError> {
    reset(pool).await?;
    pool.execute("ALTER TABLE tidings_outbox SET (autovacuum_enabled = false)")
        .await?;
    outbox_rows(pool, 0..64, 640).await?;
    pool.execute("ANALYZE tidings_outbox").await?;
    pool.execute("TRUNCATE tidings_outbox").await?;
    outbox_rows(pool, 32..64, backlog).await?;
    outbox_rows(pool, 0..32, 500).await?;
    let ahead = time_reads(pool).await?;
    reset(pool).await?;
    outbox_rows(pool, 0..32, backlog / 2).await?;
    pool.execute("DELETE FROM tidings_outbox").await?;
    outbox_rows(pool, 0..32, 500).await?;
    let dead = time_reads(pool).await?;
    pool.execute("VACUUM tidings_outbox").await?;
    let vacuumed = time_reads(pool).await?;
    pool.execute("ALTER TABLE tidings_outbox RESET (autovacuum_enabled)")
        .await?;
    let figure = |name: String, (ours, single): (f64, f64)| Figure {
        name,
        unit: "ms".into(),
        tidings: ours,
        baseline: Some(single),
    };
    Ok(vec![
        figure(
            format!(
                "outbox read of 500 rows, {backlog} rows of other lanes ahead (stale statistics), vs one scan in id order"
            ),
            ahead,
        ),
        figure(
            format!(
                "outbox read of 500 rows, {} deleted rows ahead in its lanes, vs one scan in id order",
                backlog / 2
            ),
            dead,
        ),
        figure(
            "outbox read of 500 rows, the same after vacuum, vs one scan in id order".into(),
            vacuumed,
        ),
    ])
}

/// Fills the outbox with `n` OrderCreated events of `n` orders, as the store writes them.
async fn fill_outbox(pool: &PgPool, topic: &str, n: usize) -> Result<(), BoxError> {
    for chunk in (0..n).collect::<Vec<_>>().chunks(5000) {
        let envelopes: Vec<RawEnvelope> = chunk.iter().map(|i| order_envelope(*i)).collect();
        let ids: Vec<String> = envelopes.iter().map(|e| e.aggregate_id.clone()).collect();
        let lanes: Vec<i32> = ids
            .iter()
            .map(|id| tidings::store::lane_of("order", id))
            .collect();
        let event_ids: Vec<uuid::Uuid> = envelopes.iter().map(|e| e.event_id).collect();
        let wire: Vec<String> = envelopes.iter().map(RawEnvelope::to_json).collect();
        sqlx::query(
            "INSERT INTO tidings_outbox (lane, topic, message_key, aggregate_type, aggregate_id, sequence, event_id, \
             event_type, event_version, envelope) \
             SELECT l, $1, i, 'order', i, 1, e, 'OrderCreated', 2, w FROM UNNEST($2::int[], $3::text[], $4::uuid[], $5::text[]) AS t(l, i, e, w)",
        )
        .bind(topic)
        .bind(&lanes)
        .bind(&ids)
        .bind(&event_ids)
        .bind(&wire)
        .execute(pool)
        .await?;
    }
    Ok(())
}

fn peak_rss_mb(child: &Child) -> f64 {
    std::fs::read_to_string(format!("/proc/{}/status", child.id()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_owned)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn spawn(bin: PathBuf, args: &[&str], prefix: &str) -> Result<Spawned, BoxError> {
    Ok(Command::new(bin)
        .args(args)
        .env("DATABASE_URL", db_url())
        .env("KAFKA_BROKERS", tidings_tests::brokers())
        .env("TIDINGS_TOPIC_PREFIX", prefix)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?
        .into())
}

/// Asks the child to stop (SIGTERM), killing it after 10 s.
fn stop(mut child: Spawned) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

async fn wait(
    what: &str,
    within: Duration,
    mut done: impl AsyncFnMut() -> Result<bool, BoxError>,
) -> Result<Duration, BoxError> {
    let started = Instant::now();
    while !done().await? {
        if started.elapsed() > within {
            return Err(format!("{what}: not done within {within:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(started.elapsed())
}

async fn raw_produce(topic: &str, n: usize) -> Result<f64, BoxError> {
    let producer: FutureProducer = kafka_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()?;
    // The same messages as the relay sends: key, envelope and headers.
    let messages: Vec<(String, String, OwnedHeaders)> = (0..n)
        .map(order_envelope)
        .map(|e| {
            let mut headers = OwnedHeaders::new_with_capacity(4);
            for (key, value) in e.headers() {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
            (e.aggregate_id.clone(), e.to_json(), headers)
        })
        .collect();
    // Connected and the topic's leaders known before the clock starts, as
    // the relay's drain is timed from its first acknowledged batch.
    producer
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(30))?;
    let started = Instant::now();
    let mut pending = Vec::with_capacity(n);
    for (key, value, headers) in &messages {
        loop {
            match producer.send_result(
                FutureRecord::to(topic)
                    .key(key.as_str())
                    .payload(value.as_str())
                    .headers(headers.clone()),
            ) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }
    for delivery in pending {
        delivery.await?.map_err(|(e, _)| e)?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn raw_replay(pool: &PgPool, topic: &str, n: usize) -> Result<f64, BoxError> {
    pool.execute(
        "CREATE TABLE order_summary_raw (order_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, amount DOUBLE PRECISION NOT NULL, \
         currency TEXT NOT NULL, status TEXT NOT NULL, payment_id TEXT, events_applied INTEGER NOT NULL)",
    )
    .await?;
    let consumer = from_the_start("bench_raw", topic)?;
    // Timed from its first batch committed, as the runner's replay is: the
    // group join and the first fetch are in neither rate.
    let mut started: Option<(Instant, usize)> = None;
    let subscribed = Instant::now();
    let mut done = 0;
    let mut batch = Vec::with_capacity(500);
    while done < n {
        let message = tokio::time::timeout(Duration::from_secs(60), consumer.recv()).await??;
        batch.push(message.detach());
        while batch.len() < 500 {
            match tokio::time::timeout(Duration::from_millis(1), consumer.recv()).await {
                Ok(Ok(m)) => batch.push(m.detach()),
                _ => break,
            }
        }
        // What a careful hand-written consumer does: the batch's rows in one
        // `INSERT … SELECT FROM UNNEST`, in one transaction.
        let (mut ids, mut users, mut amounts, mut currencies) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for m in &batch {
            let envelope = RawEnvelope::from_slice(m.payload().unwrap_or_default())?;
            users.push(
                envelope.payload["user_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
            amounts.push(envelope.payload["amount"].as_f64().unwrap_or_default());
            currencies.push(
                envelope.payload["currency"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
            ids.push(envelope.aggregate_id);
        }
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO order_summary_raw (order_id, user_id, amount, currency, status, events_applied) \
             SELECT i, u, a, c, 'created', 1 FROM UNNEST($1::text[], $2::text[], $3::float8[], $4::text[]) AS t(i, u, a, c)",
        )
        .bind(&ids)
        .bind(&users)
        .bind(&amounts)
        .bind(&currencies)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        done += batch.len();
        batch.clear();
        started.get_or_insert((Instant::now(), done));
    }
    let (started, first) = started.ok_or("no batch")?;
    if first >= n {
        // One batch held it all (a tiny run): counted from the subscription.
        return Ok(n as f64 / subscribed.elapsed().as_secs_f64());
    }
    Ok((n - first) as f64 / started.elapsed().as_secs_f64())
}

/// A consumer in a fresh group reading `topic` from its first message.
fn from_the_start(group: &str, topic: &str) -> Result<StreamConsumer, BoxError> {
    let consumer: StreamConsumer = kafka_config()
        .set("group.id", unique(group))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    Ok(consumer)
}

/// p50 and p99 of commit → produced and of produced → applied, in ms, over
/// the end-to-end run's events.
async fn e2e_legs(pool: &PgPool, topic: &str, total: usize) -> Result<[f64; 4], BoxError> {
    let consumer = from_the_start("bench_legs", topic)?;
    let mut ids = Vec::with_capacity(total);
    let mut produced = Vec::with_capacity(total);
    while ids.len() < total {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await??;
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        if let (true, Some(ms)) = (key.starts_with("E2E-"), message.timestamp().to_millis()) {
            ids.push(key);
            produced.push(ms);
        }
    }
    let legs: (f64, f64, f64, f64) = sqlx::query_as(
        "WITH p AS (SELECT * FROM UNNEST($1::text[], $2::bigint[]) AS p(id, ms)), \
         l AS (SELECT p.ms - EXTRACT(EPOCH FROM e.recorded_at) * 1000 AS relay, \
                      EXTRACT(EPOCH FROM s.applied_at) * 1000 - p.ms AS runner \
               FROM p JOIN tidings_events e ON e.aggregate_id = p.id AND e.sequence = 1 \
               JOIN order_summary s ON s.order_id = p.id) \
         SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY relay), percentile_cont(0.99) WITHIN GROUP (ORDER BY relay), \
                percentile_cont(0.5) WITHIN GROUP (ORDER BY runner), percentile_cont(0.99) WITHIN GROUP (ORDER BY runner) FROM l",
    )
    .bind(&ids)
    .bind(&produced)
    .fetch_one(pool)
    .await?;
    Ok([legs.0, legs.1, legs.2, legs.3])
}

/// Rows in the order summary read model (one per order applied).
/// Messages of the orders topic the summary projection has applied: a sum
/// over its checkpoint rows (one per partition), which commit with the read
/// model. A cheap probe: a `count(*)` of the read model every 20 ms is a
/// sequential scan that competed with the runner (a third of PostgreSQL's
/// CPU at 1M rows) while the raw consumer had no such probe.
async fn summary_applied(pool: &PgPool) -> Result<i64, BoxError> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM tidings_checkpoints WHERE projection = 'order_summary'",
    )
    .fetch_one(pool)
    .await?)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let all = args.which == "all";
    let pool = fresh_pool().await?;
    let mut figures: Vec<Figure> = Vec::new();

    if all || args.which == "append" {
        for writers in [1, 4, 16] {
            for per in [1, 10] {
                // Alternated runs, medians: the machine's fsync times drift
                // between two runs more than the sides differ.
                let (mut raws, mut bare, mut single, mut oursv) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for _ in 0..args.repeat.max(1) {
                    reset(&pool).await?;
                    raws.push(append_raw(&pool, writers, per, args.commands, true).await?);
                    reset(&pool).await?;
                    bare.push(append_raw(&pool, writers, per, args.commands, false).await?);
                    reset(&pool).await?;
                    single
                        .push(append_raw_one_statement(&pool, writers, per, args.commands).await?);
                    reset(&pool).await?;
                    oursv.push(append_tidings(&pool, writers, per, args.commands).await?);
                }
                let (raw, events_only, one_statement, ours) =
                    (median(raws), median(bare), median(single), median(oursv));
                figures.push(Figure {
                    name: format!("append {writers} writers x {per} events/command"),
                    unit: "commands/s".into(),
                    tidings: ours,
                    baseline: Some(raw),
                });
                figures.push(Figure {
                    name: format!(
                        "append {writers} writers x {per} events/command, raw events only"
                    ),
                    unit: "commands/s".into(),
                    tidings: ours,
                    baseline: Some(events_only),
                });
                figures.push(Figure {
                    name: format!(
                        "append {writers} writers x {per} events/command, raw in one statement"
                    ),
                    unit: "commands/s".into(),
                    tidings: ours,
                    baseline: Some(one_statement),
                });
                eprintln!(
                    "append w={writers} e={per}: {ours:.0} vs raw {raw:.0} (events only {events_only:.0}, one statement {one_statement:.0}) commands/s"
                );
            }
        }
        let (mut raws, mut oursv, mut raw_retries, mut retries) = (Vec::new(), Vec::new(), 0, 0);
        for _ in 0..args.repeat.max(1) {
            reset(&pool).await?;
            let (raw, r) = append_raw_hot(&pool, args.commands).await?;
            reset(&pool).await?;
            let (ours, o) = append_tidings_hot(&pool, args.commands).await?;
            raws.push(raw);
            oursv.push(ours);
            raw_retries += r;
            retries += o;
        }
        let (raw, ours) = (median(raws), median(oursv));
        figures.push(Figure {
            name: "append 16 writers on 8 hot aggregates (conflicts retried)".into(),
            unit: "commands/s".into(),
            tidings: ours,
            baseline: Some(raw),
        });
        eprintln!(
            "append hot: {ours:.0} ({retries} retries) vs raw {raw:.0} ({raw_retries} retries) commands/s"
        );
        // What the NOTIFY trigger of earlier versions cost, in the same run.
        reset(&pool).await?;
        old_notify_trigger(&pool, true).await?;
        let raw = append_raw(&pool, 16, 1, args.commands, true).await?;
        reset(&pool).await?;
        let ours = append_tidings(&pool, 16, 1, args.commands).await?;
        old_notify_trigger(&pool, false).await?;
        figures.push(Figure {
            name: "append 16 writers x 1 event/command, with the old NOTIFY trigger".into(),
            unit: "commands/s".into(),
            tidings: ours,
            baseline: Some(raw),
        });
        eprintln!("append w=16 e=1 with the old trigger: {ours:.0} vs raw {raw:.0} commands/s");
    }

    if all || args.which == "cache" {
        let (mut on, mut off) = (Vec::new(), Vec::new());
        let (mut cpu_on, mut cpu_off) = (Vec::new(), Vec::new());
        for _ in 0..args.repeat.max(1) {
            let [(rate_on, micros_on), (rate_off, micros_off)] =
                cache_cost(&pool, args.commands).await?;
            on.push(rate_on);
            off.push(rate_off);
            cpu_on.push(micros_on);
            cpu_off.push(micros_off);
        }
        let (on, off, cpu_on, cpu_off) = (median(on), median(off), median(cpu_on), median(cpu_off));
        eprintln!(
            "cache: {on:.0} commands/s cached vs {off:.0} uncached; store CPU {cpu_on:.0} vs {cpu_off:.0} µs/command"
        );
        figures.push(Figure {
            name: "append 4 writers x 1 event/command on existing aggregates, cached (baseline: no cache)".into(),
            unit: "commands/s".into(),
            tidings: on,
            baseline: Some(off),
        });
        figures.push(Figure {
            name: "client CPU per command, cached (baseline: no cache)".into(),
            unit: "µs".into(),
            tidings: cpu_on,
            baseline: Some(cpu_off),
        });
    }

    if all || args.which == "outbox" {
        for figure in outbox_read(&pool, args.backlog).await? {
            eprintln!(
                "{}: {:.2} vs {:.2} ms",
                figure.name,
                figure.tidings,
                figure.baseline.unwrap_or_default()
            );
            figures.push(figure);
        }
    }

    let prefix = format!("{}.", unique("bench"));
    let topic = format!("{prefix}orders");
    let needs_topic = all || ["relay", "replay", "e2e"].contains(&args.which.as_str());
    if needs_topic {
        reset(&pool).await?;
        // Raw baseline first, into its own topic with the same partitions.
        let raw_topic = format!("{prefix}raw");
        tidings::kafka::ensure_topics(
            &tidings::kafka::KafkaConfig::new(tidings_tests::brokers()),
            &[raw_topic.clone(), topic.clone()].into(),
            &tidings::kafka::TopicSpec::default(),
        )
        .await?;
        let raw = raw_produce(&raw_topic, args.events).await?;
        fill_outbox(&pool, &topic, args.events).await?;
        // The drain is timed from the relay's first acknowledged batch (its
        // first row deleted), as the raw producer is timed from its first
        // send: neither side's process or client start is in the rate.
        let first: i64 = sqlx::query_scalar("SELECT min(id) FROM tidings_outbox")
            .fetch_one(&pool)
            .await?;
        let relay = spawn(tidings_bin(), &["relay"], &prefix)?;
        let startup = wait(
            "the relay's first batch",
            Duration::from_secs(120),
            async || {
                let waiting: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM tidings_outbox WHERE id = $1)",
                )
                .bind(first)
                .fetch_one(&pool)
                .await?;
                Ok(!waiting)
            },
        )
        .await?;
        let remaining: i64 = sqlx::query_scalar("SELECT count(*) FROM tidings_outbox")
            .fetch_one(&pool)
            .await?;
        let took = wait(
            "the relay draining the outbox",
            Duration::from_secs(600),
            // A cheap probe: a full count every 20 ms would compete with the relay.
            async || {
                let waiting: bool =
                    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tidings_outbox)")
                        .fetch_one(&pool)
                        .await?;
                Ok(!waiting)
            },
        )
        .await?;
        let ours = remaining.max(1) as f64 / took.as_secs_f64();
        eprintln!(
            "relay: {ours:.0} vs raw producer {raw:.0} events/s ({} ms from the relay's start to its first batch acknowledged; {:.0} events/s counting it)",
            startup.as_millis(),
            args.events as f64 / (startup + took).as_secs_f64()
        );
        figures.push(Figure {
            name: "relay drain".into(),
            unit: "events/s".into(),
            tidings: ours,
            baseline: Some(raw),
        });

        // Replay: the runner process rebuilds the read model from the topic,
        // into a table of the same shape as the raw consumer's.
        // Each side starts from a checkpoint of its own: neither pays for
        // the dirty pages and the full-page writes the other left behind.
        pool.execute("CHECKPOINT").await?;
        let raw_roles = [
            ("broker", Role::Named("nisshi")),
            ("PostgreSQL", Role::Named("postgres")),
            ("raw consumer", Role::Pid(std::process::id())),
        ];
        let before = cpu::sample(&raw_roles);
        let raw_rate = raw_replay(&pool, &topic, args.events).await?;
        let raw_cpu = before.shares_until(&cpu::sample(&raw_roles));
        pool.execute(
            "CREATE TABLE order_summary (order_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, amount DOUBLE PRECISION NOT NULL, \
             currency TEXT NOT NULL, status TEXT NOT NULL, payment_id TEXT, events_applied INTEGER NOT NULL)",
        )
        .await?;
        pool.execute("CHECKPOINT").await?;
        let runner = spawn(example_bin("orders"), &["summary", "run"], &prefix)?;
        let roles = [
            ("broker", Role::Named("nisshi")),
            ("PostgreSQL", Role::Named("postgres")),
            ("load generator", Role::Pid(std::process::id())),
            ("relay", Role::Pid(relay.id())),
            ("runner", Role::Pid(runner.id())),
        ];
        let n = args.events as i64;
        // Timed from the first batch committed (the process start, the
        // group join and the first fetch are not in the rate, nor in the
        // raw consumer's), counting the events applied after it.
        let startup = wait(
            "the runner's first batch",
            Duration::from_secs(120),
            async || Ok(summary_applied(&pool).await? > 0),
        )
        .await?;
        let first = summary_applied(&pool).await?;
        let before = cpu::sample(&roles);
        let took = wait(
            "the projection replaying the topic",
            Duration::from_secs(900),
            async || Ok(summary_applied(&pool).await? >= n),
        )
        .await?;
        let replay_cpu = before.shares_until(&cpu::sample(&roles));
        // One batch held it all (a tiny run): counted from the spawn.
        let ours = if first >= n {
            n as f64 / (startup + took).as_secs_f64()
        } else {
            (n - first) as f64 / took.as_secs_f64()
        };
        eprintln!(
            "replay: {ours:.0} vs raw consumer {raw_rate:.0} events/s ({} ms from the runner's start to its first batch; {:.0} events/s counting it)",
            startup.as_millis(),
            n as f64 / (startup + took).as_secs_f64()
        );
        // Where the CPU went (the bench's own share is its probes here).
        eprintln!("replay CPU: {replay_cpu}");
        eprintln!("raw replay CPU: {raw_cpu}");
        figures.push(Figure {
            name: "replay".into(),
            unit: "events/s".into(),
            tidings: ours,
            baseline: Some(raw_rate),
        });

        // End to end at a fixed offered rate, relay and runner as they are.
        if all || args.which == "e2e" {
            // When each row was applied (rows added from now on), for the
            // legs; added in two steps so that no row is rewritten.
            pool.execute("ALTER TABLE order_summary ADD COLUMN applied_at TIMESTAMPTZ")
                .await?;
            pool.execute(
                "ALTER TABLE order_summary ALTER COLUMN applied_at SET DEFAULT clock_timestamp()",
            )
            .await?;
            let store = Store::with_config(
                pool.clone(),
                tidings::StoreConfig::default().topic_prefix(&prefix),
            );
            let total = (args.rate * args.seconds) as usize;
            let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
            let before = cpu::sample(&roles);
            let started = Instant::now();
            let mut tasks = Vec::with_capacity(total);
            let store = Arc::new(store);
            for i in 0..total {
                let due = started + interval.mul_f64(i as f64);
                tokio::time::sleep_until(due.into()).await;
                let store = Arc::clone(&store);
                tasks.push(tokio::spawn(async move {
                    let id = format!("E2E-{i:07}");
                    let command = tidings_examples::orders::OrderCommand::Create {
                        order_id: id.clone(),
                        user_id: "U".into(),
                        amount: 1.0,
                        currency: "EUR".into(),
                    };
                    store
                        .execute_with::<tidings_examples::orders::Order>(
                            &id,
                            command,
                            &EventContext::new(),
                        )
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }));
            }
            for task in tasks {
                task.await??;
            }
            let offered = total as f64 / started.elapsed().as_secs_f64();
            let expected = n + total as i64;
            wait(
                "the end-to-end run settling",
                Duration::from_secs(120),
                async || Ok(summary_applied(&pool).await? >= expected),
            )
            .await?;
            let e2e_cpu = before.shares_until(&cpu::sample(&roles));
            let (p50, p95, p99): (f64, f64, f64) = sqlx::query_as(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.95) WITHIN GROUP (ORDER BY ms), \
                 percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) FROM ( \
                 SELECT EXTRACT(EPOCH FROM s.applied_at - e.recorded_at) * 1000 AS ms \
                 FROM order_summary s JOIN tidings_events e ON e.aggregate_id = s.order_id AND e.sequence = 1 \
                 WHERE s.order_id LIKE 'E2E-%') l",
            )
            .fetch_one(&pool)
            .await?;
            eprintln!(
                "e2e at {offered:.0} commands/s: p50 {p50:.1} ms, p95 {p95:.1} ms, p99 {p99:.1} ms"
            );
            // Where the time goes: the message timestamp (set by the relay's
            // producer) splits each event's latency into the relay's leg and
            // the runner's.
            let legs = e2e_legs(&pool, &topic, total).await?;
            eprintln!(
                "e2e legs (p50/p99): commit to produced {:.1}/{:.1} ms, produced to applied {:.1}/{:.1} ms",
                legs[0], legs[1], legs[2], legs[3]
            );
            eprintln!("e2e CPU, from the first command to the last applied: {e2e_cpu}");
            for (name, v) in [("p50", p50), ("p95", p95), ("p99", p99)] {
                figures.push(Figure {
                    name: format!("end to end {name} at {offered:.0} commands/s"),
                    unit: "ms".into(),
                    tidings: v,
                    baseline: None,
                });
            }
            for (leg, name, v) in [
                ("commit to produced", "p50", legs[0]),
                ("commit to produced", "p99", legs[1]),
                ("produced to applied", "p50", legs[2]),
                ("produced to applied", "p99", legs[3]),
            ] {
                figures.push(Figure {
                    name: format!("{leg} {name} at {offered:.0} commands/s"),
                    unit: "ms".into(),
                    tidings: v,
                    baseline: None,
                });
            }
        }
        figures.push(Figure {
            name: "relay peak RSS".into(),
            unit: "MB".into(),
            tidings: peak_rss_mb(&relay),
            baseline: None,
        });
        figures.push(Figure {
            name: "runner peak RSS".into(),
            unit: "MB".into(),
            tidings: peak_rss_mb(&runner),
            baseline: None,
        });
        stop(relay);
        stop(runner);
    }

    println!("| figure | tidings | raw baseline | ratio |");
    println!("|---|---|---|---|");
    for f in &figures {
        let precise = f.unit == "ms" || f.unit == "MB" || f.unit == "µs";
        let baseline = f.baseline.map_or("-".into(), |b| {
            if precise {
                format!("{b:.1} {}", f.unit)
            } else {
                format!("{b:.0} {}", f.unit)
            }
        });
        let ratio = f.ratio().map_or("-".into(), |r| format!("{r:.2}"));
        let value = if precise {
            format!("{:.1} {}", f.tidings, f.unit)
        } else {
            format!("{:.0} {}", f.tidings, f.unit)
        };
        println!("| {} | {value} | {baseline} | {ratio} |", f.name);
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&figures)?)?;
    println!(
        "\n{} figures written to {}",
        figures.len(),
        args.json.display()
    );
    drop(pool);
    let server: PgConnectOptions = database_url().parse()?;
    let mut admin = server.connect().await?;
    admin
        .execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", bench_database()).as_str())
        .await?;
    Ok(())
}
