//! The runner: one consumer in the projection's group, one task per partition.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::kafka::{KafkaConfig, TopicSpec, ensure_topics};
use crate::projection::apply::{Failure, Mode, apply_messages};
use crate::projection::dead_letters::Sender;
use crate::projection::plan::Message;
use crate::projection::{Projection, status, validate_projection_name};

/// How a projection runner runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunnerConfig {
    /// The brokers and any librdkafka property.
    pub kafka: KafkaConfig,
    /// Prepended to the projection's topics and to its dead letter topic.
    pub topic_prefix: String,
    /// Prepended to the consumer group id
    /// (`<prefix>.<topic prefix><projection>.<registration>.g<generation>`).
    pub group_prefix: String,
    /// The most events applied in one transaction (default 500). Each
    /// partition's worker queues up to four batches' messages (so a runner
    /// holds up to four times this many messages per partition, plus what
    /// the consumer fetched ahead); a partition whose queue is full is
    /// paused at the consumer while messages wait for room in it.
    pub batch_size: usize,
    /// How long, at most, a partition's batch waits for more messages while
    /// it is short of [`batch_size`](Self::batch_size) (default 1 ms, from
    /// the moment nothing is queued; never restarted, so it adds at most
    /// this much to an event's latency). Fuller batches cost fewer
    /// transactions per event under load; zero applies whatever is queued
    /// at once.
    pub batch_linger: Duration,
    /// The longest backoff between retries of a transient error (default 30 s).
    pub max_backoff: Duration,
    /// How often the runner checks whether a replay started a new generation
    /// (default 1 s).
    pub generation_check: Duration,
    /// How missing topics (read, and the dead letter topic) are created.
    pub dead_letter_topic_spec: TopicSpec,
    /// The longest a batch may take, database calls included (default
    /// 60 s): a batch past it is abandoned (rolled back) and retried, so a
    /// database that went silent never hangs a partition or shutdown.
    pub batch_timeout: Duration,
    /// How long consumer errors may go on before the runner reports itself
    /// unhealthy (default 30 s).
    pub unhealthy_after: Duration,
    /// Create missing topics at start (default true). Off where topics
    /// are managed elsewhere; with it on, only missing topics are asked for,
    /// so a principal without CREATE works when the topics exist.
    pub create_topics: bool,
    /// Messages larger than this are dead-lettered unread (default 1 MiB).
    pub max_message_bytes: usize,
    /// How long the group waits for a silent member before moving its
    /// partitions (librdkafka `session.timeout.ms`; default 8 s, where
    /// Kafka's default is 45 s). Shorter moves the partitions of a crashed
    /// runner sooner; too short for the network or for pauses of the process
    /// makes healthy members drop out and the group rebalance needlessly.
    pub session_timeout: Duration,
    /// Static membership (`group.instance.id`): a runner restarted with
    /// the same id within the session timeout gets its partitions back with
    /// no rebalance at all. Each running instance needs its own id.
    pub group_instance_id: Option<String>,
    /// Events of a type the projection does not know (default: skipped,
    /// counted; see [`super::UnknownTypes`]).
    pub unknown_types: super::UnknownTypes,
    /// Versions newer than the projection knows (default: parked; see
    /// [`super::NewerVersions`]).
    pub newer_versions: super::NewerVersions,
}

impl RunnerConfig {
    /// Defaults for the given Kafka settings.
    pub fn new(kafka: KafkaConfig) -> Self {
        RunnerConfig {
            kafka,
            topic_prefix: String::new(),
            group_prefix: "tidings".into(),
            batch_size: 500,
            batch_linger: Duration::from_millis(1),
            max_backoff: Duration::from_secs(30),
            generation_check: Duration::from_secs(1),
            dead_letter_topic_spec: TopicSpec::default(),
            create_topics: true,
            unknown_types: super::UnknownTypes::default(),
            newer_versions: super::NewerVersions::default(),
            batch_timeout: Duration::from_secs(60),
            unhealthy_after: Duration::from_secs(30),
            max_message_bytes: 1 << 20,
            session_timeout: Duration::from_secs(8),
            group_instance_id: None,
        }
    }

    /// Sets [`RunnerConfig::session_timeout`] (at least 1 s).
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout.max(Duration::from_secs(1));
        self
    }

    /// Sets [`RunnerConfig::group_instance_id`] (static membership).
    pub fn group_instance_id(mut self, id: impl Into<String>) -> Self {
        self.group_instance_id = Some(id.into());
        self
    }

    /// Sets [`RunnerConfig::batch_timeout`].
    pub fn batch_timeout(mut self, timeout: Duration) -> Self {
        self.batch_timeout = timeout;
        self
    }

    /// Sets [`RunnerConfig::unhealthy_after`].
    pub fn unhealthy_after(mut self, allowance: Duration) -> Self {
        self.unhealthy_after = allowance;
        self
    }

    /// Sets [`RunnerConfig::unknown_types`].
    pub fn unknown_types(mut self, policy: super::UnknownTypes) -> Self {
        self.unknown_types = policy;
        self
    }

    /// Sets [`RunnerConfig::newer_versions`].
    pub fn newer_versions(mut self, policy: super::NewerVersions) -> Self {
        self.newer_versions = policy;
        self
    }

    /// Sets [`RunnerConfig::create_topics`].
    pub fn create_topics(mut self, create: bool) -> Self {
        self.create_topics = create;
        self
    }

    /// Sets [`RunnerConfig::topic_prefix`].
    pub fn topic_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.topic_prefix = prefix.into();
        self
    }

    /// Sets [`RunnerConfig::batch_size`].
    pub fn batch_size(mut self, size: usize) -> Self {
        self.batch_size = size.max(1);
        self
    }

    /// Sets [`RunnerConfig::batch_linger`].
    pub fn batch_linger(mut self, linger: Duration) -> Self {
        self.batch_linger = linger;
        self
    }

    /// Sets [`RunnerConfig::max_message_bytes`].
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// Sets [`RunnerConfig::max_backoff`].
    pub fn max_backoff(mut self, backoff: Duration) -> Self {
        self.max_backoff = backoff;
        self
    }
}

