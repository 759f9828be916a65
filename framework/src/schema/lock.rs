//! The schema lock: a committed file that keeps the JSON Schema of every
//! (event type, version) a service has published, with its topic and a
//! fingerprint, so that a change can be classified, not only detected.
//!
//! # Guarantees
//!
//! - A change that breaks readers ([`super::diff`]) of a (type, version)
//!   already in the lock fails the check, naming the event, the fields and
//!   what to do: raise the version and add an upcaster.
//! - A (type, version) in the lock that the code no longer reads (a type
//!   renamed or removed without an upcaster or a retirement) fails the
//!   check: stored events of it could not be loaded any more.
//! - Compatible changes (a new optional field, a new type, a new version,
//!   descriptions) pass and are listed; blessing records them.
//! - Two event types with one wire name on one topic fail the check.
//! - Blessing (`TIDINGS_BLESS=1`) rewrites the entries of the catalog's
//!   topics and keeps the others, and keeps the schemas of old versions the
//!   code still reads through JSON upcasters (the code has none for them).
//!
//! Locks written by earlier releases (one `<type> v<version> <sha256>` line
//! per entry) are read; they keep no schema, so a changed fingerprint
//! against such an entry is reported as unclassified and breaking until the
//! lock is blessed in the current format.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::catalog::Catalog;
use super::diff::{FieldChange, compare};

/// The environment variable that makes [`Catalog::check_lock`] rewrite the lock.
pub const BLESS_ENV: &str = "TIDINGS_BLESS";

const FORMAT: u32 = 2;
const NOTE: &str = "tidings schema lock: the JSON Schema of every event type and version published. \
A breaking change needs a new version and an upcaster. Rewrite with TIDINGS_BLESS=1 only for intended changes.";

/// The lock file as stored.
#[derive(Debug, Serialize, Deserialize)]
struct LockFile {
    format: u32,
    note: String,
    events: Vec<Entry>,
}

/// One (type, version) in the lock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    #[serde(rename = "type")]
    event_type: String,
    version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    topic: Option<String>,
    fingerprint: String,
    /// Absent in locks of the first format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    schema: Option<Value>,
    /// Read from a lock of the first format (no topic, no schema).
    #[serde(skip)]
    first_format: bool,
}

/// Keyed by (topic, or empty in a lock of the first format; type; version):
/// one name may be on several topics.
type Entries = BTreeMap<(String, String, u32), Entry>;

fn key(entry: &Entry) -> (String, String, u32) {
    (
        entry.topic.clone().unwrap_or_default(),
        entry.event_type.clone(),
        entry.version,
    )
}

fn read_lock(path: &Path) -> std::io::Result<Entries> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    if text.trim_start().starts_with('{') {
        let file: LockFile = serde_json::from_str(&text).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: not a schema lock: {e}", path.display()),
            )
        })?;
        if file.format != FORMAT {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{}: schema lock format {} (this release reads {FORMAT})",
                    path.display(),
                    file.format
                ),
            ));
        }
        return Ok(file.events.into_iter().map(|e| (key(&e), e)).collect());
    }
    read_first_format(path, &text)
}

/// `<type> v<version> <sha256>` per line, `#` comments.
fn read_first_format(path: &Path, text: &str) -> std::io::Result<Entries> {
    let mut entries = Entries::new();
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
                .map(|v| (name.to_string(), v, hash.to_string())),
            _ => None,
        };
        let Some((event_type, version, fingerprint)) = parsed else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{}:{}: expected `<type> v<version> <sha256>`",
                    path.display(),
                    number + 1
                ),
            ));
        };
        let entry = Entry {
            event_type,
            version,
            topic: None,
            fingerprint,
            schema: None,
            first_format: true,
        };
        entries.insert(key(&entry), entry);
    }
    Ok(entries)
}

fn write_entries(path: &Path, entries: &Entries) -> std::io::Result<()> {
    let file = LockFile {
        format: FORMAT,
        note: NOTE.into(),
        events: entries.values().cloned().collect(),
    };
    let mut text = serde_json::to_string_pretty(&file).map_err(std::io::Error::other)?;
    text.push('\n');
    std::fs::write(path, text)
}

/// One difference between the lock and the code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The wire name.
    pub event_type: String,
    /// The version.
    pub version: u32,
    /// What changed.
    pub kind: ChangeKind,
}

