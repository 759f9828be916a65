//! The envelope: an event with everything needed to understand it alone.
//!
//! On Kafka the envelope travels as self-describing JSON, flat fields plus
//! the payload:
//!
//! ```json
//! {"event_type":"OrderCreated","event_version":1,
//!  "event_id":"0196a0b2-6a4e-7b6c-9d7e-3f2a1b0c9d8e","timestamp":"2026-04-16T10:30:00Z",
//!  "aggregate_type":"order","aggregate_id":"ORD-123","sequence":1,
//!  "correlation_id":null,"causation_id":null,"metadata":{},
//!  "payload":{"order_id":"ORD-123","user_id":"USR-456","amount":1499.99}}
//! ```
//!
//! The message key is the aggregate id, and the headers repeat
//! [`HEADER_EVENT_TYPE`], [`HEADER_EVENT_VERSION`], [`HEADER_EVENT_ID`] and
//! [`HEADER_AGGREGATE_TYPE`] so that a consumer can route without parsing.
//! Serializing and parsing round-trip exactly: field order, payload key order
//! and timestamps (microsecond precision, as PostgreSQL keeps them) survive.

use std::collections::BTreeMap;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::{DecodeError, Event, Reading};

/// Header carrying the event's wire name.
pub const HEADER_EVENT_TYPE: &str = "event_type";
/// Header carrying the event's version (decimal).
pub const HEADER_EVENT_VERSION: &str = "event_version";
/// Header carrying the event id (UUID).
pub const HEADER_EVENT_ID: &str = "event_id";
/// Header carrying the aggregate type.
pub const HEADER_AGGREGATE_TYPE: &str = "aggregate_type";

/// An event with its identity, origin and position in its stream.
///
/// `P` is the payload: [`serde_json::Value`] for the raw form that is stored
/// and sent ([`RawEnvelope`]), or an [`Event`] once decoded.
///
/// ```
/// use tidings::RawEnvelope;
///
/// let json = r#"{"event_type":"OrderCreated","event_version":1,"event_id":"0196a0b2-6a4e-7b6c-9d7e-3f2a1b0c9d8e","timestamp":"2026-04-16T10:30:00Z","aggregate_type":"order","aggregate_id":"ORD-123","sequence":1,"correlation_id":null,"causation_id":null,"metadata":{},"payload":{"order_id":"ORD-123","amount":1499.99}}"#;
/// let envelope = RawEnvelope::from_slice(json.as_bytes()).unwrap();
/// assert_eq!(envelope.aggregate_id, "ORD-123");
/// assert_eq!(envelope.to_json(), json);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<P = serde_json::Value> {
    /// The event's wire name.
    pub event_type: String,
    /// The version of the payload's shape.
    pub event_version: u32,
    /// A UUID v7, unique across the store; consumers dedupe on it or on
    /// (aggregate, sequence).
    pub event_id: Uuid,
    /// When the event was recorded (UTC, microsecond precision).
    pub timestamp: DateTime<Utc>,
    /// The aggregate's type name, e.g. `order`.
    pub aggregate_type: String,
    /// The aggregate's id; also the Kafka message key.
    pub aggregate_id: String,
    /// Position in the aggregate's stream: 1, 2, 3, … without gaps.
    pub sequence: u64,
    /// Ties together everything caused by one request.
    pub correlation_id: Option<String>,
    /// The id of the message that caused this one.
    pub causation_id: Option<String>,
    /// Free-form string metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// The event's payload.
    pub payload: P,
}

/// An envelope whose payload is still JSON: what the store keeps and Kafka carries.
pub type RawEnvelope = Envelope<serde_json::Value>;

/// What a command carries into the events it produces: correlation,
/// causation and metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventContext {
    /// Copied into every event's `correlation_id`.
    pub correlation_id: Option<String>,
    /// Copied into every event's `causation_id`.
    pub causation_id: Option<String>,
    /// Copied into every event's `metadata`.
    pub metadata: BTreeMap<String, String>,
}

