//! Projection registry, replay and lag.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use sqlx::PgPool;

use crate::error::{Error, Result};
use crate::kafka::KafkaConfig;
use crate::projection::{ApplyError, Projection, validate_projection_name};

/// Registers a projection if new; returns its generation and the identity
/// of its registration in this database. Neither statement waits for the
/// batches that hold the projection's row (no update of an existing row).
pub(crate) async fn register(pool: &PgPool, name: &str) -> Result<(i32, uuid::Uuid)> {
    let what = || format!("registering projection {name}");
    sqlx::query("INSERT INTO tidings_projections (name) VALUES ($1) ON CONFLICT (name) DO NOTHING")
        .bind(name)
        .execute(pool)
        .await
        .map_err(Error::db(what()))?;
    sqlx::query_as("SELECT generation, instance FROM tidings_projections WHERE name = $1")
        .bind(name)
        .fetch_one(pool)
        .await
        .map_err(Error::db(what()))
}

/// The current generation of a projection (`None` if it never ran).
pub async fn generation(pool: &PgPool, name: &str) -> Result<Option<i32>> {
    sqlx::query_scalar("SELECT generation FROM tidings_projections WHERE name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await
        .map_err(Error::db(format!(
            "reading the generation of projection {name}"
        )))
}

/// Rebuilds a projection from the start of its topics: in one transaction,
/// resets the read model ([`Projection::reset`]), forgets checkpoints,
/// stream positions and parked events, and starts a new generation. Running
/// runners see the new generation within a second, stop applying the old
/// one (its batches are fenced out) and consume from the beginning under a
/// new consumer group. Returns the new generation.
pub async fn replay<P: Projection>(pool: &PgPool, projection: &P) -> Result<i32> {
    let name = projection.name();
    validate_projection_name(name)?;
    register(pool, name).await?;
    let db = |what: &str| Error::db(format!("replaying projection {name}: {what}"));
    let mut tx = pool.begin().await.map_err(db("beginning"))?;
    // Waits for the batches in flight only: they hold the projection's
    // advisory lock shared, and batches that start later queue behind this.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('tidings.projection.' || $1, 0))")
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(db("waiting for the batches in flight"))?;
    sqlx::query("SELECT generation FROM tidings_projections WHERE name = $1 FOR UPDATE")
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(db("locking"))?;
    projection.reset(&mut tx).await.map_err(|e| match e {
        ApplyError::Transient(e) | ApplyError::Permanent(e) => {
            Error::Config(format!("projection {name}: reset failed: {e}"))
        }
    })?;
    for table in [
        "tidings_checkpoints",
        "tidings_projection_streams",
        "tidings_parked",
    ] {
        sqlx::query(&format!("DELETE FROM {table} WHERE projection = $1"))
            .bind(name)
            .execute(&mut *tx)
            .await
            .map_err(db("forgetting positions"))?;
    }
    let generation: i32 = sqlx::query_scalar(
        "UPDATE tidings_projections SET generation = generation + 1, updated_at = now() \
         WHERE name = $1 RETURNING generation",
    )
    .bind(name)
    .fetch_one(&mut *tx)
    .await
    .map_err(db("starting a new generation"))?;
    tx.commit().await.map_err(db("committing"))?;
    Ok(generation)
}

/// Position and lag of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionLag {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The next offset the projection will apply (its position).
    pub position: i64,
    /// The partition's high watermark (the offset of the next message written).
    pub high_watermark: i64,
    /// Messages not applied yet (0 when the checkpoint is ahead: see
    /// [`PartitionLag::checkpoint_ahead`]).
    pub lag: i64,
    /// The checkpoint is beyond the partition's end: the topic is not the
    /// one the checkpoint was made on (recreated, truncated, offsets
    /// reset). The runner stops such a partition rather than drop what is
    /// written below the checkpoint.
    pub checkpoint_ahead: bool,
}

/// Where a projection is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProjectionStatus {
    /// The projection's name.
    pub name: String,
    /// Its generation (bumped by each replay).
    pub generation: i32,
    /// Position and lag per partition of its topics.
    pub partitions: Vec<PartitionLag>,
    /// Events waiting behind a dead letter.
    pub parked: i64,
    /// Dead-lettered events not re-driven yet.
    pub dead_lettered: i64,
}

