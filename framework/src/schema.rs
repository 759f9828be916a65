//! JSON Schemas of events, their export, and the schema lock.
//!
//! Every event type at its current version (and every older version with a
//! typed upcaster) has a JSON Schema generated with schemars. [`export`]
//! writes them as `<type>.v<version>.json` files. The *schema lock* is a
//! committed text file of fingerprints per (type, version): [`check_lock`],
//! called from a test, fails when a payload's shape changed without a version
//! bump, naming the event. An intended change is accepted by running the test
//! once with `TIDINGS_BLESS=1`, which rewrites the lock.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::event::Event;

/// The environment variable that makes [`check_lock`] rewrite the lock.
pub const BLESS_ENV: &str = "TIDINGS_BLESS";

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

/// A schema lock that does not match the code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockMismatch {
    /// The lock file checked.
    pub path: PathBuf,
    /// One line per problem, naming the event type and version.
    pub problems: Vec<String>,
}

impl fmt::Display for LockMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "schema lock {} does not match the code:",
            self.path.display()
        )?;
        for problem in &self.problems {
            writeln!(f, "  - {problem}")?;
        }
        write!(
            f,
            "If the change is intended, rerun with {BLESS_ENV}=1 to update the lock and commit it."
        )
    }
}

impl std::error::Error for LockMismatch {}

const LOCK_HEADER: &str = "# tidings schema lock: <event type> v<version> <sha256 of the payload schema>.\n\
# A changed shape needs a new version. Rewrite with TIDINGS_BLESS=1 only for intended changes.\n";

fn read_lock(path: &Path) -> std::io::Result<BTreeMap<(String, u32), String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let mut entries = BTreeMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        let parsed = match parts.as_slice() {
            [name, version, hash] => version
                .strip_prefix('v')
                .and_then(|v| v.parse::<u32>().ok())
                .map(|v| ((name.to_string(), v), hash.to_string())),
            _ => None,
        };
        let Some((key, hash)) = parsed else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{}:{}: expected `<type> v<version> <sha256>`",
                    path.display(),
                    number + 1
                ),
            ));
        };
        entries.insert(key, hash);
    }
    Ok(entries)
}

/// Compares the schemas of `schemas` with the lock file at `path`.
///
/// Fails, naming each event, when a (type, version) has a different
/// fingerprint than the lock records (its shape changed without a version
/// bump) or is missing from the lock. With `TIDINGS_BLESS=1` in the
/// environment it writes the current fingerprints instead (entries of other
/// types are kept) and succeeds.
///
/// Call it from a test of your own:
///
/// ```no_run
/// # #[derive(Debug, Clone, tidings::Event)] enum OrderEvent { Created { id: String } }
/// #[test]
/// fn event_schemas_are_locked() {
///     tidings::schema::check_lock(&tidings::schema::schemas_of::<OrderEvent>(), "events.lock")
///         .unwrap_or_else(|e| panic!("{e}"));
/// }
/// ```
pub fn check_lock(schemas: &[EventSchema], path: impl AsRef<Path>) -> Result<(), LockMismatch> {
    let bless = std::env::var_os(BLESS_ENV).is_some_and(|v| v != "0" && !v.is_empty());
    check_lock_with(schemas, path, bless)
}

/// [`check_lock`] with blessing decided by the caller rather than by
/// `TIDINGS_BLESS`: `bless` writes the current fingerprints (keeping the
/// entries of other types) and succeeds; otherwise it only compares.
pub fn check_lock_with(
    schemas: &[EventSchema],
    path: impl AsRef<Path>,
    bless: bool,
) -> Result<(), LockMismatch> {
    let path = path.as_ref();
    let mismatch = |problems| LockMismatch {
        path: path.to_owned(),
        problems,
    };
    let mut entries =
        read_lock(path).map_err(|e| mismatch(vec![format!("cannot read the lock: {e}")]))?;

    let mut problems = Vec::new();
    for schema in schemas {
        let key = (schema.event_type.to_owned(), schema.version);
        let fingerprint = schema.fingerprint();
        match entries.get(&key) {
            Some(locked) if *locked == fingerprint => {}
            Some(_) => problems.push(format!(
                "`{}` v{} changed shape without a version bump: raise its `version` and add an upcaster",
                schema.event_type, schema.version
            )),
            None => problems.push(format!(
                "`{}` v{} is not in the lock",
                schema.event_type, schema.version
            )),
        }
        if bless {
            entries.insert(key, fingerprint);
        }
    }
    if bless {
        return write_entries(path, &entries)
            .map_err(|e| mismatch(vec![format!("cannot write the lock: {e}")]));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(mismatch(problems))
    }
}

/// Records the fingerprints of `schemas` in the lock at `path`, keeping the
/// entries of other types: what `TIDINGS_BLESS=1` does.
pub fn write_lock(schemas: &[EventSchema], path: impl AsRef<Path>) -> std::io::Result<()> {
    let path = path.as_ref();
    let mut entries = read_lock(path)?;
    for schema in schemas {
        entries.insert(
            (schema.event_type.to_owned(), schema.version),
            schema.fingerprint(),
        );
    }
    write_entries(path, &entries)
}

fn write_entries(path: &Path, entries: &BTreeMap<(String, u32), String>) -> std::io::Result<()> {
    let mut text = String::from(LOCK_HEADER);
    for ((name, version), hash) in entries {
        text.push_str(&format!("{name} v{version} {hash}\n"));
    }
    std::fs::write(path, text)
}

/// The schemas of `E` (shorthand for `E::schemas()`).
pub fn schemas_of<E: Event>() -> Vec<EventSchema> {
    E::schemas()
}