impl EventContext {
    /// An empty context.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the correlation id.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the causation id.
    pub fn causation_id(mut self, id: impl Into<String>) -> Self {
        self.causation_id = Some(id.into());
        self
    }

    /// Adds one metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// A context for events caused by `envelope`: same correlation id (or the
    /// envelope's event id when it had none), causation = the envelope's event id.
    pub fn caused_by<P>(envelope: &Envelope<P>) -> Self {
        EventContext {
            correlation_id: Some(
                envelope
                    .correlation_id
                    .clone()
                    .unwrap_or_else(|| envelope.event_id.to_string()),
            ),
            causation_id: Some(envelope.event_id.to_string()),
            metadata: BTreeMap::new(),
        }
    }
}

/// The current time at the precision PostgreSQL stores (microseconds), so a
/// timestamp reads back equal to what was written.
pub fn now_micros() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

impl RawEnvelope {
    /// Parses an envelope from JSON bytes; any malformation is a
    /// [`DecodeError::Envelope`] saying what is wrong.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, DecodeError> {
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Envelope(e.to_string()))
    }

    /// The envelope as compact JSON, in the documented field order.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a JSON value and plain fields always serialize")
    }

    /// Decodes the payload into `E`, running upcasters. The returned
    /// envelope carries the *current* type name and version. A retired or
    /// split event is an error here: [`RawEnvelope::read`] reads those.
    pub fn decode<E: Event>(self) -> Result<Envelope<E>, DecodeError> {
        let (origin, payload) = self.take_payload();
        let event = E::decode(&origin.event_type, origin.event_version, payload)?;
        Ok(origin.wrap(event))
    }

    /// Reads the payload as the events it stands for today ([`Event::read`]):
    /// one envelope, a split's several, or none for a retired type.
    ///
    /// A split's envelopes keep this envelope's sequence, timestamp and
    /// context, each with its own current type and version. The first keeps
    /// the event id; each later one gets an id derived from it and its
    /// place ([`part_id`]), the same on every read, so that consumers that
    /// deduplicate on `event_id` keep every part.
    pub fn read<E: Event>(self) -> Result<Reading<Envelope<E>>, DecodeError> {
        let (origin, payload) = self.take_payload();
        let reading = E::read(&origin.event_type, origin.event_version, payload)?;
        Ok(origin.wrap_reading(reading))
    }

    /// The envelope without its payload, and the payload.
    fn take_payload(self) -> (Envelope<()>, serde_json::Value) {
        self.replace_payload(())
    }

    /// Wraps and encodes a new event: a fresh UUID v7, the current time,
    /// and the given stream position and context.
    pub fn from_event<E: Event>(
        aggregate_type: &str,
        aggregate_id: &str,
        sequence: u64,
        event: &E,
        context: &EventContext,
    ) -> Result<Self, serde_json::Error> {
        Ok(Envelope {
            event_type: event.event_type().to_owned(),
            event_version: event.event_version(),
            event_id: Uuid::now_v7(),
            timestamp: now_micros(),
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            sequence,
            correlation_id: context.correlation_id.clone(),
            causation_id: context.causation_id.clone(),
            metadata: context.metadata.clone(),
            payload: event.to_payload()?,
        })
    }

    /// The headers that repeat the routing fields, as (name, value) pairs.
    pub fn headers(&self) -> [(&'static str, String); 4] {
        [
            (HEADER_EVENT_TYPE, self.event_type.clone()),
            (HEADER_EVENT_VERSION, self.event_version.to_string()),
            (HEADER_EVENT_ID, self.event_id.to_string()),
            (HEADER_AGGREGATE_TYPE, self.aggregate_type.clone()),
        ]
    }
}

