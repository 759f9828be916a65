//! A whole pipeline for fault scenarios: a counter aggregate, its read
//! model, and the figures a scenario reports (committed, published, applied,
//! lost, duplicated, out of order, dead-lettered).

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use tidings::projection::{ApplyError, Batch, BatchError, Projection};
use tidings::{Aggregate, Envelope, Event, Store};

use crate::Received;

/// Scale of the fault scenarios: `TIDINGS_FAULT_SCALE` (default 1).
pub fn scale() -> usize {
    std::env::var("TIDINGS_FAULT_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// The counter's one event.
#[derive(Debug, Clone, PartialEq, Event)]
#[event(topic = "counters")]
pub enum CounterEvent {
    /// The counter went up.
    Added {
        /// By how much.
        amount: i64,
    },
}

/// A counter: every command is accepted, so every command must show up.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counter {
    /// The total.
    pub total: i64,
}

/// Never happens.
#[derive(Debug, thiserror::Error)]
#[error("never")]
pub struct Never;

impl Aggregate for Counter {
    const TYPE: &'static str = "counter";
    type Event = CounterEvent;
    type Command = i64;
    type Error = Never;

    fn handle(&self, amount: i64) -> Result<Vec<CounterEvent>, Never> {
        Ok(vec![CounterEvent::Added { amount }])
    }

    fn apply(&mut self, event: &CounterEvent) {
        let CounterEvent::Added { amount } = event;
        self.total += amount;
    }
}

/// The counters' read model: total and number of events applied per counter.
///
/// It applies batches set-based (one statement per batch), or one event at
/// a time when `TIDINGS_TEST_APPLY=each`: the suite runs over both paths.
#[derive(Debug, Clone, Default)]
pub struct CounterView;

/// Whether the test projections apply one event at a time
/// (`TIDINGS_TEST_APPLY=each`) rather than set-based batches.
pub fn one_at_a_time() -> bool {
    std::env::var("TIDINGS_TEST_APPLY").is_ok_and(|v| v == "each")
}

impl CounterView {
    /// Creates `counter_view`.
    pub async fn create_table(pool: &PgPool) {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS counter_view (id TEXT PRIMARY KEY, total BIGINT NOT NULL, events BIGINT NOT NULL, last_sequence BIGINT NOT NULL, out_of_order BIGINT NOT NULL DEFAULT 0)",
        )
        .execute(pool)
        .await
        .unwrap();
    }
}

#[async_trait]
impl Projection for CounterView {
    type Event = CounterEvent;

    fn name(&self) -> &str {
        "counter_view"
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        envelope: &Envelope<CounterEvent>,
    ) -> Result<(), ApplyError> {
        let CounterEvent::Added { amount } = envelope.payload;
        // Counts any event applied out of sequence order.
        sqlx::query(
            "INSERT INTO counter_view AS v (id, total, events, last_sequence, out_of_order) \
             VALUES ($1, $2, 1, $3, CASE WHEN $3 = 1 THEN 0 ELSE 1 END) \
             ON CONFLICT (id) DO UPDATE SET total = v.total + $2, events = v.events + 1, last_sequence = $3, \
             out_of_order = v.out_of_order + CASE WHEN $3 = v.last_sequence + 1 THEN 0 ELSE 1 END",
        )
        .bind(&envelope.aggregate_id)
        .bind(amount)
        .bind(envelope.sequence as i64)
        .execute(conn)
        .await?;
        Ok(())
    }

    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        batch: &Batch<'_, CounterEvent>,
    ) -> Result<(), BatchError> {
        if one_at_a_time() {
            return tidings::projection::apply_each(self, conn, batch).await;
        }
        // Folded per counter: the sum, the count, the first and last
        // sequences and the breaks in order within the batch.
        let (mut ids, mut totals, mut counts, mut firsts, mut lasts, mut breaks) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for stream in batch.by_stream() {
            let (mut total, mut breaks_here, mut previous) = (0i64, 0i64, None::<i64>);
            for (_, envelope) in &stream.events {
                let CounterEvent::Added { amount } = envelope.payload;
                total += amount;
                let sequence = envelope.sequence as i64;
                if previous.is_some_and(|p| sequence != p + 1) {
                    breaks_here += 1;
                }
                previous = Some(sequence);
            }
            ids.push(stream.aggregate_id);
            totals.push(total);
            counts.push(stream.events.len() as i64);
            firsts.push(stream.events[0].1.sequence as i64);
            lasts.push(previous.unwrap_or_default());
            breaks.push(breaks_here);
        }
        sqlx::query(
            "WITH u AS (SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[]) \
                 AS u(id, total, n, first, last, breaks)), \
             up AS (UPDATE counter_view AS v SET total = v.total + u.total, events = v.events + u.n, \
                 last_sequence = u.last, \
                 out_of_order = v.out_of_order + u.breaks + CASE WHEN u.first = v.last_sequence + 1 THEN 0 ELSE 1 END \
                 FROM u WHERE v.id = u.id RETURNING v.id) \
             INSERT INTO counter_view (id, total, events, last_sequence, out_of_order) \
             SELECT id, total, n, last, breaks + CASE WHEN first = 1 THEN 0 ELSE 1 END FROM u \
             WHERE id NOT IN (SELECT id FROM up)",
        )
        .bind(&ids)
        .bind(&totals)
        .bind(&counts)
        .bind(&firsts)
        .bind(&lasts)
        .bind(&breaks)
        .execute(conn)
        .await?;
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ApplyError> {
        sqlx::query("TRUNCATE counter_view").execute(conn).await?;
        Ok(())
    }
}

