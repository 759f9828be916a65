//! Creating missing topics with the partitions and retention tidings needs.

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::error::{Error, Result};
use crate::kafka::KafkaConfig;
use crate::names::validate_topic_name;

/// How topics are created when missing.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TopicSpec {
    /// Partitions of a new topic (default 6).
    pub partitions: i32,
    /// Replication factor of a new topic (default: the broker's default).
    pub replication: Option<i32>,
    /// Topic configs; by default unlimited retention (`retention.ms=-1`,
    /// `retention.bytes=-1`): replays need the whole history.
    pub configs: Vec<(String, String)>,
}

impl Default for TopicSpec {
    fn default() -> Self {
        TopicSpec {
            partitions: 6,
            replication: None,
            configs: vec![
                ("retention.ms".into(), "-1".into()),
                ("retention.bytes".into(), "-1".into()),
            ],
        }
    }
}

/// Creates the topics that do not exist yet. Topics that already exist are
/// left as they are.
pub async fn ensure_topics(
    kafka: &KafkaConfig,
    topics: &BTreeSet<String>,
    spec: &TopicSpec,
) -> Result<()> {
    for topic in topics {
        validate_topic_name(topic)?;
    }
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> =
        kafka
            .client_config()?
            .create()
            .map_err(|source| Error::Kafka {
                context: "creating a Kafka admin client".into(),
                source,
            })?;
    let replication = spec.replication.unwrap_or(-1);
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|name| {
            spec.configs.iter().fold(
                NewTopic::new(name, spec.partitions, TopicReplication::Fixed(replication)),
                |topic, (k, v)| topic.set(k, v),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|source| Error::Kafka {
            context: format!("creating topics {topics:?}"),
            source,
        })?;
    for result in results {
        match result {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(Error::Kafka {
                    context: format!("creating topic `{topic}`"),
                    source: rdkafka::error::KafkaError::AdminOp(code),
                });
            }
        }
    }
    Ok(())
}