/// The kinds of [`Change`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    /// An event type the lock does not have at any version: compatible.
    NewType,
    /// A new version of a locked type: compatible (the derive checks the
    /// upcaster chain). Carries what changed since the previous version.
    NewVersion {
        /// The newest locked version below this one.
        previous: u32,
        /// The changes from it, when both schemas are known.
        fields: Vec<FieldChange>,
    },
    /// The schema of a locked (type, version) changed.
    Changed(Vec<FieldChange>),
    /// The fingerprint changed and the lock keeps no schema to compare.
    Unclassified,
    /// The lock has it and no enum of the catalog reads it any more.
    NoLongerRead {
        /// The topic the lock records.
        topic: Option<String>,
    },
    /// It goes to another topic than the lock records.
    MovedTopic {
        /// The locked topic.
        from: String,
        /// The topic now.
        to: String,
    },
}

impl Change {
    /// Whether the change breaks stored events or running consumers.
    pub fn breaking(&self) -> bool {
        match &self.kind {
            ChangeKind::NewType | ChangeKind::NewVersion { .. } => false,
            ChangeKind::Changed(fields) => fields.iter().any(FieldChange::breaking),
            ChangeKind::Unclassified
            | ChangeKind::NoLongerRead { .. }
            | ChangeKind::MovedTopic { .. } => true,
        }
    }

    /// What to do about a breaking change.
    fn advice(&self) -> String {
        let (name, v) = (&self.event_type, self.version);
        match &self.kind {
            ChangeKind::Changed(_) => format!(
                "raise `{name}`'s `version` to {} and add `upcast(from = {v}, ...)` so that stored and in-flight v{v} payloads still read \
                 (if no v{v} event was ever stored or published, accept the change with {BLESS_ENV}=1)",
                v + 1
            ),
            ChangeKind::Unclassified => format!(
                "the lock is in an older format and keeps no schema to compare with: check the change, then rewrite the lock with {BLESS_ENV}=1"
            ),
            ChangeKind::NoLongerRead { .. } => format!(
                "stored `{name}` v{v} events could no longer be loaded: if it was renamed, declare the old name with \
                 `upcast(from = {v}, name = \"{name}\", ...)` on the variant that replaced it; if it is gone for good, \
                 retire it with `#[event(retired(name = \"{name}\", version = {v}))]` on the enum"
            ),
            ChangeKind::MovedTopic { from, .. } => format!(
                "consumers of `{from}` stop receiving it: keep it on `{from}`, or publish a new event type on the new topic"
            ),
            ChangeKind::NewType | ChangeKind::NewVersion { .. } => String::new(),
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, v) = (&self.event_type, self.version);
        let fields = |f: &mut fmt::Formatter<'_>, fields: &[FieldChange]| {
            for field in fields {
                let class = if field.breaking() {
                    "breaking"
                } else {
                    "compatible"
                };
                write!(f, "\n      {class}: {field}")?;
            }
            Ok(())
        };
        match &self.kind {
            ChangeKind::NewType => write!(f, "new event type `{name}` v{v}"),
            ChangeKind::NewVersion {
                previous,
                fields: changes,
            } => {
                write!(f, "new version `{name}` v{v} (changes from v{previous}:")?;
                if changes.is_empty() {
                    write!(f, " none known)")
                } else {
                    fields(f, changes)?;
                    write!(f, ")")
                }
            }
            ChangeKind::Changed(changes) if self.breaking() => {
                write!(f, "`{name}` v{v} changed without a version bump:")?;
                fields(f, changes)
            }
            ChangeKind::Changed(changes) => {
                write!(f, "`{name}` v{v} changed compatibly:")?;
                fields(f, changes)
            }
            ChangeKind::Unclassified => write!(f, "`{name}` v{v} changed shape"),
            ChangeKind::NoLongerRead { topic } => match topic {
                Some(topic) => write!(
                    f,
                    "`{name}` v{v} (topic `{topic}`) is in the lock but no event type reads it any more"
                ),
                None => write!(
                    f,
                    "`{name}` v{v} is in the lock but no event type reads it any more"
                ),
            },
            ChangeKind::MovedTopic { from, to } => {
                write!(f, "`{name}` v{v} moved from topic `{from}` to `{to}`")
            }
        }
    }
}

/// What [`Catalog::check_lock`] found: the lock holds no breaking change,
/// and these compatible ones (empty when the lock is current).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockReport {
    /// The lock file checked.
    pub path: PathBuf,
    /// Compatible changes not yet recorded in the lock.
    pub changes: Vec<Change>,
    /// How many schemas the catalog has.
    pub schemas: usize,
}

impl LockReport {
    /// Whether the lock records exactly what the code has.
    pub fn is_current(&self) -> bool {
        self.changes.is_empty()
    }
}