/// The dead letter topic of projection `name`: `<topic prefix><name>.dlq`.
pub(crate) fn dead_letter_topic(config: &RunnerConfig, name: &str) -> String {
    format!("{}{name}.dlq", config.topic_prefix)
}

/// The consumer group of projection `name`'s generation: the group prefix,
/// the topic prefix, the name, the identity of its registration in this
/// database, the generation.
pub(crate) fn group_id(
    config: &RunnerConfig,
    name: &str,
    generation: i32,
    instance: uuid::Uuid,
) -> String {
    format!(
        "{}.{}{name}.{}.g{generation}",
        config.group_prefix,
        config.topic_prefix,
        instance.simple()
    )
}

/// Counters of a running projection.
#[derive(Debug)]
pub struct RunnerStats {
    /// False while the consumer keeps failing (errors for longer than
    /// [`RunnerConfig::unhealthy_after`], or a permanent error such as a
    /// refused authorization): `/ready` answers 503 then.
    pub healthy: std::sync::atomic::AtomicBool,
    /// Events applied to the read model.
    pub applied: AtomicU64,
    /// Messages skipped as already applied (redelivered or republished).
    pub skipped: AtomicU64,
    /// Events skipped unread: of a type the projection does not know, or
    /// (if so configured) of a newer version ([`RunnerConfig::unknown_types`]).
    pub ignored: AtomicU64,
    /// Events parked behind a dead-lettered event of their stream.
    pub parked: AtomicU64,
    /// Events sent to the dead letter topic.
    pub dead_lettered: AtomicU64,
    /// Batches retried after a transient error.
    pub retries: AtomicU64,
    /// Batches committed.
    pub batches: AtomicU64,
    /// Partitions this runner owns now.
    pub assigned: AtomicU64,
    /// Partitions taken from this runner by rebalances (with cooperative
    /// rebalancing, only those that move to another member).
    pub revoked: AtomicU64,
    /// Partitions stopped because their checkpoint is beyond the end of the
    /// partition (a recreated topic, reset offsets): nothing is read there
    /// until the projection is replayed or its checkpoint set.
    pub stopped_partitions: AtomicU64,
    /// Dead letters copied to the dead letter topic (after their batch
    /// committed).
    pub dead_letters_sent: AtomicU64,
    /// Dead letters the dead letter topic refused for good (too large, not
    /// authorized): they stay in `tidings_parked` with the error.
    pub dead_letter_failures: AtomicU64,
}

impl Default for RunnerStats {
    fn default() -> Self {
        RunnerStats {
            healthy: std::sync::atomic::AtomicBool::new(true),
            applied: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            ignored: AtomicU64::new(0),
            parked: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            assigned: AtomicU64::new(0),
            revoked: AtomicU64::new(0),
            stopped_partitions: AtomicU64::new(0),
            dead_letters_sent: AtomicU64::new(0),
            dead_letter_failures: AtomicU64::new(0),
        }
    }
}

/// Runs a [`Projection`] in its consumer group until shutdown.
pub struct Runner<P> {
    pool: PgPool,
    projection: Arc<P>,
    config: RunnerConfig,
    stats: Arc<RunnerStats>,
}

impl<P> std::fmt::Debug for Runner<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

enum Change {
    Assigned(Vec<(String, i32)>),
    Revoked(Vec<(String, i32)>),
}

struct RunnerContext {
    changes: mpsc::UnboundedSender<Change>,
}

fn partitions(list: &TopicPartitionList) -> Vec<(String, i32)> {
    list.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl ClientContext for RunnerContext {}

impl ConsumerContext for RunnerContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let _ = self.changes.send(Change::Revoked(partitions(list)));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            // Nothing is fetched from the group's offset: the runner seeks
            // each partition to its checkpoint in PostgreSQL, then resumes.
            let _ = consumer.pause(list);
            let _ = self.changes.send(Change::Assigned(partitions(list)));
        }
    }
}

type Key = (String, i32);

struct Worker {
    /// Shared with every message queued to the worker.
    topic: Arc<str>,
    partition: i32,
    sender: mpsc::Sender<Message>,
    pending: VecDeque<Message>,
    paused: bool,
    handle: tokio::task::JoinHandle<()>,
}

