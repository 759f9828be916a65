//! Zero-downtime rebuilds: switching readers to a new version of a read
//! model once it caught up, and retiring the old version.
//!
//! # Guarantees
//!
//! - **Caught up means caught up for a while.** The new version's lag must
//!   stay at or below a threshold in every sample over a window (one client
//!   reads the watermarks throughout), so a steady load does not prevent the
//!   switch and a momentary dip does not trigger it.
//! - **Nothing missing is switched in.** The dead letters of the new version
//!   are counted in the switch's own transaction, with its batches held off:
//!   any dead letter refuses the switch unless it is explicitly allowed.
//! - **Atomic for readers.** The switch statement (typically `DROP VIEW …;
//!   CREATE VIEW …`) commits in one transaction, together with the old
//!   version's retirement when asked for.
//! - **Retired means stopped.** Retiring bumps the old version's generation
//!   (its batches in flight are fenced out), marks it retired (its runners
//!   stop, and it cannot be registered again by accident), and deletes its
//!   positions, stream rows and parked events; then its consumer groups and
//!   dead letter topic, once its runners have left the group.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use sqlx::{PgConnection, PgPool};

use crate::error::{Error, Result};
use crate::kafka::KafkaConfig;
use crate::projection::runner::{dead_letter_topic, group_id};
use crate::projection::status::{
    ProjectionStatus, Watermarks, forget_positions, lock_exclusive, registered_topics, status_with,
};
use crate::projection::{RunnerConfig, validate_projection_name};

/// What [`switch_when_caught_up`] waits for and does.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Switch {
    /// The new version's projection name.
    pub to: String,
    /// The SQL that moves readers over, run in one transaction (for example
    /// `DROP VIEW orders; CREATE VIEW orders AS SELECT * FROM orders_v2`:
    /// `CREATE OR REPLACE VIEW` fails when the columns changed).
    pub sql: String,
    /// The topics whose lag counts; empty (the default): those the new
    /// version's runners registered.
    pub topics: Vec<String>,
    /// The most messages, over all partitions, the new version may be
    /// behind and still count as caught up (default 100).
    pub max_lag: i64,
    /// How long the lag must stay at or below `max_lag` (default 2 s).
    pub window: Duration,
    /// How often the lag is sampled (default 200 ms).
    pub poll: Duration,
    /// Give up, switching nothing, after this long (default 5 minutes).
    pub timeout: Duration,
    /// Switch even though the new version has dead letters (default: refuse).
    pub allow_dead_letters: bool,
    /// Retire the old version in the switch's transaction.
    pub retire: Option<Retire>,
}

impl Switch {
    /// Switches readers to projection `to` by running `sql`, with the
    /// defaults above.
    pub fn new(to: impl Into<String>, sql: impl Into<String>) -> Self {
        Switch {
            to: to.into(),
            sql: sql.into(),
            topics: Vec::new(),
            max_lag: 100,
            window: Duration::from_secs(2),
            poll: Duration::from_millis(200),
            timeout: Duration::from_secs(300),
            allow_dead_letters: false,
            retire: None,
        }
    }

    /// Sets [`Switch::topics`].
    pub fn topics(mut self, topics: &[String]) -> Self {
        self.topics = topics.to_vec();
        self
    }

    /// Sets [`Switch::max_lag`].
    pub fn max_lag(mut self, messages: i64) -> Self {
        self.max_lag = messages.max(0);
        self
    }

