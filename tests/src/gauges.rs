//! A gauge read model fed straight from a topic (no store in between), for
//! scenarios that need messages no store would write: a panicking typed
//! upcaster, bad sequences, foreign headers.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use sqlx::PgConnection;
use tidings::projection::{ApplyError, Batch, BatchError, Projection, Runner};
use tidings::{Envelope, Event, RawEnvelope};

use crate::{TestDb, create_topic_named, unique};

/// Version 1 carried a string; the typed upcaster parses it and, like a
/// user who thought it could not fail, panics on a value it cannot parse.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct SetV1 {
    /// The value, as text.
    pub value: String,
}

impl From<SetV1> for GaugeEvent {
    fn from(v1: SetV1) -> Self {
        GaugeEvent::Set {
            value: v1.value.parse().expect("a v1 value is a number"),
        }
    }
}

/// An event of old producers: two values set at once, read today as two
/// `Set` events.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct SetTwiceV1 {
    /// The first value.
    pub first: i64,
    /// The value after it.
    pub second: i64,
}

impl From<SetTwiceV1> for Vec<GaugeEvent> {
    fn from(v1: SetTwiceV1) -> Self {
        vec![
            GaugeEvent::Set { value: v1.first },
            GaugeEvent::Set { value: v1.second },
        ]
    }
}

/// What happens to a gauge: version 2 carries a number. `Reset` is
/// retired (dropped on read); `SetTwice` is read as two `Set` events.
#[derive(Debug, Clone, PartialEq, Event)]
#[event(
    topic = "gauges",
    retired(name = "Reset", version = 1),
    split(name = "SetTwice", version = 1, typed = SetTwiceV1)
)]
pub enum GaugeEvent {
    /// The gauge's new value.
    #[event(version = 2, upcast(from = 1, typed = SetV1))]
    Set {
        /// The value.
        value: i64,
    },
}

/// The last value and the number of events applied, per gauge.
#[derive(Debug, Clone, Copy)]
pub struct GaugeView;

#[async_trait]
impl Projection for GaugeView {
    type Event = GaugeEvent;

    fn name(&self) -> &str {
        "gauge_view"
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        envelope: &Envelope<GaugeEvent>,
    ) -> Result<(), ApplyError> {
        let GaugeEvent::Set { value } = envelope.payload;
        sqlx::query(
            "INSERT INTO gauge_view AS g (id, value, events) VALUES ($1, $2, 1) \
             ON CONFLICT (id) DO UPDATE SET value = $2, events = g.events + 1",
        )
        .bind(&envelope.aggregate_id)
        .bind(value)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Set-based (the last value and the count per gauge, one upsert),
    /// unless `TIDINGS_TEST_APPLY=each`.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        batch: &Batch<'_, GaugeEvent>,
    ) -> Result<(), BatchError> {
        if crate::pipeline::one_at_a_time() {
            return tidings::projection::apply_each(self, conn, batch).await;
        }
        upsert_folded(conn, batch).await
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ApplyError> {
        sqlx::query("TRUNCATE gauge_view").execute(conn).await?;
        Ok(())
    }
}

/// Writes a batch to `gauge_view` set-based: folded per gauge (its last
/// value, its count), one upsert.
pub async fn upsert_folded(
    conn: &mut PgConnection,
    batch: &Batch<'_, GaugeEvent>,
) -> Result<(), BatchError> {
    let (mut ids, mut values, mut counts) = (Vec::new(), Vec::new(), Vec::new());
    for stream in batch.by_stream() {
        let Some((_, last)) = stream.events.last() else {
            continue;
        };
        let GaugeEvent::Set { value } = last.payload;
        ids.push(stream.aggregate_id);
        values.push(value);
        counts.push(stream.events.len() as i64);
    }
    sqlx::query(
            "INSERT INTO gauge_view AS g (id, value, events) \
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[]) \
             ON CONFLICT (id) DO UPDATE SET value = EXCLUDED.value, events = g.events + EXCLUDED.events",
        )
        .bind(&ids)
        .bind(&values)
        .bind(&counts)
        .execute(conn)
        .await?;
    Ok(())
}

/// A version 1 envelope of gauge `id`.
pub fn v1(id: &str, sequence: u64, value: &str) -> String {
    v1_padded(id, sequence, value, 0)
}

/// [`v1`] with `pad` bytes of metadata (to make a message large).
pub fn v1_padded(id: &str, sequence: u64, value: &str, pad: usize) -> String {
    let metadata = if pad == 0 {
        BTreeMap::new()
    } else {
        BTreeMap::from([("pad".to_owned(), "p".repeat(pad))])
    };
    RawEnvelope {
        event_type: "Set".into(),
        event_version: 1,
        event_id: uuid::Uuid::now_v7(),
        timestamp: tidings::now_micros(),
        aggregate_type: "gauge".into(),
        aggregate_id: id.into(),
        sequence,
        correlation_id: None,
        causation_id: None,
        metadata,
        payload: json!({ "value": value }),
    }
    .to_json()
}

/// A fresh topic of one partition under a fresh prefix (every event of a
/// test queues behind the others), and a producer for it.
pub async fn one_partition_topic() -> (String, String, FutureProducer) {
    let prefix = format!("{}.", unique("t"));
    let topic = format!("{prefix}gauges");
    create_topic_named(&topic, 1).await;
    let producer: FutureProducer = crate::kafka_config().create().unwrap();
    (prefix, topic, producer)
}

/// Creates `gauge_view`.
pub async fn create_gauge_view(db: &TestDb) {
    sqlx::query("CREATE TABLE gauge_view (id TEXT PRIMARY KEY, value BIGINT NOT NULL, events BIGINT NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
}

/// Produces one message and waits for its acknowledgement.
pub async fn produce(producer: &FutureProducer, topic: &str, key: &str, value: &str) {
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(value),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

/// Runs `runner` in the background until the sender is fired.
pub fn spawn_runner<P: Projection>(
    runner: Runner<P>,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<tidings::Result<()>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(runner.run(async move {
        let _ = stopped.await;
    }));
    (stop, task)
}

/// The gauge view with a check of the test's choosing run before each
/// event: a transient error, a permanent refusal or a panic.
pub struct GaugeWith<F>(pub F);

impl<F> std::fmt::Debug for GaugeWith<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GaugeWith").finish_non_exhaustive()
    }
}

#[async_trait]
impl<F> Projection for GaugeWith<F>
where
    F: Fn(&Envelope<GaugeEvent>) -> Result<(), ApplyError> + Send + Sync + 'static,
{
    type Event = GaugeEvent;

    fn name(&self) -> &str {
        GaugeView.name()
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        envelope: &Envelope<GaugeEvent>,
    ) -> Result<(), ApplyError> {
        (self.0)(envelope)?;
        GaugeView.apply(conn, envelope).await
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ApplyError> {
        GaugeView.reset(conn).await
    }
}

/// Runs `projection` on the gauges of `prefix` (default settings) until the
/// sender is fired.
pub fn gauge_runner<P: Projection>(
    db: &TestDb,
    prefix: &str,
    projection: P,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<tidings::Result<()>>,
) {
    let config =
        tidings::projection::RunnerConfig::new(tidings::kafka::KafkaConfig::new(crate::brokers()))
            .topic_prefix(prefix);
    spawn_runner(Runner::new(db.pool.clone(), projection, config).unwrap())
}
