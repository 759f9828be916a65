//! Projections under the faults the review of the read side named, against
//! real PostgreSQL and the real broker.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use sqlx::PgConnection;
use tidings::kafka::KafkaConfig;
use tidings::projection::{ApplyError, Projection, Runner, RunnerConfig};
use tidings::{Envelope, Event, RawEnvelope};
use tidings_tests::{TestDb, brokers, create_topic_named, unique};

/// Version 1 carried a string; the typed upcaster parses it and, like a
/// user who thought it could not fail, panics on a value it cannot parse.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct SetV1 {
    value: String,
}

impl From<SetV1> for GaugeEvent {
    fn from(v1: SetV1) -> Self {
        GaugeEvent::Set {
            value: v1.value.parse().expect("a v1 value is a number"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Event)]
#[event(topic = "gauges")]
enum GaugeEvent {
    #[event(version = 2, upcast(from = 1, typed = SetV1))]
    Set { value: i64 },
}

/// The last value and the number of events applied, per gauge.
struct GaugeView;

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

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ApplyError> {
        sqlx::query("TRUNCATE gauge_view").execute(conn).await?;
        Ok(())
    }
}

fn v1(id: &str, sequence: u64, value: &str) -> String {
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
        metadata: BTreeMap::new(),
        payload: json!({ "value": value }),
    }
    .to_json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_decoding_dead_letters_that_event_and_drops_nothing_behind_it() {
    let db = TestDb::new().await;
    sqlx::query("CREATE TABLE gauge_view (id TEXT PRIMARY KEY, value BIGINT NOT NULL, events BIGINT NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let prefix = format!("{}.", unique("t"));
    let topic = format!("{prefix}gauges");
    // One partition: every event queues behind the poisonous one.
    create_topic_named(&topic, 1).await;
    let producer: FutureProducer = tidings_tests::kafka_config().create().unwrap();
    let gauges = 5;
    let per = 20u64;
    for sequence in 1..=per {
        for g in 0..gauges {
            let id = format!("G-{g}");
            let value = if g == 2 && sequence == 5 {
                "thirteen".to_owned()
            } else {
                sequence.to_string()
            };
            producer
                .send(
                    FutureRecord::to(&topic)
                        .key(&id)
                        .payload(&v1(&id, sequence, &value)),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    }
    let config = RunnerConfig::new(KafkaConfig::new(brokers())).topic_prefix(&prefix);
    let runner = Runner::new(db.pool.clone(), GaugeView, config).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(runner.run(async move {
        let _ = stopped.await;
    }));

    // Every other gauge reaches its last event; G-2 stops before the poison.
    let started = Instant::now();
    let expected = |id: &str| if id == "G-2" { 4 } else { per as i64 };
    loop {
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT id, events FROM gauge_view")
            .fetch_all(&db.pool)
            .await
            .unwrap();
        let done = rows.len() == gauges && rows.iter().all(|(id, n)| *n == expected(id));
        if done {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the read model stalled or lost events: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let parked = tidings::projection::list_parked(&db.pool, Some("gauge_view"))
        .await
        .unwrap();
    let dead: Vec<_> = parked.iter().filter(|p| p.dead_letter).collect();
    assert_eq!(dead.len(), 1, "{parked:#?}");
    assert_eq!(dead[0].aggregate_id, "G-2");
    assert!(
        dead[0].reason.contains("panicked") && dead[0].reason.contains("a v1 value is a number"),
        "{}",
        dead[0].reason
    );
    assert_eq!(
        parked.iter().filter(|p| !p.dead_letter).count(),
        (per - 5) as usize,
        "G-2's later events are parked behind it, none dropped"
    );
    assert!(!task.is_finished(), "the runner keeps running");
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}
