//! Kafka connection settings and topic administration.
//!
//! [`KafkaConfig`] holds the broker list and any librdkafka property passed
//! through as it is (TLS, SASL, tuning). Values of properties that hold
//! secrets never appear in `Debug` output or logs.

mod embedded;
mod topics;

use std::collections::BTreeMap;
use std::fmt;

use rdkafka::ClientConfig;

use crate::error::{Error, Result};

pub use crate::names::validate_topic_name;
pub use embedded::EmbeddedKafka;
pub use topics::{TopicSpec, ensure_topics, ensure_topics_each};

/// Broker list plus pass-through librdkafka properties.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// `bootstrap.servers`: comma-separated `host:port` list.
    pub brokers: String,
    /// Any librdkafka property, passed through as it is (e.g.
    /// `security.protocol`, `sasl.mechanism`, `sasl.password`, `ssl.ca.location`).
    pub properties: BTreeMap<String, String>,
    /// Set for an [`EmbeddedKafka`]: creates topics on it.
    pub(crate) embedded: Option<embedded::TopicCreator>,
}

/// Whether a librdkafka property holds a secret that must not be shown.
pub fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "jaas",
        "token",
        "ssl.key.pem",
        "ssl_key",
        "ssl.keystore",
        "credential",
    ]
    .iter()
    .any(|needle| key.contains(needle))
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    if is_secret_property(k) {
                        "<redacted>"
                    } else {
                        v.as_str()
                    },
                )
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("properties", &properties)
            .field("embedded", &self.embedded.is_some())
            .finish()
    }
}

impl KafkaConfig {
    /// Settings for the given broker list.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            properties: BTreeMap::new(),
            embedded: None,
        }
    }

    /// Adds one librdkafka property.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// Parses `key=value` pass-through properties (as given on the command line).
    pub fn with_properties<'a>(mut self, pairs: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        for pair in pairs {
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                Error::Config(format!(
                    "kafka property `{pair}` is not of the form key=value"
                ))
            })?;
            let key = key.trim();
            if key.is_empty() {
                return Err(Error::Config(format!(
                    "kafka property `{pair}` has an empty key"
                )));
            }
            self.properties.insert(key.to_owned(), value.to_owned());
        }
        Ok(self)
    }

    /// A librdkafka client configuration: the brokers, then the pass-through
    /// properties. Fails when no broker is configured.
    pub fn client_config(&self) -> Result<ClientConfig> {
        if self.brokers.trim().is_empty() {
            return Err(Error::Config(
                "no Kafka brokers: set KAFKA_BROKERS or pass --brokers".into(),
            ));
        }
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        Ok(config)
    }
}
