//! How a relay runs, and what it counts while it runs.
//!
//! Every setting has a default that keeps the guarantees; the ones that
//! bound waits ([`RelayConfig::delivery_timeout`], [`RelayConfig::db_timeout`],
//! [`RelayConfig::stall_timeout`], [`RelayConfig::shutdown_timeout`]) are
//! clamped so that none can turn into "forever".

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use crate::kafka::{KafkaConfig, TopicSpec};

/// How a relay runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayConfig {
    /// The brokers and any librdkafka property.
    pub kafka: KafkaConfig,
    /// Rows per batch (default 5000).
    pub batch_size: i64,
    /// Batches handed to the producer and not yet acknowledged, at most
    /// (default 4). Memory grows with `batch_size × pipeline_depth`.
    pub pipeline_depth: usize,
    /// Fallback poll when no notification arrives (default 1 s).
    pub poll_interval: Duration,
    /// How long a batch may wait for its acknowledgements before the relay
    /// purges the producer and retries from its first unacknowledged row
    /// (default 30 s, at least 100 ms). librdkafka's own message timeout is
    /// off: it could reorder.
    pub delivery_timeout: Duration,
    /// How often lanes are rebalanced between relays (default 1 s).
    pub rebalance_interval: Duration,
    /// The longest backoff after errors (default 30 s).
    pub max_backoff: Duration,
    /// Create missing topics with this spec; `None` leaves topics alone.
    pub create_topics: Option<TopicSpec>,
    /// The deadline of every database call (default 10 s).
    pub db_timeout: Duration,
    /// A relay that owns lanes and has made no progress for this long while
    /// failing gives its lanes up to other relays and waits as long before
    /// taking any again (default 60 s).
    pub stall_timeout: Duration,
    /// How long shutdown may take to settle what is in flight (default 10 s).
    pub shutdown_timeout: Duration,
}

impl RelayConfig {
    /// Defaults for the given Kafka settings.
    pub fn new(kafka: KafkaConfig) -> Self {
        RelayConfig {
            kafka,
            batch_size: 5000,
            pipeline_depth: 4,
            poll_interval: Duration::from_secs(1),
            delivery_timeout: Duration::from_secs(30),
            rebalance_interval: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            create_topics: Some(TopicSpec::default()),
            db_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(10),
        }
    }

    /// Sets [`RelayConfig::batch_size`].
    pub fn batch_size(mut self, rows: i64) -> Self {
        self.batch_size = rows.max(1);
        self
    }

    /// Sets [`RelayConfig::pipeline_depth`] (at least 1).
    pub fn pipeline_depth(mut self, batches: usize) -> Self {
        self.pipeline_depth = batches.max(1);
        self
    }

    /// Sets [`RelayConfig::delivery_timeout`] (at least 100 ms).
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout.max(Duration::from_millis(100));
        self
    }

    /// Sets [`RelayConfig::poll_interval`].
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Sets [`RelayConfig::create_topics`].
    pub fn create_topics(mut self, spec: Option<TopicSpec>) -> Self {
        self.create_topics = spec;
        self
    }

    /// Sets [`RelayConfig::db_timeout`] (at least 100 ms).
    pub fn db_timeout(mut self, timeout: Duration) -> Self {
        self.db_timeout = timeout.max(Duration::from_millis(100));
        self
    }

    /// Sets [`RelayConfig::stall_timeout`].
    pub fn stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = timeout;
        self
    }

    /// Sets [`RelayConfig::shutdown_timeout`].
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Sets [`RelayConfig::max_backoff`].
    pub fn max_backoff(mut self, backoff: Duration) -> Self {
        self.max_backoff = backoff;
        self
    }
}

/// Counters of a running relay, readable while it runs.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Rows acknowledged by the broker and deleted.
    pub published: AtomicU64,
    /// Deliveries that failed (and were kept for retry); rows merely held
    /// behind a failed row are not counted.
    pub failed: AtomicU64,
    /// Rows refused for good and set aside as dead rows.
    pub dead: AtomicU64,
    /// Batches handled.
    pub batches: AtomicU64,
    /// Errors of the database or the broker that made the relay back off.
    pub errors: AtomicU64,
    /// Times the relay purged its producer after the delivery timeout.
    pub purges: AtomicU64,
    /// Times the relay gave its lanes up after making no progress.
    pub stalls: AtomicU64,
    /// Lanes owned now.
    pub lanes: AtomicU64,
    /// Rows read in batches (with `batches`, the mean batch size).
    pub batch_rows: AtomicU64,
    /// Microseconds from reading batches to deleting them (with `batches`,
    /// the mean batch latency).
    pub batch_micros: AtomicU64,
    /// False while the relay is failing or has given its lanes up.
    pub healthy: AtomicBool,
}