/// What a scenario reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Figures {
    /// Events committed to the store.
    pub committed: u64,
    /// Distinct events on the topic.
    pub published: u64,
    /// Events applied to the read model.
    pub applied: u64,
    /// Committed but never applied.
    pub lost: u64,
    /// Extra copies on the topic (absorbed by the projection).
    pub duplicated: u64,
    /// Events applied out of sequence order.
    pub out_of_order: u64,
    /// Events dead-lettered.
    pub dead_lettered: u64,
}

impl Figures {
    /// Prints one line for the scenario's report.
    pub fn print(&self, scenario: &str) {
        println!(
            "FAULTS | {scenario} | committed {} | published {} | applied {} | lost {} | duplicated {} | out of order {} | dead-lettered {} |",
            self.committed,
            self.published,
            self.applied,
            self.lost,
            self.duplicated,
            self.out_of_order,
            self.dead_lettered
        );
    }

    /// Asserts nothing was lost or reordered: every committed event is on
    /// the topic (a topic read cut short fails here) and applied once.
    pub fn assert_sound(&self, scenario: &str) {
        self.print(scenario);
        assert_eq!(self.lost, 0, "{scenario}: events lost: {self:?}");
        assert_eq!(
            self.published, self.committed,
            "{scenario}: distinct events on the topic: {self:?}"
        );
        assert_eq!(
            self.out_of_order, 0,
            "{scenario}: events out of order: {self:?}"
        );
        assert_eq!(self.applied, self.committed, "{scenario}: {self:?}");
    }
}

/// Waits until the read model has applied `committed` events.
pub async fn wait_applied(pool: &PgPool, committed: u64, within: Duration) {
    let within = crate::scaled(within);
    let started = Instant::now();
    loop {
        let applied: i64 =
            sqlx::query_scalar("SELECT coalesce(sum(events), 0)::bigint FROM counter_view")
                .fetch_one(pool)
                .await
                .unwrap_or(0);
        if applied as u64 >= committed {
            return;
        }
        assert!(
            started.elapsed() < within,
            "only {applied} of {committed} events applied after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Computes the figures from the store, the topic's messages and the read model.
pub async fn figures(store: &Store, topic_messages: &[Received]) -> Figures {
    let pool = store.pool();
    let committed: i64 = sqlx::query_scalar("SELECT count(*) FROM tidings_events")
        .fetch_one(pool)
        .await
        .unwrap();
    let rows: Vec<(String, i64, i64, i64)> =
        sqlx::query_as("SELECT id, total, events, out_of_order FROM counter_view")
            .fetch_all(pool)
            .await
            .unwrap();
    let applied: i64 = rows.iter().map(|r| r.2).sum();
    let out_of_order: i64 = rows.iter().map(|r| r.3).sum();
    // Every counter of the store is in the read model with the store's
    // total, event count and last sequence (a double apply offset by a
    // loss, a missing counter or a gap at a stream's end all show here).
    let stored: BTreeMap<String, (i64, i64, i64)> = sqlx::query_as(
        "SELECT aggregate_id, sum((payload->>'amount')::bigint)::bigint, count(*), max(sequence) \
         FROM tidings_events WHERE aggregate_type = 'counter' GROUP BY aggregate_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(id, total, events, last): (String, i64, i64, i64)| (id, (total, events, last)))
    .collect();
    let read: BTreeMap<String, (i64, i64, i64)> =
        sqlx::query_as("SELECT id, total, events, last_sequence FROM counter_view")
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .map(|(id, total, events, last): (String, i64, i64, i64)| (id, (total, events, last)))
            .collect();
    for (id, expected) in &stored {
        assert_eq!(
            read.get(id),
            Some(expected),
            "counter {id}: (total, events, last sequence) in the read model differ from the store"
        );
    }
    let totals = stored;
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM tidings_parked WHERE dead_letter")
        .fetch_one(pool)
        .await
        .unwrap();
    // Only the messages of committed streams count (bad input produced
    // straight to the topic is reported as dead-lettered instead).
    let ours: Vec<(String, u64)> = topic_messages
        .iter()
        .filter_map(|m| {
            m.envelope
                .as_ref()
                .map(|e| (e.aggregate_id.clone(), e.sequence))
        })
        .filter(|(id, _)| totals.contains_key(id))
        .collect();
    let distinct: HashSet<&(String, u64)> = ours.iter().collect();
    Figures {
        committed: committed as u64,
        published: distinct.len() as u64,
        applied: applied as u64,
        lost: (committed - applied).max(0) as u64,
        duplicated: (ours.len() - distinct.len()) as u64,
        out_of_order: out_of_order as u64,
        dead_lettered: dead as u64,
    }
}

/// Issues `commands` counter commands over `counters` counters from
/// `writers` concurrent writers; returns when all committed.
pub async fn write(
    store: &Store,
    counters: usize,
    writers: usize,
    commands: usize,
    pause: Duration,
) {
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for c in 0..commands / writers {
                    let id = format!("C-{:03}", (w + c * writers) % counters);
                    let mut attempt = 0;
                    // A database restart can fail a command: the caller retries it.
                    while let Err(e) = store.execute::<Counter>(&id, (c + 1) as i64).await {
                        attempt += 1;
                        assert!(attempt < 100, "command kept failing: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// The events committed to the store so far.
pub async fn committed(pool: &PgPool) -> u64 {
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM tidings_events")
        .fetch_one(pool)
        .await
        .unwrap();
    total as u64
}

/// Waits until the read model applied every committed event, reads the
/// counters' topic from `brokers`, and computes the figures.
pub async fn settle(store: &Store, brokers: &str) -> Figures {
    let total = committed(store.pool()).await;
    wait_applied(store.pool(), total, Duration::from_secs(120)).await;
    let messages = crate::consume_from(
        brokers,
        &store.topic_of::<Counter>(),
        total as usize,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    figures(store, &messages).await
}