/// The partition workers, by topic, then partition: a message finds its
/// worker without allocating a key.
#[derive(Default)]
struct Workers(HashMap<Arc<str>, HashMap<i32, Worker>>);

impl Workers {
    fn get_mut(&mut self, topic: &str, partition: i32) -> Option<&mut Worker> {
        self.0.get_mut(topic)?.get_mut(&partition)
    }

    /// The partition's worker, started by `start` (given the topic name to
    /// share) if it has none.
    fn get_or_start(
        &mut self,
        topic: &str,
        partition: i32,
        start: impl FnOnce(Arc<str>) -> Worker,
    ) -> &mut Worker {
        if self.get_mut(topic, partition).is_none() {
            let worker = start(Arc::from(topic));
            self.0
                .entry(Arc::clone(&worker.topic))
                .or_default()
                .insert(partition, worker);
        }
        self.get_mut(topic, partition)
            .expect("the worker was just started")
    }

    /// Drops the partition's worker (its sender): it finishes its batch and stops.
    fn remove(&mut self, topic: &str, partition: i32) {
        if let Some(partitions) = self.0.get_mut(topic) {
            partitions.remove(&partition);
            if partitions.is_empty() {
                self.0.remove(topic);
            }
        }
    }

    /// Moves pending messages on (see [`flush`]) and forgets the workers
    /// that ended.
    fn flush_and_prune(&mut self, consumer: &StreamConsumer<RunnerContext>) {
        for partitions in self.0.values_mut() {
            for worker in partitions.values_mut() {
                flush(consumer, worker);
            }
            partitions.retain(|_, w| !w.handle.is_finished());
        }
        self.0.retain(|_, partitions| !partitions.is_empty());
    }

    fn into_handles(self) -> Vec<tokio::task::JoinHandle<()>> {
        self.0
            .into_values()
            .flat_map(HashMap::into_values)
            .map(|w| w.handle)
            .collect()
    }
}

/// Why the consumer loop ended.
enum End {
    Shutdown,
    NewGeneration,
}

impl<P: Projection> Runner<P> {
    /// A runner for `projection` on `pool` (which must have the tidings migrations).
    pub fn new(pool: PgPool, projection: P, config: RunnerConfig) -> Result<Self> {
        validate_projection_name(projection.name())?;
        if projection.topics().is_empty() {
            return Err(Error::Config(format!(
                "projection {} reads no topic: set #[event(topic = \"...\")] or override Projection::topics",
                projection.name()
            )));
        }
        for topic in projection.topics() {
            crate::names::validate_topic_name(&format!("{}{topic}", config.topic_prefix))?;
        }
        // No broker configured is a usage error now, not a runner that
        // retries connecting to nothing.
        config.kafka.client_config()?;
        Ok(Runner {
            pool,
            projection: Arc::new(projection),
            config,
            stats: Arc::default(),
        })
    }

    /// The runner's counters, shared: they keep counting after `run` starts.
    pub fn stats(&self) -> Arc<RunnerStats> {
        Arc::clone(&self.stats)
    }

    /// The topics read, with the prefix.
    pub fn topics(&self) -> Vec<String> {
        self.projection
            .topics()
            .iter()
            .map(|t| format!("{}{t}", self.config.topic_prefix))
            .collect()
    }

    /// The dead letter topic: `<prefix><projection>.dlq`.
    pub fn dead_letter_topic(&self) -> String {
        dead_letter_topic(&self.config, self.projection.name())
    }

