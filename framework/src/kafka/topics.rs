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
/// left as they are. Fails on the first topic that is neither there nor
/// creatable; [`ensure_topics_each`] reports each topic on its own.
pub async fn ensure_topics(
    kafka: &KafkaConfig,
    topics: &BTreeSet<String>,
    spec: &TopicSpec,
) -> Result<()> {
    for (_, outcome) in ensure_topics_each(kafka, topics, spec).await {
        outcome?;
    }
    Ok(())
}

/// Makes sure each topic exists: describes them first (metadata) and asks
/// to create only those the cluster does not know, so that a principal
/// without CREATE permission never fails on topics that exist. Each topic's
/// outcome is its own; an authorisation error names the permission missing.
pub async fn ensure_topics_each(
    kafka: &KafkaConfig,
    topics: &BTreeSet<String>,
    spec: &TopicSpec,
) -> Vec<(String, Result<()>)> {
    let mut outcomes = Vec::with_capacity(topics.len());
    let mut candidates = BTreeSet::new();
    for topic in topics {
        match validate_topic_name(topic) {
            Ok(()) => {
                candidates.insert(topic.clone());
            }
            Err(e) => outcomes.push((topic.clone(), Err(e))),
        }
    }
    if candidates.is_empty() {
        return outcomes;
    }
    let admin: AdminClient<DefaultClientContext> = match kafka.client_config().and_then(|c| {
        c.create().map_err(|source| Error::Kafka {
            context: "creating a Kafka admin client".into(),
            source,
        })
    }) {
        Ok(admin) => admin,
        Err(e) => {
            let why = e.to_string();
            outcomes.extend(candidates.into_iter().map(|t| {
                let error = Error::Config(format!("topic `{t}`: {why}"));
                (t, Err(error))
            }));
            return outcomes;
        }
    };
    // Describe: which of the topics the cluster has already. All topics in
    // one request: a request naming a missing topic could make a broker
    // with auto-creation on create it with its defaults, not the spec.
    let admin = std::sync::Arc::new(admin);
    let existing: BTreeSet<String> = {
        let admin = std::sync::Arc::clone(&admin);
        tokio::task::spawn_blocking(move || {
            admin
                .inner()
                .fetch_metadata(None, Duration::from_secs(10))
                .map(|m| {
                    m.topics()
                        .iter()
                        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                        .map(|t| t.name().to_owned())
                        .collect()
                })
                .unwrap_or_default()
        })
        .await
        .unwrap_or_default()
    };
    let existing: BTreeSet<String> = existing.intersection(&candidates).cloned().collect();
    let missing: Vec<&String> = candidates
        .iter()
        .filter(|t| !existing.contains(*t))
        .collect();
    outcomes.extend(existing.iter().map(|t| (t.clone(), Ok(()))));
    if missing.is_empty() {
        return outcomes;
    }
    if let Some(creator) = &kafka.embedded {
        // An embedded broker has no admin API: the cluster creates them.
        for topic in missing {
            let creator = creator.clone();
            let (name, partitions) = (topic.clone(), spec.partitions);
            let outcome = tokio::task::spawn_blocking(move || creator.create(&name, partitions))
                .await
                .unwrap_or_else(|e| Err(Error::Config(format!("creating topic `{topic}`: {e}"))));
            outcomes.push((topic.clone(), outcome));
        }
        return outcomes;
    }
    let replication = spec.replication.unwrap_or(-1);
    let new_topics: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|name| {
            spec.configs.iter().fold(
                NewTopic::new(name, spec.partitions, TopicReplication::Fixed(replication)),
                |topic, (k, v)| topic.set(k, v),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = match tokio::time::timeout(
        Duration::from_secs(40),
        admin.create_topics(&new_topics, &options),
    )
    .await
    {
        Ok(Ok(results)) => results,
        Ok(Err(source)) => {
            let why = source.to_string();
            outcomes.extend(missing.into_iter().map(|t| {
                let error = Error::Kafka {
                    context: format!("creating topic `{t}`"),
                    source: rdkafka::error::KafkaError::AdminOpCreation(why.clone()),
                };
                (t.clone(), Err(error))
            }));
            return outcomes;
        }
        Err(_) => {
            outcomes.extend(missing.into_iter().map(|t| {
                let error = Error::Timeout {
                    context: format!("creating topic `{t}`"),
                    after: Duration::from_secs(40),
                };
                (t.clone(), Err(error))
            }));
            return outcomes;
        }
    };
    for result in results {
        match result {
            Ok(topic) | Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                outcomes.push((topic, Ok(())));
            }
            Err((topic, code @ RDKafkaErrorCode::TopicAuthorizationFailed))
            | Err((topic, code @ RDKafkaErrorCode::ClusterAuthorizationFailed)) => {
                let error = Error::Kafka {
                    context: format!(
                        "topic `{topic}` does not exist and cannot be created: the principal \
                         needs the CREATE permission on the topic or the cluster (or create the \
                         topic beforehand and turn topic creation off)"
                    ),
                    source: rdkafka::error::KafkaError::AdminOp(code),
                };
                outcomes.push((topic, Err(error)));
            }
            Err((topic, code)) => {
                let error = Error::Kafka {
                    context: format!("creating topic `{topic}`"),
                    source: rdkafka::error::KafkaError::AdminOp(code),
                };
                outcomes.push((topic, Err(error)));
            }
        }
    }
    outcomes
}