impl ProjectionStatus {
    /// The total lag over all partitions.
    pub fn lag(&self) -> i64 {
        self.partitions.iter().map(|p| p.lag).sum()
    }
}

/// Reads a projection's positions from PostgreSQL and the high watermarks of
/// its topics from Kafka.
pub async fn projection_status(
    pool: &PgPool,
    kafka: &KafkaConfig,
    name: &str,
    topics: &[String],
) -> Result<ProjectionStatus> {
    let generation = generation(pool, name).await?.unwrap_or(0);
    let positions: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT topic, partition, next_offset FROM tidings_checkpoints WHERE projection = $1",
    )
    .bind(name)
    .fetch_all(pool)
    .await
    .map_err(Error::db(format!("reading the positions of {name}")))?;
    let (parked, dead_lettered): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE NOT dead_letter), count(*) FILTER (WHERE dead_letter) \
         FROM tidings_parked WHERE projection = $1",
    )
    .bind(name)
    .fetch_one(pool)
    .await
    .map_err(Error::db(format!("counting the parked events of {name}")))?;

    let config = kafka.client_config()?;
    let topics = topics.to_vec();
    let watermarks = tokio::task::spawn_blocking(move || -> Result<Vec<(String, i32, i64)>> {
        let consumer: BaseConsumer = config.create().map_err(|source| Error::Kafka {
            context: "creating a metadata client".into(),
            source,
        })?;
        let mut out = Vec::new();
        // All topics in one request: naming a missing topic could make a
        // broker with auto-creation create it.
        let metadata = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .map_err(|source| Error::Kafka {
                context: "reading the cluster's metadata".into(),
                source,
            })?;
        for topic in &topics {
            let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
                return Err(Error::Config(format!(
                    "topic {topic} does not exist: the lag is unknown"
                )));
            };
            {
                for p in t.partitions() {
                    let (_, high) = consumer
                        .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                        .map_err(|source| Error::Kafka {
                            context: format!("reading the watermarks of {topic}/{}", p.id()),
                            source,
                        })?;
                    out.push((topic.clone(), p.id(), high));
                }
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| Error::Config(format!("reading watermarks: {e}")))??;

    let mut partitions: Vec<PartitionLag> = watermarks
        .into_iter()
        .map(|(topic, partition, high)| {
            let position = positions
                .iter()
                .find(|(t, p, _)| *t == topic && *p == partition)
                .map(|(_, _, o)| *o)
                .unwrap_or(0);
            PartitionLag {
                lag: (high - position).max(0),
                checkpoint_ahead: position > high,
                topic,
                partition,
                position,
                high_watermark: high,
            }
        })
        .collect();
    partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok(ProjectionStatus {
        name: name.to_owned(),
        generation,
        partitions,
        parked,
        dead_lettered,
    })
}

/// Zero-downtime rebuild: waits until the projection `name` (a new version
/// of a read model, built under its own name into its own tables while the
/// current version keeps serving) has caught up with its topics, then runs
/// `switch` (e.g. `CREATE OR REPLACE VIEW orders AS SELECT * FROM orders_v2`)
/// in one transaction, so readers move from the old version to the new one
/// atomically. Fails after `timeout` without switching.
pub async fn switch_when_caught_up(
    pool: &PgPool,
    kafka: &KafkaConfig,
    name: &str,
    topics: &[String],
    switch: &str,
    timeout: Duration,
) -> Result<ProjectionStatus> {
    let started = std::time::Instant::now();
    loop {
        let status = projection_status(pool, kafka, name, topics).await?;
        let started_all = !status.partitions.is_empty();
        if started_all && status.lag() == 0 {
            let mut tx = pool
                .begin()
                .await
                .map_err(Error::db("beginning the switch"))?;
            sqlx::raw_sql(switch)
                .execute(&mut *tx)
                .await
                .map_err(Error::db(format!("switching to projection {name}")))?;
            tx.commit()
                .await
                .map_err(Error::db("committing the switch"))?;
            return Ok(status);
        }
        if started.elapsed() > timeout {
            return Err(Error::Config(format!(
                "projection {name} did not catch up within {timeout:?} (lag {}); nothing switched",
                status.lag()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