    /// Consumes and applies until `shutdown` completes; then lets every
    /// partition finish its batch in flight and leaves the group. Database
    /// and broker failures are retried with backoff; a replay (new
    /// generation) restarts consumption from the beginning of the topics.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        tokio::pin!(shutdown);
        let name = self.projection.name().to_owned();
        let mut failures = 0u32;
        let mut setup_failing_since: Option<Instant> = None;
        let dlq = self.dead_letter_topic();
        loop {
            let setup = async {
                let registration =
                    status::register(&self.pool, &name, Some(&self.topics())).await?;
                // The topics read are created if missing (as the relay would),
                // so that the subscription sees them at once.
                if self.config.create_topics {
                    let mut topics: BTreeSet<String> = self.topics().into_iter().collect();
                    topics.insert(dlq.clone());
                    ensure_topics(
                        &self.config.kafka,
                        &topics,
                        &self.config.dead_letter_topic_spec,
                    )
                    .await?;
                }
                Ok::<_, Error>(registration)
            };
            let (generation, instance) = match setup.await {
                Ok(registration) => registration,
                Err(error) => {
                    if let Error::Config(_) | Error::Retired { .. } = error {
                        return Err(error);
                    }
                    failures += 1;
                    let since = *setup_failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.config.unhealthy_after {
                        self.stats.healthy.store(false, Ordering::Relaxed);
                    }
                    tracing::warn!(projection = name, %error, "projection: setup failed; retrying");
                    let delay = backoff(failures, self.config.max_backoff);
                    tokio::select! {
                        () = &mut shutdown => return Ok(()),
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            failures = 0;
            if setup_failing_since.take().is_some() {
                self.stats.healthy.store(true, Ordering::Relaxed);
            }
            match self
                .consume(generation, instance, &dlq, &mut shutdown)
                .await?
            {
                End::Shutdown => return Ok(()),
                End::NewGeneration => {
                    tracing::info!(
                        projection = name,
                        "projection: new generation; restarting from the beginning"
                    );
                }
            }
        }
    }

    /// The consumer group: the prefix, the topic prefix, the projection, the
    /// identity of its registration in this database, the generation.
    pub(crate) fn group_id(&self, generation: i32, instance: uuid::Uuid) -> String {
        group_id(&self.config, self.projection.name(), generation, instance)
    }

    async fn consume(
        &self,
        generation: i32,
        instance: uuid::Uuid,
        dlq: &str,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<End> {
        let name = self.projection.name().to_owned();
        let group = self.group_id(generation, instance);
        let (changes_tx, mut changes) = mpsc::unbounded_channel();
        let mut client = self.config.kafka.client_config()?;
        // Cooperative incremental rebalancing: a member joining or leaving
        // moves only the partitions that change owner; the others never stop.
        let properties = &self.config.kafka.properties;
        if !properties.contains_key("partition.assignment.strategy") {
            client.set("partition.assignment.strategy", "cooperative-sticky");
        }
        if !properties.contains_key("session.timeout.ms") {
            client.set(
                "session.timeout.ms",
                self.config.session_timeout.as_millis().to_string(),
            );
        }
        if !properties.contains_key("heartbeat.interval.ms") {
            let heartbeat = (self.config.session_timeout / 3).max(Duration::from_millis(300));
            client.set("heartbeat.interval.ms", heartbeat.as_millis().to_string());
        }
        if let Some(id) = &self.config.group_instance_id {
            client.set("group.instance.id", id);
        }
        client
            .set("group.id", &group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false");
        // Latency over request count: a broker that holds an empty fetch for
        // the whole wait delays the events that arrive meanwhile (500 ms by
        // default; 10 ms keeps end-to-end latency in tens of milliseconds).
        if !self
            .config
            .kafka
            .properties
            .contains_key("fetch.wait.max.ms")
        {
            client.set("fetch.wait.max.ms", "10");
        }
        let consumer: Arc<StreamConsumer<RunnerContext>> = Arc::new(
            client
                .create_with_context(RunnerContext {
                    changes: changes_tx,
                })
                .map_err(|source| Error::Kafka {
                    context: format!("creating the consumer of {name}"),
                    source,
                })?,
        );
        let mut dlq_config = self.config.kafka.client_config()?;
        dlq_config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // Bounded, so that a broker that is away fails a round of
            // copies in seconds (librdkafka's default is 300 s) and the
            // sender retries them; no batch waits for it.
            .set("message.timeout.ms", "10000");
        // The dead letter topic is created with its spec at start (or is
        // managed elsewhere): a copy never creates it with broker defaults.
        if !properties.contains_key("allow.auto.create.topics") {
            dlq_config.set("allow.auto.create.topics", "false");
        }
        let producer: FutureProducer = dlq_config.create().map_err(|source| Error::Kafka {
            context: format!("creating the dead letter producer of {name}"),
            source,
        })?;
        let wake_sender = Arc::new(tokio::sync::Notify::new());
        let sender = tokio::spawn(
            Sender {
                pool: self.pool.clone(),
                producer,
                projection: name.clone(),
                topic: dlq.to_owned(),
                generation,
                stats: Arc::clone(&self.stats),
                max_backoff: self.config.max_backoff,
            }
            .run(Arc::clone(&wake_sender)),
        );
        // Dropped with this scope: the copies in flight are sent again later.
        let _sender = AbortOnDrop(sender);
        let topics = self.topics();
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topic_refs)
            .map_err(|source| Error::Kafka {
                context: format!("subscribing {name} to {topics:?}"),
                source,
            })?;
        tracing::info!(projection = name, group, ?topics, "projection: consuming");

        let (stale_tx, mut stale) = mpsc::unbounded_channel::<()>();
        // Partitions whose worker found the checkpoint behind what it
        // committed: sought to the checkpoint again.
        let (reseek_tx, mut reseek) = mpsc::unbounded_channel::<Key>();
        let mut workers = Workers::default();
        // Assigned partitions not yet sought to their checkpoint (paused).
        let mut unsought: Vec<Key> = Vec::new();
        // The checkpoint each partition was last sought to, until its
        // worker starts: the worker's first batch must not find the
        // checkpoint behind it.
        let mut sought_at: HashMap<Key, i64> = HashMap::new();
        let mut consumer_errors = Throttle::new(Duration::from_secs(10));
        let mut seek_errors = Throttle::new(Duration::from_secs(10));
        // Seeks that failed (the broker away) are tried again at this pace.
        let seek_spacing = Duration::from_millis(500);
        let mut next_seek = Instant::now();
        let mut health = Health::default();
        // Moves paused partitions' pending messages on, often enough that
        // a worker's queue does not run dry meanwhile.
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // The generation is watched by a task of its own: a slow or
        // exhausted pool never stops message intake and rebalance handling.
        let _watcher = AbortOnDrop(tokio::spawn(watch_generation(
            self.pool.clone(),
            name.clone(),
            generation,
            self.config.generation_check,
            stale_tx.clone(),
        )));
        // Four batches per partition: a pause drops what the consumer
        // fetched ahead for the partition (librdkafka fetches it again from
        // the last message delivered when it resumes), so a queue of two
        // batches made a replay fetch much of its topic over again
        // (BENCHMARKS.md, "What limits each figure").
        let capacity = self.config.batch_size.saturating_mul(4).min(1 << 24);
        let end = loop {
            tokio::select! {
                biased;
                () = shutdown.as_mut() => break End::Shutdown,
                Some(()) = stale.recv() => break End::NewGeneration,
                Some(key) = reseek.recv() => {
                    // Paused until sought: nothing fetched past the lost
                    // checkpoint reaches a new worker first.
                    let mut list = TopicPartitionList::new();
                    list.add_partition(&key.0, key.1);
                    let _ = consumer.pause(&list);
                    workers.remove(&key.0, key.1);
                    if !unsought.contains(&key) {
                        unsought.push(key);
                    }
                    seek_to_checkpoints(&self.pool, &name, &consumer, &mut unsought, &mut sought_at, &self.stats, &mut seek_errors).await;
                    next_seek = Instant::now() + seek_spacing;
                }
                Some(change) = changes.recv() => match change {
                    Change::Revoked(list) => {
                        tracing::info!(projection = name, partitions = ?list, "projection: partitions revoked");
                        self.stats.revoked.fetch_add(list.len() as u64, Ordering::Relaxed);
                        let _ = self.stats.assigned.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                            Some(n.saturating_sub(list.len() as u64))
                        });
                        for key in list {
                            // Dropping the sender lets the worker finish its batch and stop.
                            workers.remove(&key.0, key.1);
                            sought_at.remove(&key);
                            unsought.retain(|k| *k != key);
                        }
                    }
                    Change::Assigned(list) => {
                        tracing::info!(projection = name, partitions = ?list, "projection: partitions assigned");
                        self.stats.assigned.fetch_add(list.len() as u64, Ordering::Relaxed);
                        unsought.extend(list);
                        seek_to_checkpoints(&self.pool, &name, &consumer, &mut unsought, &mut sought_at, &self.stats, &mut seek_errors).await;
                        next_seek = Instant::now() + seek_spacing;
                    }
                },
                // Before the messages: with a steady flow `recv` is always
                // ready, and a paused partition's pending messages (and the
                // retried seeks) would wait until the flow stops.
                _ = tick.tick() => {
                    if !unsought.is_empty() && Instant::now() >= next_seek {
                        seek_to_checkpoints(&self.pool, &name, &consumer, &mut unsought, &mut sought_at, &self.stats, &mut seek_errors).await;
                        next_seek = Instant::now() + seek_spacing;
                    }
                    workers.flush_and_prune(&consumer);
                    health.tick(&self.stats);
                }
                received = consumer.recv() => match received {
                    Ok(message) => {
                        health.ok(&self.stats);
                        let (topic, partition) = (message.topic(), message.partition());
                        let worker = workers.get_or_start(topic, partition, |topic| {
                            let (sender, receiver) = mpsc::channel(capacity);
                            let committed = sought_at.remove(&(topic.to_string(), partition));
                            let handle = tokio::spawn(partition_worker(
                                self.pool.clone(),
                                Arc::clone(&self.projection),
                                generation,
                                committed,
                                receiver,
                                Arc::clone(&consumer),
                                Arc::clone(&wake_sender),
                                self.config.clone(),
                                Arc::clone(&self.stats),
                                stale_tx.clone(),
                                reseek_tx.clone(),
                            ));
                            Worker { topic, partition, sender, pending: VecDeque::new(), paused: false, handle }
                        });
                        let headers = message.headers();
                        let owned = Message::new(
                            Arc::clone(&worker.topic),
                            partition,
                            message.offset(),
                            message.key(),
                            message.payload(),
                            (0..headers.map_or(0, |h| h.count())).filter_map(|i| {
                                let header = headers?.get(i);
                                Some((header.key, header.value))
                            }),
                        );
                        worker.pending.push_back(owned);
                        flush(&consumer, worker);
                    }
                    Err(error) => {
                        // An outage yields an error per poll: one line, then
                        // a summary per interval, not a line per retry.
                        let permanent = health.failed(&error, self.config.unhealthy_after, &self.stats);
                        if let Some(suppressed) = consumer_errors.allow() {
                            if permanent {
                                tracing::error!(projection = name, %error, suppressed, "projection: the broker refuses this runner (it is not ready until this is fixed)");
                            } else {
                                tracing::warn!(projection = name, %error, suppressed, "projection: consumer error");
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        };
        // Let every partition finish its batch in flight, then leave the group.
        for handle in workers.into_handles() {
            let _ = handle.await;
        }
        consumer.unsubscribe();
        self.stats.assigned.store(0, Ordering::Relaxed);
        Ok(end)
    }
}

/// Seeks each partition of `unsought` to the checkpoint stored in
/// PostgreSQL (the beginning when there is none) and resumes it: the
/// database, not the group's Kafka offset, decides where reading starts. On
/// a database or broker error the partitions stay paused and are tried
/// again (the caller spaces the tries); warnings go through `warnings`, so
/// an outage writes a line and then a summary per interval, not a line per
/// partition and try.
async fn seek_to_checkpoints(
    pool: &PgPool,
    name: &str,
    consumer: &StreamConsumer<RunnerContext>,
    unsought: &mut Vec<Key>,
    sought_at: &mut HashMap<Key, i64>,
    stats: &RunnerStats,
    warnings: &mut Throttle,
) {
    let checkpoints: Vec<(String, i32, i64)> = match tokio::time::timeout(
        Duration::from_secs(10),
        sqlx::query_as(
            "SELECT topic, partition, next_offset FROM tidings_checkpoints WHERE projection = $1",
        )
        .bind(name)
        .fetch_all(pool),
    )
    .await
    {
        Ok(Ok(rows)) => rows,
        Ok(Err(error)) => {
            if let Some(suppressed) = warnings.allow() {
                tracing::warn!(projection = name, %error, suppressed, "projection: reading checkpoints to seek to; retrying");
            }
            return;
        }
        Err(_) => {
            if let Some(suppressed) = warnings.allow() {
                tracing::warn!(
                    projection = name,
                    suppressed,
                    "projection: reading checkpoints timed out; retrying"
                );
            }
            return;
        }
    };
    let mut sought = TopicPartitionList::new();
    unsought.retain(|(topic, partition)| {
        let next = checkpoints
            .iter()
            .find(|(t, p, _)| t == topic && p == partition)
            .map(|(_, _, next)| *next);
        // A checkpoint past the end of the partition means the topic is not
        // the one the checkpoint was made on (recreated, truncated, offsets
        // reset): reading on would drop every new message below it as
        // already applied. Stop this partition instead, loudly.
        if let Some(next) = next {
            match consumer.fetch_watermarks(topic, *partition, Duration::from_secs(10)) {
                Ok((_, high)) if next > high => {
                    tracing::error!(
                        projection = name,
                        topic,
                        partition,
                        checkpoint = next,
                        high_watermark = high,
                        "projection: the checkpoint is beyond the end of the partition (topic recreated or offsets reset?); \
                         this partition is stopped: replay the projection, or set its checkpoint"
                    );
                    stats.stopped_partitions.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                Ok(_) => {}
                Err(error) => {
                    if let Some(suppressed) = warnings.allow() {
                        tracing::warn!(projection = name, topic, partition, %error, suppressed, "projection: reading the partition's end; retrying");
                    }
                    return true;
                }
            }
        }
        let offset = next.map_or(Offset::Beginning, Offset::Offset);
        match consumer.seek(topic, *partition, offset, Duration::from_secs(10)) {
            Ok(()) => {
                tracing::debug!(projection = name, topic, partition, ?offset, "projection: sought to the checkpoint");
                sought.add_partition(topic, *partition);
                let key = (topic.clone(), *partition);
                match next {
                    Some(next) => sought_at.insert(key, next),
                    None => sought_at.remove(&key),
                };
                false
            }
            Err(error) => {
                if let Some(suppressed) = warnings.allow() {
                    tracing::warn!(projection = name, topic, partition, %error, suppressed, "projection: seeking to the checkpoint; retrying");
                }
                true
            }
        }
    });
    let _ = consumer.resume(&sought);
}

/// Moves pending messages into the worker's queue; pauses the partition at
/// the consumer while messages wait for room, resumes it once none waits.
/// (Resuming only once the queue was half empty measured slower: the
/// worker ran dry while the partition was fetched again.)
fn flush(consumer: &StreamConsumer<RunnerContext>, worker: &mut Worker) {
    while let Some(message) = worker.pending.pop_front() {
        match worker.sender.try_send(message) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(message))
            | Err(mpsc::error::TrySendError::Closed(message)) => {
                worker.pending.push_front(message);
                break;
            }
        }
    }
    // The partition list only when pausing or resuming: building one per
    // message costs librdkafka allocations for nothing.
    let partition = || {
        let mut list = TopicPartitionList::new();
        list.add_partition(&worker.topic, worker.partition);
        list
    };
    if !worker.pending.is_empty() && !worker.paused {
        worker.paused = consumer.pause(&partition()).is_ok();
    } else if worker.pending.is_empty() && worker.paused {
        worker.paused = consumer.resume(&partition()).is_err();
    }
}

/// At most one log line per interval for a repeating condition, with the
/// count of those left out.
#[derive(Debug)]
pub(crate) struct Throttle {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    pub(crate) fn new(interval: Duration) -> Self {
        Throttle {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(left out since the last line)` when a line may be written now.
    pub(crate) fn allow(&mut self) -> Option<u64> {
        if self.last.is_some_and(|t| t.elapsed() < self.interval) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Sends on `stale` when a replay (or a retirement) replaced `generation`.
async fn watch_generation(
    pool: PgPool,
    name: String,
    generation: i32,
    every: Duration,
    stale: mpsc::UnboundedSender<()>,
) {
    let mut errors = Throttle::new(Duration::from_secs(10));
    loop {
        tokio::time::sleep(every).await;
        match tokio::time::timeout(Duration::from_secs(10), status::generation(&pool, &name)).await
        {
            Ok(Ok(Some(g))) if g != generation => {
                let _ = stale.send(());
                return;
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                if let Some(suppressed) = errors.allow() {
                    tracing::warn!(projection = name, %error, suppressed, "projection: reading the generation");
                }
            }
            Err(_) => {
                if let Some(suppressed) = errors.allow() {
                    tracing::warn!(
                        projection = name,
                        suppressed,
                        "projection: reading the generation: no answer within 10 s"
                    );
                }
            }
        }
    }
}

/// Whether the consumer is failing: a streak of errors longer than the
/// allowance, or an error retrying cannot cure, makes the runner unhealthy;
/// 10 s without an error (or a message) makes it healthy again.
#[derive(Default)]
struct Health {
    streak_since: Option<Instant>,
    last_error: Option<Instant>,
}

impl Health {
    const QUIET: Duration = Duration::from_secs(10);

    fn ok(&mut self, stats: &RunnerStats) {
        if self.streak_since.take().is_some() || !stats.healthy.load(Ordering::Relaxed) {
            stats.healthy.store(true, Ordering::Relaxed);
        }
        self.last_error = None;
    }

    /// Records an error; returns whether it is permanent.
    fn failed(
        &mut self,
        error: &rdkafka::error::KafkaError,
        allowance: Duration,
        stats: &RunnerStats,
    ) -> bool {
        use rdkafka::types::RDKafkaErrorCode::*;
        let now = Instant::now();
        if self.last_error.is_none_or(|t| now - t > Self::QUIET) {
            self.streak_since = Some(now);
        }
        self.last_error = Some(now);
        let permanent = matches!(
            error.rdkafka_error_code(),
            Some(
                TopicAuthorizationFailed
                    | GroupAuthorizationFailed
                    | ClusterAuthorizationFailed
                    | SaslAuthenticationFailed
                    | Authentication
            )
        );
        if permanent || self.streak_since.is_some_and(|t| now - t > allowance) {
            stats.healthy.store(false, Ordering::Relaxed);
        }
        permanent
    }

    fn tick(&mut self, stats: &RunnerStats) {
        if self.last_error.is_some_and(|t| t.elapsed() > Self::QUIET) {
            self.ok(stats);
        }
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn backoff(failures: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1 << failures.min(10));
    base.min(max).mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// How long a partition worker keeps its connection while no message comes.
const HOLD_IDLE: Duration = Duration::from_secs(1);

#[allow(clippy::too_many_arguments)]
async fn partition_worker<P: Projection>(
    pool: PgPool,
    projection: Arc<P>,
    generation: i32,
    sought_to: Option<i64>,
    mut receiver: mpsc::Receiver<Message>,
    consumer: Arc<StreamConsumer<RunnerContext>>,
    wake_sender: Arc<tokio::sync::Notify>,
    config: RunnerConfig,
    stats: Arc<RunnerStats>,
    stale: mpsc::UnboundedSender<()>,
    reseek: mpsc::UnboundedSender<Key>,
) {
    let name = projection.name().to_owned();
    // The checkpoint this worker's last batch committed (at first, the one
    // the partition was sought to): the database may not go back from it.
    let mut committed: Option<i64> = sought_to;
    // One connection held across batches: no ping per acquire (the pool
    // tests connections it hands out). Given back when idle for a second,
    // when someone may be waiting for one, and after a failure.
    let mut held: Option<PoolConnection<Postgres>> = None;
    loop {
        let first = match held {
            Some(_) => match tokio::time::timeout(HOLD_IDLE, receiver.recv()).await {
                Ok(first) => first,
                Err(_) => {
                    held = None;
                    receiver.recv().await
                }
            },
            None => receiver.recv().await,
        };
        let Some(first) = first else {
            break;
        };
        let mut batch = Vec::with_capacity(config.batch_size.min(receiver.len() + 1));
        batch.push(first);
        let mut linger_until = None;
        while batch.len() < config.batch_size {
            match receiver.try_recv() {
                Ok(message) => batch.push(message),
                Err(mpsc::error::TryRecvError::Empty) if !config.batch_linger.is_zero() => {
                    let until = *linger_until
                        .get_or_insert_with(|| tokio::time::Instant::now() + config.batch_linger);
                    match tokio::time::timeout_at(until, receiver.recv()).await {
                        Ok(Some(message)) => batch.push(message),
                        _ => break,
                    }
                }
                Err(_) => break,
            }
        }
        let mut poison: HashMap<i64, String> = HashMap::new();
        let mut failures = 0u32;
        // After the projection refused the batch without naming the event,
        // or a second time, the batch is applied again with a savepoint per
        // event: refusals are then set aside in the same pass, so a batch
        // costs a bounded number of passes whatever its number of refusals.
        let mut mode = Mode::default();
        loop {
            for message in &batch {
                let size = message.value().map_or(0, <[u8]>::len);
                if size > config.max_message_bytes {
                    poison.entry(message.offset).or_insert_with(|| {
                        format!(
                            "message of {size} bytes exceeds the limit of {} bytes",
                            config.max_message_bytes
                        )
                    });
                }
            }
            let mut conn = match held.take() {
                Some(conn) => conn,
                None => match pool.acquire().await {
                    Ok(conn) => conn,
                    Err(error) => {
                        failures += 1;
                        stats.retries.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            projection = name,
                            failures,
                            %error,
                            "projection: no database connection for a batch; retrying"
                        );
                        if receiver.is_closed() {
                            return;
                        }
                        tokio::time::sleep(backoff(failures, config.max_backoff)).await;
                        continue;
                    }
                },
            };
            // Every message's own code runs under a guard that turns a
            // panic into that message's poison; this one is the net for
            // anything else, so the worker (and what is queued to it)
            // never dies with the partition still assigned.
            let applying = std::panic::AssertUnwindSafe(apply_messages(
                &mut conn,
                projection.as_ref(),
                generation,
                committed,
                &batch,
                &poison,
                mode,
                (config.unknown_types, config.newer_versions),
            ));
            let applied = tokio::time::timeout(
                config.batch_timeout,
                futures::FutureExt::catch_unwind(applying),
            )
            .await
            .unwrap_or_else(|_| {
                Ok(Err(Failure::Transient(format!(
                    "the batch did not finish within {:?} (abandoned and rolled back)",
                    config.batch_timeout
                ))))
            })
            .unwrap_or_else(|panic| {
                Err(Failure::Transient(format!(
                    "the batch panicked: {}",
                    super::panic_message(&*panic)
                )))
            });
            match &applied {
                // Kept unless someone may be waiting for a connection.
                Ok(_)
                    if pool.num_idle() > 0
                        || pool.size() < pool.options().get_max_connections() =>
                {
                    held = Some(conn);
                }
                Ok(_)
                | Err(
                    Failure::Poison { .. }
                    | Failure::Locate(_)
                    | Failure::Claimed(_)
                    | Failure::Behind { .. },
                ) => drop(conn),
                // Its state is unknown (abandoned mid-statement, say):
                // closed rather than handed back.
                Err(_) => {
                    let conn = conn.detach();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(5),
                            sqlx::Connection::close(conn),
                        )
                        .await;
                    });
                }
            }
            match applied {
                Ok(outcome) => {
                    stats.applied.fetch_add(outcome.applied, Ordering::Relaxed);
                    stats.skipped.fetch_add(outcome.skipped, Ordering::Relaxed);
                    stats.ignored.fetch_add(outcome.ignored, Ordering::Relaxed);
                    stats.parked.fetch_add(outcome.parked, Ordering::Relaxed);
                    stats
                        .dead_lettered
                        .fetch_add(outcome.dead_lettered, Ordering::Relaxed);
                    stats.batches.fetch_add(1, Ordering::Relaxed);
                    if outcome.dead_lettered > 0 {
                        wake_sender.notify_one();
                    }
                    if let Some(next) = outcome.next_offset {
                        committed = Some(next);
                        let mut list = TopicPartitionList::new();
                        let _ = list.add_partition_offset(
                            &batch[0].topic,
                            batch[0].partition,
                            Offset::Offset(next),
                        );
                        // Best effort: the checkpoint in PostgreSQL is the truth.
                        let _ = consumer.store_offsets(&list);
                    }
                    break;
                }
                Err(Failure::Poison { offset, reason }) => {
                    tracing::warn!(
                        projection = name,
                        offset,
                        reason,
                        "projection: dead-lettering a poison event"
                    );
                    // The first refusal naming its event: planned again
                    // without it, still as one batch; a second: one by one.
                    mode.careful = !poison.is_empty();
                    poison.insert(offset, reason);
                }
                Err(Failure::Locate(reason)) => {
                    tracing::warn!(
                        projection = name,
                        topic = &*batch[0].topic,
                        partition = batch[0].partition,
                        reason,
                        "projection: the batch was refused without naming the event; applying it one event at a time"
                    );
                    mode.careful = true;
                }
                // Once at once; a second time in a row is a conflict with
                // another transaction still going on, retried after a backoff.
                Err(Failure::Claimed(reason)) if !mode.read_all => {
                    tracing::debug!(
                        projection = name,
                        reason,
                        "projection: planning the batch again"
                    );
                    mode.read_all = true;
                }
                Err(Failure::Transient(error) | Failure::Claimed(error)) => {
                    failures += 1;
                    stats.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        projection = name,
                        topic = &*batch[0].topic,
                        partition = batch[0].partition,
                        failures,
                        error,
                        "projection: batch failed; retrying"
                    );
                    if receiver.is_closed() {
                        return;
                    }
                    tokio::time::sleep(backoff(failures, config.max_backoff)).await;
                }
                Err(Failure::Stale) => {
                    let _ = stale.send(());
                    return;
                }
                Err(Failure::Behind { checkpoint }) => {
                    tracing::warn!(
                        projection = name,
                        topic = &*batch[0].topic,
                        partition = batch[0].partition,
                        committed,
                        checkpoint,
                        "projection: the checkpoint went back (the database lost its last commits or was restored); reading the partition again from it"
                    );
                    // What is queued here is dropped with this worker; the
                    // consumer seeks the partition to the checkpoint.
                    let _ = reseek.send((batch[0].topic.to_string(), batch[0].partition));
                    return;
                }
            }
        }
    }
}
