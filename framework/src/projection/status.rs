//! Projection registry, replay and lag.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use sqlx::{PgConnection, PgPool};

use crate::error::{Error, Result};
use crate::kafka::KafkaConfig;
use crate::projection::{ApplyError, Projection, validate_projection_name};

/// Registers a projection if new, recording the topics it reads (when
/// given); returns its generation and the identity of its registration in
/// this database. Registering never waits for the batches that hold the
/// projection's row, except to record changed topics (rare, and then behind
/// the batches in flight only). A retired projection is refused.
pub(crate) async fn register(
    pool: &PgPool,
    name: &str,
    topics: Option<&[String]>,
) -> Result<(i32, uuid::Uuid)> {
    let what = || format!("registering projection {name}");
    let mut wanted: Option<Vec<String>> = topics.map(|t| {
        let mut t = t.to_vec();
        t.sort();
        t.dedup();
        t
    });
    sqlx::query(
        "INSERT INTO tidings_projections (name, topics) VALUES ($1, coalesce($2, '{}')) \
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(wanted.as_deref())
    .execute(pool)
    .await
    .map_err(Error::db(what()))?;
    let (generation, instance, recorded, retired): (i32, uuid::Uuid, Vec<String>, Option<String>) =
        sqlx::query_as(
            "SELECT generation, instance, topics, retired_at::text FROM tidings_projections \
             WHERE name = $1",
        )
        .bind(name)
        .fetch_one(pool)
        .await
        .map_err(Error::db(what()))?;
    if let Some(at) = retired {
        return Err(Error::Retired {
            name: name.to_owned(),
            at,
        });
    }
    if let Some(wanted) = wanted.take().filter(|w| *w != recorded) {
        let mut tx = pool.begin().await.map_err(Error::db(what()))?;
        lock_exclusive(&mut tx, name).await?;
        sqlx::query("UPDATE tidings_projections SET topics = $2 WHERE name = $1")
            .bind(name)
            .bind(&wanted)
            .execute(&mut *tx)
            .await
            .map_err(Error::db(what()))?;
        tx.commit().await.map_err(Error::db(what()))?;
    }
    Ok((generation, instance))
}

/// Takes the projection's advisory lock exclusively for the transaction:
/// waits for the batches in flight only (they hold it shared), and batches
/// that start later queue behind it.
pub(crate) async fn lock_exclusive(conn: &mut PgConnection, name: &str) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('tidings.projection.' || $1, 0))")
        .bind(name)
        .execute(&mut *conn)
        .await
        .map_err(Error::db(format!(
            "projection {name}: waiting for the batches in flight"
        )))?;
    Ok(())
}

/// Deletes a projection's checkpoints, stream positions, parked events and
/// counts of events skipped unread.
pub(crate) async fn forget_positions(conn: &mut PgConnection, name: &str) -> Result<()> {
    for table in [
        "tidings_checkpoints",
        "tidings_projection_streams",
        "tidings_parked",
        "tidings_projection_ignored",
    ] {
        sqlx::query(&format!("DELETE FROM {table} WHERE projection = $1"))
            .bind(name)
            .execute(&mut *conn)
            .await
            .map_err(Error::db(format!(
                "projection {name}: forgetting its positions"
            )))?;
    }
    Ok(())
}

/// The topics a projection's runners registered (empty if none ran yet).
pub async fn registered_topics(pool: &PgPool, name: &str) -> Result<Vec<String>> {
    let topics: Option<Vec<String>> =
        sqlx::query_scalar("SELECT topics FROM tidings_projections WHERE name = $1")
            .bind(name)
            .fetch_optional(pool)
            .await
            .map_err(Error::db(format!(
                "reading the topics of projection {name}"
            )))?;
    Ok(topics.unwrap_or_default())
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
    register(pool, name, None).await?;
    let db = |what: &str| Error::db(format!("replaying projection {name}: {what}"));
    let mut tx = pool.begin().await.map_err(db("beginning"))?;
    lock_exclusive(&mut tx, name).await?;
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
    forget_positions(&mut tx, name).await?;
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
    /// Dead letters whose copy the dead letter topic refused for good (see
    /// `dlq list`); they stay parked in PostgreSQL.
    pub undeliverable: i64,
    /// Events skipped unread (unknown types; newer versions if so
    /// configured), per type, version and reason.
    pub ignored: Vec<super::IgnoredEvents>,
}

