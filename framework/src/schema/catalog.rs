//! The event types a service publishes, gathered from its enums with the
//! topics they go to: what the schema lock checks and what the AsyncAPI
//! document describes.
//!
//! A catalog refuses two event types with the same wire name on one topic
//! (from two enums), since a consumer of that topic could not tell them
//! apart.

use std::collections::BTreeMap;
use std::fmt;

use crate::aggregate::Aggregate;
use crate::event::{Event, EventType};
use crate::schema::EventSchema;

/// The event enums of a service, each with its topic.
///
/// ```
/// # #[derive(Debug, Clone, tidings::Event)] #[event(topic = "orders")] enum OrderEvent { Created { id: String } }
/// # #[derive(Debug, Clone, tidings::Event)] #[event(topic = "auctions")] enum AuctionEvent { Opened { id: String } }
/// use tidings::schema::Catalog;
///
/// let catalog = Catalog::new().with::<OrderEvent>().with::<AuctionEvent>();
/// assert_eq!(catalog.topics(), vec!["auctions", "orders"]);
/// catalog.validate().unwrap();
/// ```
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub(super) enums: Vec<EnumEntry>,
}

/// One enum of a catalog.
#[derive(Debug, Clone)]
pub(super) struct EnumEntry {
    /// The Rust type's name, for messages.
    pub(super) rust_name: &'static str,
    /// The topic its events go to, when known.
    pub(super) topic: Option<String>,
    /// Its event types at their current versions.
    pub(super) types: &'static [EventType],
    /// Every (wire name, version) it reads.
    pub(super) reads: &'static [EventType],
    /// Its schemas (current versions and typed upcasts).
    pub(super) schemas: Vec<EventSchema>,
}

impl Catalog {
    /// An empty catalog.
    pub fn new() -> Self {
        Catalog::default()
    }

    /// A catalog of one enum.
    pub fn of<E: Event>() -> Self {
        Catalog::new().with::<E>()
    }

    /// Adds enum `E`, whose topic is its `#[event(topic = "...")]`. Adding
    /// the same enum twice adds it once.
    pub fn with<E: Event>(self) -> Self {
        self.add::<E>(E::TOPIC.map(str::to_owned))
    }

    /// Adds the events of aggregate `A`, on the aggregate's topic (its
    /// event enum's topic, else its type name).
    pub fn with_aggregate<A: Aggregate>(self) -> Self {
        self.add::<A::Event>(Some(A::topic().to_owned()))
    }

    /// Adds enum `E` on `topic`, whatever its own attribute says.
    pub fn with_on<E: Event>(self, topic: &str) -> Self {
        self.add::<E>(Some(topic.to_owned()))
    }

    fn add<E: Event>(mut self, topic: Option<String>) -> Self {
        let rust_name = std::any::type_name::<E>();
        if let Some(entry) = self.enums.iter_mut().find(|e| e.rust_name == rust_name) {
            if entry.topic.is_none() {
                entry.topic = topic;
            }
            return self;
        }
        self.enums.push(EnumEntry {
            rust_name,
            topic,
            types: E::TYPES,
            reads: E::READS,
            schemas: E::schemas(),
        });
        self
    }

    /// Every schema, in the order the enums were added.
    pub fn schemas(&self) -> Vec<EventSchema> {
        self.enums
            .iter()
            .flat_map(|e| e.schemas.iter().cloned())
            .collect()
    }

    /// The topics the catalog's events go to, sorted (enums with no known
    /// topic are left out).
    pub fn topics(&self) -> Vec<&str> {
        let mut topics: Vec<&str> = self
            .enums
            .iter()
            .filter_map(|e| e.topic.as_deref())
            .collect();
        topics.sort_unstable();
        topics.dedup();
        topics
    }

    /// Every schema with the topic of its enum.
    pub(super) fn located(&self) -> Vec<(Option<&str>, &EventSchema)> {
        self.enums
            .iter()
            .flat_map(|e| e.schemas.iter().map(move |s| (e.topic.as_deref(), s)))
            .collect()
    }

    /// The topic of event type `name` at `version`, if an enum reads it and
    /// has a topic.
    pub(super) fn topic_of(&self, name: &str, version: u32) -> Option<&str> {
        self.enums
            .iter()
            .find(|e| {
                e.reads
                    .iter()
                    .any(|t| t.name == name && t.version == version)
            })
            .and_then(|e| e.topic.as_deref())
    }

    /// Whether some enum of the catalog on `topic` reads `name` at `version`.
    pub(super) fn reads(&self, topic: Option<&str>, name: &str, version: u32) -> bool {
        self.enums.iter().any(|e| {
            (topic.is_none() || e.topic.as_deref() == topic)
                && e.reads
                    .iter()
                    .any(|t| t.name == name && t.version == version)
        })
    }

    /// Checks that no two enums put an event type of the same wire name (at
    /// any version they read) on one topic.
    pub fn validate(&self) -> Result<(), CatalogError> {
        let mut owners: BTreeMap<(&str, &str), &str> = BTreeMap::new();
        let mut clashes = Vec::new();
        for entry in &self.enums {
            let Some(topic) = entry.topic.as_deref() else {
                continue;
            };
            let mut names: Vec<&str> = entry.reads.iter().map(|t| t.name).collect();
            names.extend(entry.types.iter().map(|t| t.name));
            names.sort_unstable();
            names.dedup();
            for name in names {
                match owners.get(&(topic, name)) {
                    Some(other) if *other != entry.rust_name => clashes.push(format!(
                        "event type `{name}` is on topic `{topic}` twice: in `{other}` and in `{}`; a consumer of the topic cannot tell them apart (rename one, or put them on different topics)",
                        entry.rust_name
                    )),
                    _ => {
                        owners.insert((topic, name), entry.rust_name);
                    }
                }
            }
        }
        if clashes.is_empty() {
            Ok(())
        } else {
            Err(CatalogError(clashes))
        }
    }
}

/// A catalog that cannot be described or checked as it is: one line per
/// problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogError(pub Vec<String>);

impl fmt::Display for CatalogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.join("; "))
    }
}

impl std::error::Error for CatalogError {}
