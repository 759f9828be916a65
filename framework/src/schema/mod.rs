//! JSON Schemas of events: their export, the schema lock that classifies
//! changes as compatible or breaking, and the AsyncAPI document.
//!
//! Every event type at its current version (and every older version with a
//! typed upcaster) has a JSON Schema generated with schemars. [`export`]
//! writes them as `<type>.v<version>.json` files. A [`Catalog`] gathers a
//! service's event enums with their topics; [`Catalog::check_lock`], called
//! from a test or from `schema check`, compares them with the committed
//! lock ([`lock`]) and fails on a breaking change without a version bump,
//! explaining what to do; [`Catalog::asyncapi`] describes the topics as an
//! AsyncAPI 3.0 document ([`asyncapi`]).

pub mod asyncapi;
mod catalog;
pub mod diff;
pub mod lock;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use asyncapi::AsyncApiInfo;
pub use catalog::{Catalog, CatalogError};
pub use lock::{BLESS_ENV, Change, ChangeKind, LockMismatch, LockReport};

use sha2::{Digest, Sha256};

use crate::event::Event;

/// The JSON Schema of one event type at one version.
#[derive(Debug, Clone, PartialEq)]
pub struct EventSchema {
    /// The wire name.
    pub event_type: &'static str,
    /// The version this schema describes.
    pub version: u32,
    /// The schema itself.
    pub schema: schemars::Schema,
}

impl EventSchema {
    /// The schema for payload type `T` of `event_type` at `version`.
    pub fn of<T: schemars::JsonSchema>(event_type: &'static str, version: u32) -> Self {
        let schema = schemars::SchemaGenerator::default().into_root_schema_for::<T>();
        EventSchema {
            event_type,
            version,
            schema,
        }
    }

    /// `<type>.v<version>.json`.
    pub fn file_name(&self) -> String {
        format!("{}.v{}.json", self.event_type, self.version)
    }

    /// A SHA-256 over the schema's canonical JSON (keys sorted): equal shapes,
    /// equal fingerprints, whatever the order in which fields were declared
    /// in the generated output.
    pub fn fingerprint(&self) -> String {
        let canonical = canonical(self.schema.as_value());
        let digest = Sha256::digest(canonical.as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn canonical(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Object(map) => {
            let sorted: BTreeMap<&String, String> =
                map.iter().map(|(k, v)| (k, canonical(v))).collect();
            let fields: Vec<String> = sorted
                .into_iter()
                .map(|(k, v)| format!("{}:{v}", serde_json::Value::String(k.clone())))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        serde_json::Value::Array(items) => {
            format!(
                "[{}]",
                items.iter().map(canonical).collect::<Vec<_>>().join(",")
            )
        }
        other => other.to_string(),
    }
}

/// Writes the schema of every type and version of `E` into `dir` (created if
/// missing) as pretty JSON files named `<type>.v<version>.json`. Returns the
/// paths written.
pub fn export<E: Event>(dir: impl AsRef<Path>) -> std::io::Result<Vec<PathBuf>> {
    export_schemas(&E::schemas(), dir)
}

/// Like [`export`], for a list of schemas gathered from several enums.
pub fn export_schemas(
    schemas: &[EventSchema],
    dir: impl AsRef<Path>,
) -> std::io::Result<Vec<PathBuf>> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::with_capacity(schemas.len());
    for schema in schemas {
        let path = dir.join(schema.file_name());
        let mut text = serde_json::to_string_pretty(schema.schema.as_value())
            .map_err(std::io::Error::other)?;
        text.push('\n');
        std::fs::write(&path, text)?;
        written.push(path);
    }
    Ok(written)
}

/// The schemas of `E` (shorthand for `E::schemas()`).
pub fn schemas_of<E: Event>() -> Vec<EventSchema> {
    E::schemas()
}