impl fmt::Display for LockReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.changes.is_empty() {
            return write!(f, "{} schemas match {}", self.schemas, self.path.display());
        }
        writeln!(
            f,
            "{} schemas are compatible with {}; not yet recorded:",
            self.schemas,
            self.path.display()
        )?;
        for change in &self.changes {
            writeln!(f, "  compatible: {change}")?;
        }
        write!(f, "Record them with {BLESS_ENV}=1 and commit the lock.")
    }
}

/// A schema lock that the code breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockMismatch {
    /// The lock file checked.
    pub path: PathBuf,
    /// One line per problem (breaking changes with what to do, clashing
    /// names, an unreadable lock).
    pub problems: Vec<String>,
    /// Every change found, breaking or not.
    pub changes: Vec<Change>,
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
        for change in self.changes.iter().filter(|c| !c.breaking()) {
            writeln!(f, "  compatible: {change}")?;
        }
        write!(
            f,
            "If a change is intended and nothing was stored or published with the old shape, rerun with {BLESS_ENV}=1 to update the lock and commit it."
        )
    }
}

impl std::error::Error for LockMismatch {}

impl Catalog {
    /// Compares the catalog's schemas with the lock file at `path`; with
    /// `TIDINGS_BLESS=1` in the environment, records them instead.
    ///
    /// Call it from a test of your own:
    ///
    /// ```no_run
    /// # #[derive(Debug, Clone, tidings::Event)] #[event(topic = "orders")] enum OrderEvent { Created { id: String } }
    /// #[test]
    /// fn event_schemas_are_locked() {
    ///     let report = tidings::schema::Catalog::of::<OrderEvent>()
    ///         .check_lock("events.lock")
    ///         .unwrap_or_else(|e| panic!("{e}"));
    ///     assert!(report.is_current(), "{report}");
    /// }
    /// ```
    pub fn check_lock(&self, path: impl AsRef<Path>) -> Result<LockReport, LockMismatch> {
        let bless = std::env::var_os(BLESS_ENV).is_some_and(|v| v != "0" && !v.is_empty());
        self.check_lock_with(path, bless)
    }

    /// [`Catalog::check_lock`] with blessing decided by the caller: `bless`
    /// records the catalog's schemas and succeeds (unless two types clash
    /// on a topic); otherwise it only compares.
    pub fn check_lock_with(
        &self,
        path: impl AsRef<Path>,
        bless: bool,
    ) -> Result<LockReport, LockMismatch> {
        let path = path.as_ref();
        let fail = |problems, changes| LockMismatch {
            path: path.to_owned(),
            problems,
            changes,
        };
        let clashes = self.validate().err().map(|e| e.0).unwrap_or_default();
        let entries = read_lock(path)
            .map_err(|e| fail(vec![format!("cannot read the lock: {e}")], Vec::new()))?;
        let changes = self.changes(&entries);
        if bless && clashes.is_empty() {
            write_entries(path, &self.blessed(entries))
                .map_err(|e| fail(vec![format!("cannot write the lock: {e}")], Vec::new()))?;
            return Ok(LockReport {
                path: path.to_owned(),
                changes: Vec::new(),
                schemas: self.located().len(),
            });
        }
        let mut problems = clashes;
        problems.extend(
            changes
                .iter()
                .filter(|c| c.breaking())
                .map(|c| format!("{c}\n    → {}", c.advice())),
        );
        if problems.is_empty() {
            Ok(LockReport {
                path: path.to_owned(),
                changes,
                schemas: self.located().len(),
            })
        } else {
            Err(fail(problems, changes))
        }
    }

    /// Records the catalog's schemas in the lock at `path` (what
    /// `TIDINGS_BLESS=1` does).
    pub fn write_lock(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        let path = path.as_ref();
        let entries = read_lock(path)?;
        write_entries(path, &self.blessed(entries))
    }

    /// Whether a lock entry belongs to this catalog's topics.
    fn covers(&self, entry: &Entry) -> bool {
        if entry.first_format {
            // No topic recorded: the entry is ours if we read its type.
            return self
                .enums
                .iter()
                .any(|e| e.reads.iter().any(|t| t.name == entry.event_type));
        }
        match entry.topic.as_deref() {
            Some(topic) => self.topics().contains(&topic),
            // Recorded from an enum without a topic.
            None => self.enums.iter().any(|e| e.topic.is_none()),
        }
    }

