//! Validation of names that come from configuration or code: topic names
//! follow Kafka's rules, and a bad one is refused with the rule it breaks.

use crate::error::{Error, Result};

/// Checks a topic name against Kafka's rules, with a message saying which
/// rule it breaks.
pub fn validate_topic_name(topic: &str) -> Result<()> {
    let problem = if topic.is_empty() {
        Some("it is empty")
    } else if topic.len() > 249 {
        Some("it is longer than 249 characters")
    } else if topic == "." || topic == ".." {
        Some("`.` and `..` are reserved")
    } else if !topic
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        Some("only ASCII letters, digits, `.`, `_` and `-` are allowed")
    } else {
        None
    };
    match problem {
        Some(why) => Err(Error::Config(format!(
            "invalid topic name `{topic}`: {why}"
        ))),
        None => Ok(()),
    }
}