/// The event id of part `part` of a split event whose stored id is `id`:
/// `id` itself for the first part, else a UUID (version 8) from a SHA-256
/// of `id` and the part's place, the same on every read.
pub fn part_id(id: Uuid, part: usize) -> Uuid {
    use sha2::Digest;
    if part == 0 {
        return id;
    }
    let mut hash = sha2::Sha256::new();
    hash.update(b"tidings.split-part");
    hash.update(id.as_bytes());
    hash.update((part as u64).to_be_bytes());
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

impl<P> Envelope<P> {
    /// This envelope's identity and context around `payload`, and the
    /// payload it had.
    fn replace_payload<Q>(self, payload: Q) -> (Envelope<Q>, P) {
        let envelope = Envelope {
            event_type: self.event_type,
            event_version: self.event_version,
            event_id: self.event_id,
            timestamp: self.timestamp,
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            sequence: self.sequence,
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            metadata: self.metadata,
            payload,
        };
        (envelope, self.payload)
    }
}

/// An envelope whose payload is kept as JSON text: what a consumer parses
/// first, reading the payload straight into its event type
/// ([`Event::read_json`]) without building a [`serde_json::Value`].
#[cfg(feature = "kafka")]
pub(crate) type WireEnvelope = Envelope<Box<serde_json::value::RawValue>>;

#[cfg(feature = "kafka")]
impl WireEnvelope {
    /// Parses an envelope from JSON bytes, its payload left as text (checked
    /// to be JSON); any malformation is a [`DecodeError::Envelope`].
    pub(crate) fn from_wire(bytes: &[u8]) -> Result<Self, DecodeError> {
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Envelope(e.to_string()))
    }

    /// [`RawEnvelope::read`], reading the payload from its text.
    pub(crate) fn read<E: Event>(self) -> Result<Reading<Envelope<E>>, DecodeError> {
        let (origin, payload) = self.replace_payload(());
        let reading = E::read_json(&origin.event_type, origin.event_version, &payload)?;
        Ok(origin.wrap_reading(reading))
    }
}

impl Envelope<()> {
    /// This envelope around what its payload reads as: a split's parts keep
    /// its sequence and context, each later one with a derived event id.
    fn wrap_reading<E: Event>(self, reading: Reading<E>) -> Reading<Envelope<E>> {
        match reading {
            Reading::One(event) => Reading::One(self.wrap(event)),
            Reading::Split(events) => Reading::Split(
                events
                    .into_iter()
                    .enumerate()
                    .map(|(part, event)| {
                        let mut envelope = self.clone().wrap(event);
                        envelope.event_id = part_id(self.event_id, part);
                        envelope
                    })
                    .collect(),
            ),
            Reading::Retired => Reading::Retired,
        }
    }

    /// This envelope around `event`, with the event's current type and version.
    fn wrap<E: Event>(self, event: E) -> Envelope<E> {
        let event_type = event.event_type().to_owned();
        let event_version = event.event_version();
        let (mut envelope, ()) = self.replace_payload(event);
        envelope.event_type = event_type;
        envelope.event_version = event_version;
        envelope
    }
}

impl<E: Event> Envelope<E> {
    /// Wraps a new event: a fresh UUID v7, the current time, and the given
    /// stream position and context.
    pub fn new(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        sequence: u64,
        event: E,
        context: &EventContext,
    ) -> Self {
        Envelope {
            event_type: event.event_type().to_owned(),
            event_version: event.event_version(),
            event_id: Uuid::now_v7(),
            timestamp: now_micros(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            sequence,
            correlation_id: context.correlation_id.clone(),
            causation_id: context.causation_id.clone(),
            metadata: context.metadata.clone(),
            payload: event,
        }
    }

    /// Encodes the payload to JSON, giving the raw form that is stored and sent.
    pub fn encode(&self) -> Result<RawEnvelope, serde_json::Error> {
        Ok(Envelope {
            event_type: self.event_type.clone(),
            event_version: self.event_version,
            event_id: self.event_id,
            timestamp: self.timestamp,
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            sequence: self.sequence,
            correlation_id: self.correlation_id.clone(),
            causation_id: self.causation_id.clone(),
            metadata: self.metadata.clone(),
            payload: self.payload.to_payload()?,
        })
    }
}