    /// The changes to `name` v`version`, for an old version read through
    /// a typed upcaster: only what stored payloads must satisfy.
    fn classify(&self, name: &str, version: u32, changes: Vec<FieldChange>) -> Vec<FieldChange> {
        let current = self.enums.iter().any(|e| {
            e.types
                .iter()
                .any(|t| t.name == name && t.version == version)
        });
        if current {
            changes
        } else {
            super::diff::for_stored_only(changes)
        }
    }

    /// Whether the catalog reads the entry's (type, version) on its topic
    /// (on any, for an entry of the first format).
    fn still_reads(&self, entry: &Entry) -> bool {
        let topic = if entry.first_format {
            None
        } else {
            entry.topic.as_deref()
        };
        self.reads(topic, &entry.event_type, entry.version)
    }

    fn changes(&self, entries: &Entries) -> Vec<Change> {
        let mut changes = Vec::new();
        let topics = self.topics();
        for (topic, schema) in self.located() {
            let (name, version) = (schema.event_type, schema.version);
            let current = schema.schema.as_value();
            let change = |kind| Change {
                event_type: name.to_owned(),
                version,
                kind,
            };
            let here = topic.unwrap_or_default().to_owned();
            let exact = entries
                .get(&(here.clone(), name.to_owned(), version))
                .or_else(|| entries.get(&(String::new(), name.to_owned(), version)));
            // Locked on a topic the catalog no longer publishes to.
            let elsewhere = entries.values().find(|e| {
                e.event_type == name
                    && e.version == version
                    && e.topic
                        .as_deref()
                        .is_some_and(|t| Some(t) != topic && !topics.contains(&t))
            });
            match (exact, elsewhere) {
                (Some(entry), _) if entry.fingerprint == schema.fingerprint() => {}
                (
                    Some(Entry {
                        schema: Some(locked),
                        ..
                    }),
                    _,
                ) => changes.push(change(ChangeKind::Changed(self.classify(
                    name,
                    version,
                    compare(locked, current),
                )))),
                (Some(_), _) => changes.push(change(ChangeKind::Unclassified)),
                (None, Some(moved)) => changes.push(change(ChangeKind::MovedTopic {
                    from: moved.topic.clone().unwrap_or_default(),
                    to: here,
                })),
                (None, None) => {
                    let same_type = |t: &String| *t == here || t.is_empty();
                    let previous = entries
                        .values()
                        .filter(|e| {
                            same_type(&e.topic.clone().unwrap_or_default())
                                && e.event_type == name
                                && e.version < version
                        })
                        .max_by_key(|e| e.version);
                    let known = entries.values().any(|e| {
                        same_type(&e.topic.clone().unwrap_or_default()) && e.event_type == name
                    });
                    match previous {
                        Some(previous) => changes.push(change(ChangeKind::NewVersion {
                            previous: previous.version,
                            fields: previous
                                .schema
                                .as_ref()
                                .map(|locked| compare(locked, current))
                                .unwrap_or_default(),
                        })),
                        // Only newer versions are locked: the code went back,
                        // which the newer entries report as no longer read.
                        None if known => {}
                        None => changes.push(change(ChangeKind::NewType)),
                    }
                }
            }
        }
        for entry in entries.values() {
            if !self.covers(entry) || self.still_reads(entry) {
                continue;
            }
            changes.push(Change {
                event_type: entry.event_type.clone(),
                version: entry.version,
                kind: ChangeKind::NoLongerRead {
                    topic: entry.topic.clone(),
                },
            });
        }
        changes
    }

    /// The lock after blessing: other topics' entries kept, entries the
    /// code still reads without a schema of its own kept, the catalog's
    /// schemas recorded.
    fn blessed(&self, entries: Entries) -> Entries {
        let mut out = Entries::new();
        for (at, mut entry) in entries {
            if !self.covers(&entry) {
                out.insert(at, entry);
            } else if entry.first_format {
                // Recorded again under the topic of the enum that reads it.
                if self.still_reads(&entry) {
                    entry.topic = self
                        .topic_of(&entry.event_type, entry.version)
                        .map(str::to_owned);
                    entry.first_format = false;
                    out.insert(key(&entry), entry);
                }
            } else if self.still_reads(&entry) {
                out.insert(at, entry);
            }
        }
        for (topic, schema) in self.located() {
            let entry = Entry {
                event_type: schema.event_type.to_owned(),
                version: schema.version,
                topic: topic.map(str::to_owned),
                fingerprint: schema.fingerprint(),
                schema: Some(schema.schema.as_value().clone()),
                first_format: false,
            };
            out.insert(key(&entry), entry);
        }
        out
    }
}
