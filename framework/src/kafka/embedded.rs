//! An embedded Kafka broker, in process: librdkafka's mock cluster.
//!
//! For the quick start and for integration tests of a service's own
//! projections and relays on a machine with no broker installed. The
//! cluster listens on a loopback port chosen by the system, so the relay,
//! the projection runners and any client of this process (or of another
//! process on the machine, while this one lives) reach it like any broker.
//!
//! # Guarantees
//!
//! - **Topics are created the tidings way.** The mock cluster has no
//!   CreateTopics API; a [`KafkaConfig`] from [`EmbeddedKafka::config`]
//!   makes [`super::ensure_topics`] (and so the relay and the runners)
//!   create missing topics through the cluster itself, with the partitions
//!   of the [`super::TopicSpec`].
//! - **It lives as long as its value.** Dropping [`EmbeddedKafka`] stops
//!   the cluster and its listeners; every message is in memory only.
//!
//! [`EmbeddedKafka`] says where the mock differs from a real broker.

use std::sync::mpsc;
use std::thread::JoinHandle;

use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::types::RDKafkaErrorCode;

use crate::error::{Error, Result};
use crate::kafka::KafkaConfig;

/// What the cluster's thread is asked to do.
enum Request {
    CreateTopic {
        topic: String,
        partitions: i32,
        done: mpsc::Sender<Result<()>>,
    },
    Stop,
}

/// A handle that creates topics on an embedded cluster: what a
/// [`KafkaConfig`] of an [`EmbeddedKafka`] carries.
#[derive(Clone)]
pub(crate) struct TopicCreator(mpsc::Sender<Request>);

impl TopicCreator {
    /// Creates `topic` with `partitions` partitions (a topic that exists
    /// is left as it is).
    pub(crate) fn create(&self, topic: &str, partitions: i32) -> Result<()> {
        let (done, outcome) = mpsc::channel();
        self.0
            .send(Request::CreateTopic {
                topic: topic.to_owned(),
                partitions,
                done,
            })
            .map_err(|_| gone(topic))?;
        outcome.recv().map_err(|_| gone(topic))?
    }
}

fn gone(topic: &str) -> Error {
    Error::Config(format!(
        "creating topic `{topic}`: the embedded Kafka broker has been stopped"
    ))
}

/// An in-process Kafka broker for the quick start and for tests: topics
/// that tidings creates through [`EmbeddedKafka::config`] are created on
/// it, and it stops when dropped.
///
/// # How it differs from a real broker
///
/// librdkafka documents the mock cluster as experimental; tidings' own
/// suite runs against a real broker, and the embedded one only for the
/// quick start and users' tests. Known differences:
///
/// - no admin API: topics are created as said above; topic configs
///   (retention, compaction) are accepted and ignored, nothing is ever
///   deleted or compacted;
/// - consumer groups work (classic protocol, offsets committed), but its
///   rebalances are faster and simpler than a real coordinator's;
///   `group.instance.id` (static membership) is not honoured;
/// - idempotent and transactional producers are accepted, with the
///   sequence checks of a single in-memory log: a broker failure, a leader
///   change or a lost acknowledgement never happens unless injected;
/// - timing: no disk, no network, no replication, so latencies and
///   throughput say nothing about a real cluster.
///
/// ```no_run
/// # async fn demo() -> tidings::Result<()> {
/// use tidings::kafka::EmbeddedKafka;
///
/// let kafka = EmbeddedKafka::start()?;
/// let config = kafka.config(); // for RelayConfig::new, RunnerConfig::new
/// println!("a broker at {}", kafka.brokers());
/// # Ok(()) }
/// ```
pub struct EmbeddedKafka {
    brokers: String,
    requests: mpsc::Sender<Request>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for EmbeddedKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedKafka")
            .field("brokers", &self.brokers)
            .finish()
    }
}

impl EmbeddedKafka {
    /// Starts a one-broker cluster on a free loopback port.
    pub fn start() -> Result<EmbeddedKafka> {
        let (requests, inbox) = mpsc::channel::<Request>();
        let (started, start) = mpsc::channel::<Result<String>>();
        let thread = std::thread::Builder::new()
            .name("tidings-embedded-kafka".into())
            .spawn(move || {
                // The cluster is not Send: it lives and dies on this thread.
                let cluster = match MockCluster::new(1) {
                    Ok(cluster) => cluster,
                    Err(source) => {
                        let _ = started.send(Err(Error::Kafka {
                            context: "starting the embedded Kafka broker".into(),
                            source,
                        }));
                        return;
                    }
                };
                let _ = started.send(Ok(cluster.bootstrap_servers()));
                for request in inbox {
                    match request {
                        Request::CreateTopic {
                            topic,
                            partitions,
                            done,
                        } => {
                            let outcome = match cluster.create_topic(&topic, partitions, 1) {
                                Ok(())
                                | Err(KafkaError::MockCluster(
                                    RDKafkaErrorCode::TopicAlreadyExists,
                                )) => Ok(()),
                                Err(source) => Err(Error::Kafka {
                                    context: format!("creating topic `{topic}`"),
                                    source,
                                }),
                            };
                            let _ = done.send(outcome);
                        }
                        Request::Stop => break,
                    }
                }
            })
            .map_err(|e| Error::Config(format!("starting the embedded Kafka broker: {e}")))?;
        let brokers = start.recv().map_err(|_| {
            Error::Config("starting the embedded Kafka broker: its thread exited".into())
        })??;
        Ok(EmbeddedKafka {
            brokers,
            requests,
            thread: Some(thread),
        })
    }

    /// Its `bootstrap.servers` list (`127.0.0.1:<port>`).
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// Settings for clients of this broker. Topics that tidings creates
    /// through them ([`super::ensure_topics`], the relay, the runners) are
    /// created on this cluster.
    pub fn config(&self) -> KafkaConfig {
        let mut config = KafkaConfig::new(&self.brokers);
        config.embedded = Some(TopicCreator(self.requests.clone()));
        config
    }

    /// Creates `topic` with `partitions` partitions now (a topic that
    /// exists is left as it is).
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        crate::names::validate_topic_name(topic)?;
        TopicCreator(self.requests.clone()).create(topic, partitions)
    }
}

impl Drop for EmbeddedKafka {
    fn drop(&mut self) {
        let _ = self.requests.send(Request::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
