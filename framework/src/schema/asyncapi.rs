//! An AsyncAPI 3.0 document of the topics a service publishes.
//!
//! One channel per topic (its address carries the topic prefix), one
//! `send` operation per channel, and one message per event type at its
//! current version. A message's payload is the envelope tidings publishes,
//! with `event_type` and `event_version` fixed to the message's and the
//! event's JSON Schema as `payload`; its headers are the routing headers the
//! relay sets, and its Kafka binding names the key (the aggregate id, which
//! orders events per stream). Event schemas live under
//! `components.schemas` as `<type>.v<version>`, their nested definitions
//! beside them (qualified by the event's name where two events define one
//! name differently), with every reference rewritten to point there.
//!
//! The document is plain JSON (which is also YAML); the test suite checks
//! it with the AsyncAPI project's own parser.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::catalog::{Catalog, CatalogError};
use crate::envelope::{
    HEADER_AGGREGATE_TYPE, HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_EVENT_VERSION,
};

/// The AsyncAPI version written.
pub const ASYNCAPI_VERSION: &str = "3.0.0";

/// The Kafka bindings version written.
const KAFKA_BINDINGS: &str = "0.5.0";

/// What the document says about the service itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsyncApiInfo {
    /// The service's name (`info.title`).
    pub title: String,
    /// The service's version (`info.version`), not the AsyncAPI version.
    pub version: String,
    /// A description of the service, if any.
    pub description: Option<String>,
    /// Prepended to every topic, as the relay does (`TIDINGS_TOPIC_PREFIX`).
    pub topic_prefix: String,
}

impl AsyncApiInfo {
    /// A service named `title` at `version`, with no topic prefix.
    pub fn new(title: impl Into<String>, version: impl Into<String>) -> Self {
        AsyncApiInfo {
            title: title.into(),
            version: version.into(),
            description: None,
            topic_prefix: String::new(),
        }
    }
}