    /// Sets [`Switch::window`].
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Sets [`Switch::timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets [`Switch::allow_dead_letters`].
    pub fn allow_dead_letters(mut self) -> Self {
        self.allow_dead_letters = true;
        self
    }

    /// Sets [`Switch::retire`].
    pub fn retire(mut self, old: Retire) -> Self {
        self.retire = Some(old);
        self
    }
}

/// Which old version to retire, and how its runners ran (the prefixes name
/// its consumer groups and dead letter topic).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Retire {
    /// The old version's projection name.
    pub name: String,
    /// Its runners' configuration (prefixes, Kafka settings).
    pub config: RunnerConfig,
    /// How long to wait for its runners to leave the group before giving up
    /// on deleting the group (default 30 s; the rows are retired anyway).
    pub wait: Duration,
}

impl Retire {
    /// Retires projection `name`, run with `config`.
    pub fn new(name: impl Into<String>, config: RunnerConfig) -> Self {
        Retire {
            name: name.into(),
            config,
            wait: Duration::from_secs(30),
        }
    }

    /// Sets [`Retire::wait`].
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }
}

/// What a retirement removed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetireReport {
    /// The retired projection.
    pub name: String,
    /// Consumer groups deleted.
    pub groups_deleted: Vec<String>,
    /// What could not be removed, with why (retire again to finish).
    pub left: Vec<String>,
    /// Whether the dead letter topic was deleted (false: it did not exist,
    /// or it is in `left`).
    pub dead_letter_topic_deleted: bool,
}

/// What a switch did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SwitchReport {
    /// The new version's status in the last sample before the switch.
    pub status: ProjectionStatus,
    /// The retirement of the old version, when asked for.
    pub retired: Option<RetireReport>,
}

/// Zero-downtime rebuild: waits until the projection [`Switch::to`] (a new
/// version of a read model, built under its own name into its own tables
/// while the current version keeps serving) has stayed caught up with its
/// topics for [`Switch::window`], then runs [`Switch::sql`] in one
/// transaction, so readers move from the old version to the new one
/// atomically, and retires the old version if asked. Refuses
/// ([`Error::Refused`]) while the new version has dead letters (unless
/// allowed) or a partition stopped; fails after [`Switch::timeout`] without
/// switching.
pub async fn switch_when_caught_up(
    pool: &PgPool,
    kafka: &KafkaConfig,
    switch: Switch,
) -> Result<SwitchReport> {
    let to = switch.to.as_str();
    validate_projection_name(to)?;
    if let Some(old) = &switch.retire {
        validate_projection_name(&old.name)?;
        if old.name == to {
            return Err(Error::Config(format!(
                "switching to {to} cannot retire {to} itself"
            )));
        }
    }
    let watermarks = Watermarks::new(kafka)?;
    let started = Instant::now();
    let mut below_since: Option<Instant> = None;
    loop {
        let topics = if switch.topics.is_empty() {
            registered_topics(pool, to).await?
        } else {
            switch.topics.clone()
        };
        let sample = if topics.is_empty() {
            Err(format!("no runner of {to} registered yet"))
        } else {
            match status_with(pool, &watermarks, to, &topics).await {
                Ok(status) => Ok(status),
                Err(e @ (Error::NotMigrated | Error::Retired { .. })) => return Err(e),
                Err(e) => Err(e.to_string()),
            }
        };
        let mut why_not = match &sample {
            Ok(status) => {
                if let Some(p) = status.partitions.iter().find(|p| p.checkpoint_ahead) {
                    return Err(Error::Refused(format!(
                        "projection {to} is stopped on {}[{}] (checkpoint {} beyond the end {}): \
                         replay it before switching to it",
                        p.topic, p.partition, p.position, p.high_watermark
                    )));
                }
                refuse_dead_letters(&switch, status.dead_lettered)?;
                (status.lag() > switch.max_lag).then(|| format!("lag {}", status.lag()))
            }
            Err(why) => Some(why.clone()),
        };
        if why_not.is_none() {
            let since = *below_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= switch.window {
                let status = sample.expect("a sample without a reason not to switch");
                let retired = commit_switch(pool, &switch).await?;
                let retired = match retired {
                    Some((old, generation, instance)) => {
                        Some(retire_in_kafka(old, generation, instance).await)
                    }
                    None => None,
                };
                return Ok(SwitchReport { status, retired });
            }
            why_not = Some(format!(
                "caught up for {:?} of {:?}",
                since.elapsed(),
                switch.window
            ));
        } else {
            below_since = None;
        }
        if started.elapsed() > switch.timeout {
            return Err(Error::Refused(format!(
                "projection {to} did not stay caught up (lag ≤ {}) for {:?} within {:?} \
                 ({}); nothing switched",
                switch.max_lag,
                switch.window,
                switch.timeout,
                why_not.unwrap_or_default()
            )));
        }
        tokio::time::sleep(switch.poll).await;
    }
}

fn refuse_dead_letters(switch: &Switch, dead_lettered: i64) -> Result<()> {
    if dead_lettered > 0 && !switch.allow_dead_letters {
        return Err(Error::Refused(format!(
            "projection {} has {dead_lettered} dead letters: its read model lacks those events. \
             Inspect them with `dlq list`, re-drive or skip them, or allow dead letters to \
             switch anyway; nothing switched",
            switch.to
        )));
    }
    Ok(())
}

/// The switch's transaction: the new version's batches held off, its dead
/// letters counted, the switch statement, the old version's rows retired.
async fn commit_switch<'a>(
    pool: &PgPool,
    switch: &'a Switch,
) -> Result<Option<(&'a Retire, i32, uuid::Uuid)>> {
    let to = switch.to.as_str();
    let mut tx = pool
        .begin()
        .await
        .map_err(Error::db("beginning the switch"))?;
    lock_exclusive(&mut tx, to).await?;
    let dead: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tidings_parked WHERE projection = $1 AND dead_letter",
    )
    .bind(to)
    .fetch_one(&mut *tx)
    .await
    .map_err(Error::db(format!("counting the dead letters of {to}")))?;
    refuse_dead_letters(switch, dead)?;
    sqlx::raw_sql(&switch.sql)
        .execute(&mut *tx)
        .await
        .map_err(Error::db(format!("switching to projection {to}")))?;
    let retired = match &switch.retire {
        Some(old) => {
            let (generation, instance) = retire_rows(&mut tx, &old.name).await?;
            Some((old, generation, instance))
        }
        None => None,
    };
    tx.commit()
        .await
        .map_err(Error::db("committing the switch"))?;
    Ok(retired)
}

/// Retires a projection on its own (after a switch that did not, or to
/// finish one whose group could not be deleted): see the module's
/// guarantees. Idempotent.
pub async fn retire(pool: &PgPool, old: &Retire) -> Result<RetireReport> {
    validate_projection_name(&old.name)?;
    let mut tx = pool
        .begin()
        .await
        .map_err(Error::db(format!("retiring projection {}", old.name)))?;
    let (generation, instance) = retire_rows(&mut tx, &old.name).await?;
    tx.commit()
        .await
        .map_err(Error::db(format!("retiring projection {}", old.name)))?;
    Ok(retire_in_kafka(old, generation, instance).await)
}

/// Fences out and marks the projection retired and deletes its positions,
/// stream rows and parked events. Returns its last generation and its
/// registration's identity (which name its consumer groups).
async fn retire_rows(conn: &mut PgConnection, name: &str) -> Result<(i32, uuid::Uuid)> {
    let db = |what: &str| Error::db(format!("retiring projection {name}: {what}"));
    lock_exclusive(conn, name).await?;
    let row: Option<(i32, uuid::Uuid)> = sqlx::query_as(
        "UPDATE tidings_projections SET generation = generation + 1, \
         retired_at = coalesce(retired_at, now()), updated_at = now() \
         WHERE name = $1 RETURNING generation, instance",
    )
    .bind(name)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("marking it retired"))?;
    let Some(row) = row else {
        return Err(Error::Config(format!(
            "no projection named {name} in this database"
        )));
    };
    forget_positions(conn, name).await?;
    Ok(row)
}

/// Deletes the retired projection's consumer groups (every generation's),
/// waiting up to [`Retire::wait`] for its runners to leave, then its dead
/// letter topic. Never fails: what is left is reported.
async fn retire_in_kafka(old: &Retire, generation: i32, instance: uuid::Uuid) -> RetireReport {
    let mut report = RetireReport {
        name: old.name.clone(),
        groups_deleted: Vec::new(),
        left: Vec::new(),
        dead_letter_topic_deleted: false,
    };
    let admin: AdminClient<DefaultClientContext> =
        match old.config.kafka.client_config().and_then(|c| {
            c.create().map_err(|source| Error::Kafka {
                context: "creating a Kafka admin client".into(),
                source,
            })
        }) {
            Ok(admin) => admin,
            Err(e) => {
                report
                    .left
                    .push(format!("consumer groups and dead letter topic: {e}"));
                return report;
            }
        };
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let mut pending: Vec<String> = (1..=generation)
        .map(|g| group_id(&old.config, &old.name, g, instance))
        .collect();
    let deadline = Instant::now() + old.wait;
    loop {
        let names: Vec<&str> = pending.iter().map(String::as_str).collect();
        let mut retry = Vec::new();
        match admin.delete_groups(&names, &options).await {
            Ok(results) => {
                for result in results {
                    match result {
                        Ok(group) => report.groups_deleted.push(group),
                        Err((_, RDKafkaErrorCode::GroupIdNotFound)) => {}
                        Err((group, code)) => retry.push((group, code.to_string())),
                    }
                }
            }
            Err(e) => retry.extend(pending.iter().map(|g| (g.clone(), e.to_string()))),
        }
        if retry.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            report.left.extend(
                retry
                    .into_iter()
                    .map(|(group, why)| format!("consumer group {group}: {why}")),
            );
            break;
        }
        pending = retry.into_iter().map(|(group, _)| group).collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let dlq = dead_letter_topic(&old.config, &old.name);
    match admin.delete_topics(&[dlq.as_str()], &options).await {
        Ok(results) => match results.into_iter().next() {
            Some(Ok(_)) => report.dead_letter_topic_deleted = true,
            Some(Err((_, RDKafkaErrorCode::UnknownTopicOrPartition))) | None => {}
            Some(Err((topic, code))) => report.left.push(format!("topic {topic}: {code}")),
        },
        Err(e) => report.left.push(format!("topic {dlq}: {e}")),
    }
    if !report.left.is_empty() {
        tracing::warn!(projection = old.name, left = ?report.left, "projection retired; not everything in Kafka could be removed");
    }
    report
}
