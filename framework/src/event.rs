//! Versioned, self-describing events.
//!
//! An event enum is a set of event types: one variant, one type, each with a
//! wire name and a current version. Events are immutable facts: stored rows
//! are never rewritten. When a payload's shape changes, the version goes up
//! and an upcaster brings older payloads to the new shape *on read*, one
//! version at a time, from the store and from Kafka alike.
//!
//! Decoding never panics: an unknown type, a version newer than the code
//! knows, a payload that does not fit or an upcaster that refuses are all
//! [`DecodeError`]s naming the type and version.

use serde::de::DeserializeOwned;

use crate::schema::EventSchema;

/// The wire name and current version of one event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventType {
    /// The wire name, e.g. `OrderCreated`.
    pub name: &'static str,
    /// The current version (at least 1).
    pub version: u32,
}

/// A set of versioned event types, usually derived with `#[derive(Event)]`.
///
/// # Deriving
///
/// ```
/// use tidings::{Event, UpcastError};
/// use serde_json::{Value, json};
///
/// /// The old shape of `OrderCreated`, kept as a plain struct.
/// #[derive(serde::Deserialize, schemars::JsonSchema)]
/// struct OrderCreatedV2 { order_id: String, user_id: String, amount_cents: i64 }
///
/// impl From<OrderCreatedV2> for OrderEvent {
///     fn from(v2: OrderCreatedV2) -> Self {
///         OrderEvent::OrderCreated {
///             order_id: v2.order_id,
///             user_id: v2.user_id,
///             amount: v2.amount_cents as f64 / 100.0,
///             currency: "EUR".into(),
///         }
///     }
/// }
///
/// /// Version 1 had no user: JSON upcaster to version 2.
/// fn order_created_v1(mut payload: Value) -> Result<Value, UpcastError> {
///     payload["user_id"] = json!("unknown");
///     Ok(payload)
/// }
///
/// #[derive(Debug, Clone, PartialEq, Event)]
/// #[event(topic = "orders")]
/// enum OrderEvent {
///     /// An order was placed.
///     #[event(
///         version = 3,
///         upcast(from = 1, name = "OrderPlaced", json = order_created_v1),
///         upcast(from = 2, typed = OrderCreatedV2),
///     )]
///     OrderCreated { order_id: String, user_id: String, amount: f64, currency: String },
///     /// The order was paid.
///     PaymentProcessed { order_id: String, payment_id: String },
///     /// The order was cancelled.
///     #[event(name = "OrderCancelled")]
///     Cancelled,
/// }
///
/// let v1 = json!({"order_id": "ORD-1", "amount_cents": 1250});
/// let event = OrderEvent::decode("OrderPlaced", 1, v1).unwrap();
/// assert_eq!(event.event_type(), "OrderCreated");
/// assert_eq!(event.event_version(), 3);
/// assert_eq!(
///     event,
///     OrderEvent::OrderCreated {
///         order_id: "ORD-1".into(),
///         user_id: "unknown".into(),
///         amount: 12.5,
///         currency: "EUR".into(),
///     }
/// );
/// assert!(OrderEvent::decode("OrderCreated", 4, json!({})).is_err());
/// ```
///
/// # Attributes
///
/// | where | attribute | meaning |
/// |---|---|---|
/// | enum | `topic = "orders"` | the Kafka topic of these events (else the aggregate's) |
/// | variant | `name = "OrderCreated"` | the wire name (default: the variant's name) |
/// | variant | `version = 3` | the current version (default 1) |
/// | variant | `upcast(from = 1, json = path)` | `fn(serde_json::Value) -> Result<Value, UpcastError>` from version 1 to 2 |
/// | variant | `upcast(from = 2, typed = Type)` | deserialize version 2 as `Type`, then `Into` the next step's type, or `Into<Self>` on the last step |
/// | upcast | `name = "OrderPlaced"` | the wire name the event had at that version (renames; one event type turned into another) |
/// | enum | `retired(name = "GiftWrapped", version = 2)` | versions 1 to 2 of a type no variant reads any more: dropped on read (`version` defaults to 1) |
/// | enum | `split(name = "CheckedOut", version = 1, json = path)` | `fn(serde_json::Value) -> Result<Vec<Self>, UpcastError>`: one stored event read as several |
/// | enum | `split(name = "CheckedOut", version = 1, typed = Type)` | deserialize it as `Type`, then `Into<Vec<Self>>` |
///
/// Retired and split (type, version)s are checked like the variants': no
/// two readers of one (type, version), no retiring what a variant reads.
/// [`Event::read`] and [`Reading`] say what readers see.
///
/// Variants may be struct variants (the payload is a JSON object of the
/// fields; their `#[serde]` and `#[schemars]` attributes apply, and field
/// types must be `Clone`), newtype variants (the payload is the inner type's
/// serialization) or unit variants (the payload is `{}`).
pub trait Event: Sized + Send + Sync + 'static {
    /// The topic set on the enum with `#[event(topic = "...")]`, if any.
    const TOPIC: Option<&'static str>;
    /// Every event type of the enum with its current version, in declaration order.
    const TYPES: &'static [EventType];
    /// Every (wire name, version) this enum reads: the current versions,
    /// the older ones its upcasters cover (under the names they had) and
    /// the retired ones it drops. The schema lock uses it to tell a type
    /// renamed or removed without an upcaster from one still read.
    const READS: &'static [EventType] = Self::TYPES;

    /// The wire name of this event.
    fn event_type(&self) -> &'static str;
    /// The current version of this event's type.
    fn event_version(&self) -> u32;
    /// The payload as JSON (without the envelope).
    fn to_payload(&self) -> Result<serde_json::Value, serde_json::Error>;
    /// Decodes a payload stored or sent as `event_type` at `event_version`,
    /// running the upcasters up to the current version.
    fn decode(
        event_type: &str,
        event_version: u32,
        payload: serde_json::Value,
    ) -> Result<Self, DecodeError>;
    /// The JSON Schema of every event type at its current version, and of
    /// every older version that has a typed upcaster.
    fn schemas() -> Vec<EventSchema>;

    /// Reads a payload stored or sent as `event_type` at `event_version` as
    /// the events it stands for today: one event, several (a split: one old
    /// event upcast into several new ones) or none (a retired type). This is
    /// what the store and the projections call; [`Event::decode`] reads
    /// only what is one event.
    fn read(
        event_type: &str,
        event_version: u32,
        payload: serde_json::Value,
    ) -> Result<Reading<Self>, DecodeError> {
        Self::decode(event_type, event_version, payload).map(Reading::One)
    }

    /// [`Event::read`] of a payload given as JSON text. The derive reads a
    /// current version straight into its type, without building a
    /// [`serde_json::Value`] first (what a projection runner does for every
    /// message); older versions, splits and retired types go through
    /// [`Event::read`]. Read straight, a payload that repeats a key is
    /// refused, where a `Value` would have kept the last occurrence.
    fn read_json(
        event_type: &str,
        event_version: u32,
        payload: &serde_json::value::RawValue,
    ) -> Result<Reading<Self>, DecodeError> {
        let value = payload_from_str(event_type, event_version, payload)?;
        Self::read(event_type, event_version, value)
    }
}