/// An id usable as a key of `channels` or `operations`
/// (`^[A-Za-z0-9_\-]+$`).
fn id(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// An id usable as a key of `components` (`^[a-zA-Z0-9.\-_]+$`).
fn component_id(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Rewrites every `$ref` to `#/$defs/X` (or `#/definitions/X`) through
/// `names`, and `#` (a recursive type's root) to `root`; drops `$schema`.
fn relocate(value: &mut Value, names: &BTreeMap<String, String>, root: &str) {
    match value {
        Value::Object(map) => {
            map.remove("$schema");
            if let Some(Value::String(reference)) = map.get_mut("$ref") {
                let local = reference
                    .strip_prefix("#/$defs/")
                    .or_else(|| reference.strip_prefix("#/definitions/"));
                if let Some(target) = local.and_then(|name| names.get(name)) {
                    *reference = format!("#/components/schemas/{target}");
                } else if reference == "#" {
                    *reference = format!("#/components/schemas/{root}");
                }
            }
            for child in map.values_mut() {
                relocate(child, names, root);
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|item| relocate(item, names, root)),
        _ => {}
    }
}

/// Places one event's schema (`root`, with its `$defs`) under
/// `components.schemas` as `schema_id`. A definition keeps its own name
/// unless another event already put a different body there; then it, and
/// every definition that refers to it, is qualified by `schema_id`.
fn place(schemas: &mut Map<String, Value>, schema_id: &str, mut root: Value) {
    let defs = root
        .as_object_mut()
        .and_then(|m| m.remove("$defs").or_else(|| m.remove("definitions")));
    let defs: Vec<(String, Value)> = match defs {
        Some(Value::Object(defs)) => defs.into_iter().collect(),
        _ => Vec::new(),
    };
    let mut names: BTreeMap<String, String> = defs
        .iter()
        .map(|(def, _)| (def.clone(), component_id(def)))
        .collect();
    let relocated = |body: &Value, names: &BTreeMap<String, String>| {
        let mut body = body.clone();
        relocate(&mut body, names, schema_id);
        body
    };
    // Qualifying one name changes the bodies that refer to it: repeat
    // until no placed body differs from what is already there.
    loop {
        let mut changed = false;
        for (def, body) in &defs {
            let qualified = component_id(&format!("{schema_id}.{def}"));
            if names[def] != qualified
                && schemas
                    .get(&names[def])
                    .is_some_and(|existing| *existing != relocated(body, &names))
            {
                names.insert(def.clone(), qualified);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    for (def, body) in &defs {
        schemas.insert(names[def].clone(), relocated(body, &names));
    }
    relocate(&mut root, &names, schema_id);
    schemas.insert(schema_id.to_owned(), root);
}

/// The envelope around one event type's payload.
fn envelope(name: &str, version: u32, payload_ref: &str) -> Value {
    json!({
        "type": "object",
        "required": ["event_type", "event_version", "event_id", "timestamp",
                     "aggregate_type", "aggregate_id", "sequence", "payload"],
        "properties": {
            "event_type": {"type": "string", "const": name, "description": "The event's wire name."},
            "event_version": {"type": "integer", "const": version, "description": "The version of the payload's shape."},
            "event_id": {"type": "string", "format": "uuid", "description": "A UUID v7, unique across the store; consumers deduplicate on it or on (aggregate, sequence)."},
            "timestamp": {"type": "string", "format": "date-time", "description": "When the event was recorded (UTC, microsecond precision)."},
            "aggregate_type": {"type": "string", "description": "The aggregate's type name."},
            "aggregate_id": {"type": "string", "description": "The aggregate's id; also the message key."},
            "sequence": {"type": "integer", "minimum": 1, "description": "Position in the aggregate's stream: 1, 2, 3, … without gaps."},
            "correlation_id": {"type": ["string", "null"], "description": "Ties together everything caused by one request."},
            "causation_id": {"type": ["string", "null"], "description": "The id of the message that caused this one."},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Free-form string metadata."},
            "payload": {"$ref": payload_ref}
        }
    })
}

/// The routing headers the relay sets on every event.
fn headers(name: &str, version: u32) -> Value {
    json!({
        "type": "object",
        "required": [HEADER_EVENT_TYPE, HEADER_EVENT_VERSION, HEADER_EVENT_ID, HEADER_AGGREGATE_TYPE],
        "properties": {
            HEADER_EVENT_TYPE: {"type": "string", "const": name},
            HEADER_EVENT_VERSION: {"type": "string", "const": version.to_string(), "description": "Decimal."},
            HEADER_EVENT_ID: {"type": "string", "format": "uuid"},
            HEADER_AGGREGATE_TYPE: {"type": "string"}
        }
    })
}

impl Catalog {
    /// The AsyncAPI 3.0 document of the catalog's topics.
    ///
    /// Fails when two event types share a wire name on one topic, or an
    /// enum has no topic (give it `#[event(topic = "...")]` or add it with
    /// [`Catalog::with_aggregate`]).
    pub fn asyncapi(&self, info: &AsyncApiInfo) -> Result<Value, CatalogError> {
        self.validate()?;
        let untopical: Vec<String> = self
            .enums
            .iter()
            .filter(|e| e.topic.is_none())
            .map(|e| {
                format!(
                    "`{}` has no topic: give it `#[event(topic = \"...\")]` or add it with `Catalog::with_aggregate`",
                    e.rust_name
                )
            })
            .collect();
        if !untopical.is_empty() {
            return Err(CatalogError(untopical));
        }

        // A message id is the wire name, unless two topics carry that name.
        let mut topics_of_name: BTreeMap<&str, usize> = BTreeMap::new();
        for entry in &self.enums {
            for t in entry.types {
                *topics_of_name.entry(t.name).or_default() += 1;
            }
        }

        let mut schemas = Map::new();
        let mut messages = Map::new();
        let mut channels: BTreeMap<String, (String, Map<String, Value>)> = BTreeMap::new();
        for entry in &self.enums {
            let topic = entry.topic.as_deref().unwrap_or_default();
            for t in entry.types {
                let Some(schema) = entry
                    .schemas
                    .iter()
                    .find(|s| s.event_type == t.name && s.version == t.version)
                else {
                    continue;
                };
                // Names on several topics are qualified by the topic.
                let shared = topics_of_name[t.name] > 1;
                let qualified = format!("{}.v{}", t.name, t.version);
                let schema_id = if shared {
                    component_id(&format!("{topic}.{qualified}"))
                } else {
                    component_id(&qualified)
                };
                let root = schema.schema.as_value().clone();
                let description = root
                    .get("description")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                place(&mut schemas, &schema_id, root);

                let message_id = if shared {
                    component_id(&format!("{topic}.{}", t.name))
                } else {
                    component_id(t.name)
                };
                let mut message = json!({
                    "name": t.name,
                    "title": format!("{} v{}", t.name, t.version),
                    "contentType": "application/json",
                    "headers": headers(t.name, t.version),
                    "payload": envelope(t.name, t.version, &format!("#/components/schemas/{schema_id}")),
                    "correlationId": {
                        "description": "Ties together everything caused by one request.",
                        "location": "$message.payload#/correlation_id"
                    },
                    "bindings": {
                        "kafka": {
                            "key": {"type": "string", "description": "The aggregate id: events of one aggregate share a partition, in order."},
                            "bindingVersion": KAFKA_BINDINGS
                        }
                    }
                });
                if let Some(description) = description {
                    message["summary"] =
                        Value::String(description.lines().next().unwrap_or_default().to_owned());
                    message["description"] = Value::String(description);
                }
                messages.insert(message_id.clone(), message);
                channels
                    .entry(topic.to_owned())
                    .or_insert_with(|| (id(topic), Map::new()))
                    .1
                    .insert(
                        message_id.clone(),
                        json!({"$ref": format!("#/components/messages/{message_id}")}),
                    );
            }
        }

        let mut channel_docs = Map::new();
        let mut operations = Map::new();
        for (topic, (channel_id, channel_messages)) in channels {
            let address = format!("{}{topic}", info.topic_prefix);
            let operation_messages: Vec<Value> = channel_messages
                .keys()
                .map(|m| json!({"$ref": format!("#/channels/{channel_id}/messages/{m}")}))
                .collect();
            channel_docs.insert(
                channel_id.clone(),
                json!({
                    "address": address,
                    "title": topic,
                    "description": format!(
                        "The events published to `{address}`, keyed by aggregate id: one aggregate's events are on one partition in stream order. Delivery is at least once; deduplicate on `event_id` or on (aggregate, sequence)."
                    ),
                    "messages": channel_messages,
                    "bindings": {"kafka": {"topic": address, "bindingVersion": KAFKA_BINDINGS}}
                }),
            );
            operations.insert(
                id(&format!("publish_{topic}")),
                json!({
                    "action": "send",
                    "title": format!("Publish to {address}"),
                    "summary": "The relay publishes each committed event from the transactional outbox.",
                    "channel": {"$ref": format!("#/channels/{channel_id}")},
                    "messages": operation_messages
                }),
            );
        }

        let mut info_doc = json!({"title": info.title, "version": info.version});
        if let Some(description) = &info.description {
            info_doc["description"] = Value::String(description.clone());
        }
        Ok(json!({
            "asyncapi": ASYNCAPI_VERSION,
            "info": info_doc,
            "defaultContentType": "application/json",
            "channels": channel_docs,
            "operations": operations,
            "components": {"messages": messages, "schemas": schemas}
        }))
    }
}