impl ProjectionStatus {
    /// Events skipped unread, in all.
    pub fn ignored_events(&self) -> i64 {
        self.ignored.iter().map(|i| i.events).sum()
    }

    /// The total lag over all partitions.
    pub fn lag(&self) -> i64 {
        self.partitions.iter().map(|p| p.lag).sum()
    }
}

/// A client that reads high watermarks, kept for repeated reads (a
/// metrics endpoint, a switch waiting for a catch-up) instead of a client
/// and its broker threads per read.
#[derive(Clone)]
pub struct Watermarks {
    consumer: Arc<BaseConsumer>,
}

impl std::fmt::Debug for Watermarks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watermarks").finish_non_exhaustive()
    }
}

impl Watermarks {
    /// A client for the given Kafka settings.
    pub fn new(kafka: &KafkaConfig) -> Result<Self> {
        let consumer: BaseConsumer =
            kafka
                .client_config()?
                .create()
                .map_err(|source| Error::Kafka {
                    context: "creating a metadata client".into(),
                    source,
                })?;
        Ok(Watermarks {
            consumer: Arc::new(consumer),
        })
    }

    /// The high watermark of every partition of `topics`. A missing topic
    /// is an error: its lag is unknown, never 0.
    pub async fn high(&self, topics: &[String]) -> Result<Vec<(String, i32, i64)>> {
        let consumer = Arc::clone(&self.consumer);
        let topics = topics.to_vec();
        tokio::task::spawn_blocking(move || -> Result<Vec<(String, i32, i64)>> {
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
            Ok(out)
        })
        .await
        .map_err(|e| Error::Config(format!("reading watermarks: {e}")))?
    }
}

/// Reads a projection's positions from PostgreSQL and the high watermarks of
/// its topics from Kafka. `topics` empty: the topics its runners registered.
pub async fn projection_status(
    pool: &PgPool,
    kafka: &KafkaConfig,
    name: &str,
    topics: &[String],
) -> Result<ProjectionStatus> {
    status_with(pool, &Watermarks::new(kafka)?, name, topics).await
}

/// [`projection_status`] through a kept [`Watermarks`] client.
pub async fn status_with(
    pool: &PgPool,
    watermarks: &Watermarks,
    name: &str,
    topics: &[String],
) -> Result<ProjectionStatus> {
    let generation = generation(pool, name).await?.unwrap_or(0);
    let topics = if topics.is_empty() {
        registered_topics(pool, name).await?
    } else {
        topics.to_vec()
    };
    if topics.is_empty() {
        return Err(Error::Config(format!(
            "projection {name} has no registered topics (no runner of it ran yet): the lag is unknown"
        )));
    }
    let positions: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT topic, partition, next_offset FROM tidings_checkpoints WHERE projection = $1",
    )
    .bind(name)
    .fetch_all(pool)
    .await
    .map_err(Error::db(format!("reading the positions of {name}")))?;
    let (parked, dead_lettered, undeliverable): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE NOT dead_letter), count(*) FILTER (WHERE dead_letter), \
         count(*) FILTER (WHERE dlq_error IS NOT NULL) FROM tidings_parked WHERE projection = $1",
    )
    .bind(name)
    .fetch_one(pool)
    .await
    .map_err(Error::db(format!("counting the parked events of {name}")))?;
    let ignored: Vec<(String, i32, String, i64)> = sqlx::query_as(
        "SELECT event_type, event_version, reason, events FROM tidings_projection_ignored \
         WHERE projection = $1 ORDER BY event_type, event_version, reason",
    )
    .bind(name)
    .fetch_all(pool)
    .await
    .map_err(Error::db(format!(
        "counting the events {name} skipped unread"
    )))?;
    let ignored = ignored
        .into_iter()
        .map(
            |(event_type, event_version, reason, events)| super::IgnoredEvents {
                event_type,
                event_version,
                reason,
                events,
            },
        )
        .collect();
    let watermarks = watermarks.high(&topics).await?;

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
        undeliverable,
        ignored,
    })
}