/// What one stored or published event reads as today (see [`Event::read`]).
///
/// Readers see the events in order, where the stored one was: an aggregate
/// applies each of a split's events in turn (and none of a retired one), and
/// its version still counts stored events, so the next append follows the
/// stored sequence. A projection applies a split's events in order in one
/// transaction, each in an envelope that keeps the stored event's id,
/// sequence, timestamp and context; a retired event is skipped unread (its
/// stream's position moves past it, counted as retired in the status).
#[derive(Debug, Clone, PartialEq)]
pub enum Reading<E> {
    /// One event: the usual case.
    One(E),
    /// Several events, in order (possibly none).
    Split(Vec<E>),
    /// A retired type: dropped on read.
    Retired,
}

impl<E> Reading<E> {
    /// The events, in order.
    pub fn into_vec(self) -> Vec<E> {
        self.into_iter().collect()
    }
}

impl<E> IntoIterator for Reading<E> {
    type Item = E;
    type IntoIter = std::iter::Chain<std::option::IntoIter<E>, std::vec::IntoIter<E>>;

    fn into_iter(self) -> Self::IntoIter {
        let (one, many) = match self {
            Reading::One(event) => (Some(event), Vec::new()),
            Reading::Split(events) => (None, events),
            Reading::Retired => (None, Vec::new()),
        };
        one.into_iter().chain(many)
    }
}

/// An upcaster refused a payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct UpcastError {
    message: String,
}

impl UpcastError {
    /// An upcast failure with a message saying what was wrong with the payload.
    pub fn new(message: impl Into<String>) -> Self {
        UpcastError {
            message: message.into(),
        }
    }

    /// The payload lacks a field the upcaster needs.
    pub fn missing_field(field: &str) -> Self {
        UpcastError::new(format!("missing field `{field}`"))
    }
}

/// Why a stored or received event could not be decoded into an [`Event`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// No variant has this wire name (at any version).
    #[error("unknown event type `{event_type}` (version {version})")]
    UnknownType {
        /// The wire name received.
        event_type: String,
        /// The version received.
        version: u32,
    },
    /// The version is newer than the code knows: deploy the newer code first.
    #[error(
        "`{event_type}` version {version} is newer than the current version {current} known to this code"
    )]
    FutureVersion {
        /// The wire name.
        event_type: String,
        /// The version received.
        version: u32,
        /// The newest version this code knows.
        current: u32,
    },
    /// The version is older than the current one and no upcaster covers it.
    #[error("`{event_type}` version {version} has no upcaster (current version {current})")]
    NoUpcaster {
        /// The wire name.
        event_type: String,
        /// The version received.
        version: u32,
        /// The current version.
        current: u32,
    },
    /// The payload does not have the shape of its type and version.
    #[error("`{event_type}` version {version}: payload does not match: {source}")]
    Payload {
        /// The wire name.
        event_type: String,
        /// The version whose shape was expected.
        version: u32,
        /// What serde said.
        source: serde_json::Error,
    },
    /// The type is retired at this version: [`Event::read`] drops it.
    #[error(
        "`{event_type}` version {version} is retired (dropped on read): read it with `Event::read`"
    )]
    Retired {
        /// The wire name.
        event_type: String,
        /// The version received.
        version: u32,
    },
    /// This (type, version) reads as several events: [`Event::read`] returns them.
    #[error("`{event_type}` version {version} reads as {count} events: read it with `Event::read`")]
    Split {
        /// The wire name.
        event_type: String,
        /// The version received.
        version: u32,
        /// How many events it reads as.
        count: usize,
    },
    /// An upcaster refused the payload.
    #[error("`{event_type}` version {version}: upcaster failed: {source}")]
    Upcast {
        /// The wire name.
        event_type: String,
        /// The version the upcaster started from.
        version: u32,
        /// What the upcaster said.
        source: UpcastError,
    },
    /// The bytes are not a valid envelope (not JSON, or missing fields).
    #[error("malformed envelope: {0}")]
    Envelope(String),
}

impl DecodeError {
    /// Whether retrying can never help (every decode error is permanent: the
    /// same bytes decode the same way until the code changes).
    pub fn is_permanent(&self) -> bool {
        true
    }
}

/// The error for a (type, version) no arm of the derived `decode` matched.
#[doc(hidden)]
pub fn unknown<E: Event>(event_type: &str, version: u32) -> DecodeError {
    match E::TYPES.iter().find(|t| t.name == event_type) {
        Some(t) if version > t.version => DecodeError::FutureVersion {
            event_type: event_type.to_owned(),
            version,
            current: t.version,
        },
        Some(t) => DecodeError::NoUpcaster {
            event_type: event_type.to_owned(),
            version,
            current: t.version,
        },
        None => DecodeError::UnknownType {
            event_type: event_type.to_owned(),
            version,
        },
    }
}

/// Deserializes a payload as `T`, naming the type and version on failure.
#[doc(hidden)]
pub fn from_payload<T: DeserializeOwned>(
    event_type: &str,
    version: u32,
    payload: serde_json::Value,
) -> Result<T, DecodeError> {
    serde_json::from_value(payload).map_err(|source| DecodeError::Payload {
        event_type: event_type.to_owned(),
        version,
        source,
    })
}

/// Deserializes a payload given as JSON text (see [`Event::read_json`]),
/// naming the type and version on failure.
#[doc(hidden)]
pub fn payload_from_str<T: DeserializeOwned>(
    event_type: &str,
    version: u32,
    payload: &serde_json::value::RawValue,
) -> Result<T, DecodeError> {
    serde_json::from_str(payload.get()).map_err(|source| DecodeError::Payload {
        event_type: event_type.to_owned(),
        version,
        source,
    })
}

/// The message of a panic payload.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

/// Runs a typed upcast (deserializing the old payload, then the `Into`
/// steps): a panic in user code becomes this event's decode error.
#[doc(hidden)]
pub fn guarded<T>(
    event_type: &str,
    version: u32,
    convert: impl FnOnce() -> Result<T, DecodeError>,
) -> Result<T, DecodeError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(convert)).unwrap_or_else(|panic| {
        Err(DecodeError::Upcast {
            event_type: event_type.to_owned(),
            version,
            source: UpcastError::new(format!("the upcaster panicked: {}", panic_text(&*panic))),
        })
    })
}

/// Runs one JSON splitter (a retired event read as several), naming the
/// type and version on failure.
#[doc(hidden)]
pub fn split<E>(
    event_type: &str,
    version: u32,
    splitter: fn(serde_json::Value) -> Result<Vec<E>, UpcastError>,
    payload: serde_json::Value,
) -> Result<Vec<E>, DecodeError> {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || splitter(payload)))
        .unwrap_or_else(|panic| {
            Err(UpcastError::new(format!(
                "the splitter panicked: {}",
                panic_text(&*panic)
            )))
        });
    outcome.map_err(|source| DecodeError::Upcast {
        event_type: event_type.to_owned(),
        version,
        source,
    })
}

/// Runs one JSON upcaster, naming the type and version on failure.
#[doc(hidden)]
pub fn upcast(
    event_type: &str,
    version: u32,
    upcaster: fn(serde_json::Value) -> Result<serde_json::Value, UpcastError>,
    payload: serde_json::Value,
) -> Result<serde_json::Value, DecodeError> {
    // An upcaster that panics on a payload it did not expect must not take
    // a consumer down: its panic becomes this event's decode error.
    let outcome = std::panic::catch_unwind(move || upcaster(payload)).unwrap_or_else(|panic| {
        Err(UpcastError::new(format!(
            "the upcaster panicked: {}",
            panic_text(&*panic)
        )))
    });
    outcome.map_err(|source| DecodeError::Upcast {
        event_type: event_type.to_owned(),
        version,
        source,
    })
}
