//! Planning a batch: decoding its messages and deciding, from the
//! positions locked in PostgreSQL alone, what becomes of each one.
//!
//! # Guarantees
//!
//! - The plan never depends on what the projection's code does: every
//!   decision (skip a message below the checkpoint or an event at or below
//!   its stream's position, dead-letter poison and gaps, park what follows
//!   them, skip unread by policy, apply) is taken before the projection is
//!   called, so the batch path and the one-event-at-a-time path decide alike.
//! - Decoding runs user code (typed upcasters, custom `Deserialize`); a
//!   panic there is that message's poison, never the partition's end.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::envelope::{Envelope, HEADER_AGGREGATE_TYPE, WireEnvelope};
use crate::event::{Event, Reading};
use crate::projection::dead_letters::{RawHeaders, decode_headers};
use crate::projection::evolution::{NEWER_VERSION, RETIRED, UNKNOWN_TYPE};
use crate::projection::{NewerVersions, UnknownTypes, panic_message};

/// A message as consumed, owned by the partition's worker: its key, value
/// and headers copied into one buffer (one allocation per message).
#[derive(Debug, Clone)]
pub(crate) struct Message {
    /// Shared by every message of the partition.
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    /// The key, then the value, then the headers as
    /// [`encode_headers_into`](super::dead_letters::encode_headers_into) writes them.
    bytes: Vec<u8>,
    key_len: Option<u32>,
    value_len: Option<u32>,
}

impl Message {
    /// A message of `topic`'s `partition` at `offset`, copied.
    pub(crate) fn new<'h, H>(
        topic: Arc<str>,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: H,
    ) -> Self
    where
        H: IntoIterator<Item = (&'h str, Option<&'h [u8]>)> + Clone,
    {
        let size = key.map_or(0, <[u8]>::len)
            + value.map_or(0, <[u8]>::len)
            + super::dead_letters::encoded_headers_len(headers.clone());
        let mut bytes = Vec::with_capacity(size);
        bytes.extend_from_slice(key.unwrap_or_default());
        bytes.extend_from_slice(value.unwrap_or_default());
        super::dead_letters::encode_headers_into(&mut bytes, headers);
        Message {
            topic,
            partition,
            offset,
            bytes,
            key_len: key.map(|k| k.len() as u32),
            value_len: value.map(|v| v.len() as u32),
        }
    }

    /// The key, if it has one.
    pub(crate) fn key(&self) -> Option<&[u8]> {
        Some(&self.bytes[..self.key_len? as usize])
    }

    /// The value, if it has one.
    pub(crate) fn value(&self) -> Option<&[u8]> {
        let start = self.key_len.unwrap_or(0) as usize;
        Some(&self.bytes[start..start + self.value_len? as usize])
    }

    /// The headers, exactly, as
    /// [`encode_headers_into`](super::dead_letters::encode_headers_into) writes them:
    /// read only for what is parked.
    pub(crate) fn raw_headers(&self) -> &[u8] {
        let start = self.key_len.unwrap_or(0) as usize + self.value_len.unwrap_or(0) as usize;
        &self.bytes[start..]
    }

    /// The headers, one by one.
    fn headers(&self) -> RawHeaders {
        decode_headers(self.raw_headers()).unwrap_or_default()
    }

    /// The last value of header `key`, as text.
    fn header(&self, key: &str) -> Option<String> {
        self.headers()
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| String::from_utf8_lossy(v.as_deref().unwrap_or_default()).into_owned())
    }

    /// The headers as readable text (`tidings_parked.headers`): lossy UTF-8,
    /// the last value of a repeated key; the exact ones are kept beside.
    pub(super) fn readable_headers(&self) -> BTreeMap<String, String> {
        self.headers()
            .iter()
            .map(|(k, v)| {
                (
                    clean(k),
                    clean(&String::from_utf8_lossy(v.as_deref().unwrap_or_default())),
                )
            })
            .collect()
    }
}

/// A stream: its aggregate type and id, as the runner keys them.
pub(super) type Stream = (String, String);

/// A map keyed by streams (or offsets): foldhash, where SipHash showed in
/// the runner's profile; still seeded per process, since the keys come
/// from the topic.
pub(super) type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A set of streams (see [`Map`]).
pub(super) type Set<K> = HashSet<K, foldhash::fast::RandomState>;

/// A message, decoded.
pub(super) enum Decoded<E> {
    /// An event to apply.
    Event(Envelope<E>),
    /// A stored event that reads as several (a split), applied together.
    Split(Vec<Envelope<E>>),
    /// Not read, by policy: its sequence, type, version and why.
    Ignored(i64, String, i32, &'static str),
    /// Why it cannot be applied, and its sequence when the envelope was readable.
    Poison(String, Option<i64>),
}

impl<E> Decoded<E> {
    /// Its sequence in its stream, when its envelope was readable (a
    /// split's parts share their stored event's).
    pub(super) fn sequence(&self) -> Option<i64> {
        match self {
            Decoded::Event(e) => Some(e.sequence as i64),
            Decoded::Split(parts) => parts.first().map(|e| e.sequence as i64),
            Decoded::Ignored(sequence, ..) => Some(*sequence),
            Decoded::Poison(_, sequence) => *sequence,
        }
    }
}

/// The stream a message that is not an envelope is parked under.
fn stream_of(message: &Message) -> Stream {
    let id = message
        .key()
        .map(|k| clean(&String::from_utf8_lossy(k)))
        .unwrap_or_default();
    let kind = message
        .header(HEADER_AGGREGATE_TYPE)
        .map(|t| clean(&t))
        .unwrap_or_else(|| "?".into());
    (kind, id)
}

/// The longest aggregate type or id kept as it is, in bytes. Longer ones
/// (only a foreign producer can write them: the store refuses ids over 512
/// bytes) are dead-lettered under a shortened identity, since an index
/// entry cannot hold them.
const MAX_IDENTITY_BYTES: usize = 512;

/// PostgreSQL text cannot hold NUL: input from the topic is stored with
/// NUL replaced, and an identity too long for an index is shortened (a
/// prefix and a hash of the whole), so that bad input is parked rather
/// than failing forever.
pub(super) fn clean(text: &str) -> String {
    let text = text.replace('\0', "\u{FFFD}");
    if text.len() <= MAX_IDENTITY_BYTES {
        return text;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(text.as_bytes());
    let mut cut = 200;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}…#{hex}", &text[..cut])
}

/// Why an envelope's identity cannot be applied, if it cannot.
fn oversized<P>(raw: &Envelope<P>) -> Option<String> {
    [
        ("aggregate type", &raw.aggregate_type),
        ("aggregate id", &raw.aggregate_id),
    ]
    .into_iter()
    .find(|(_, v)| v.len() > MAX_IDENTITY_BYTES)
    .map(|(what, v)| {
        format!(
            "{what} of {} bytes exceeds the limit of {MAX_IDENTITY_BYTES} bytes",
            v.len()
        )
    })
}

/// Decodes a batch's messages; a message in `poison` (known poison, by
/// offset) is poison whatever it holds.
pub(super) fn decode_all<E: Event>(
    messages: &[Message],
    poison: &HashMap<i64, String>,
    (unknown_types, newer_versions): (UnknownTypes, NewerVersions),
) -> Vec<(Stream, Decoded<E>)> {
    messages
        .iter()
        .map(|m| {
            let raw = match m.value() {
                Some(bytes) => WireEnvelope::from_wire(bytes),
                None => Err(crate::DecodeError::Envelope("empty message".into())),
            };
            match raw {
                Ok(raw) => {
                    let stream = (clean(&raw.aggregate_type), clean(&raw.aggregate_id));
                    // A sequence outside 1..=i64::MAX is bad input, never a
                    // duplicate to skip in silence.
                    let Some(sequence) = i64::try_from(raw.sequence).ok().filter(|s| *s > 0)
                    else {
                        let reason = format!(
                            "invalid sequence {}: sequences start at 1 and fit in a signed 64-bit integer",
                            raw.sequence
                        );
                        return (stream, Decoded::Poison(reason, None));
                    };
                    let at = sequence;
                    let sequence = Some(sequence);
                    if let Some(reason) = poison.get(&m.offset).cloned().or_else(|| oversized(&raw))
                    {
                        return (stream, Decoded::Poison(reason, sequence));
                    }
                    // Decoding runs user code (typed upcasters, custom
                    // Deserialize impls): a panic there is this event's
                    // poison, never the partition's end.
                    let (event_type, version) = (raw.event_type.clone(), raw.event_version);
                    let decoding = std::panic::AssertUnwindSafe(|| raw.read::<E>());
                    match std::panic::catch_unwind(decoding) {
                        Ok(Ok(Reading::One(envelope))) => (stream, Decoded::Event(envelope)),
                        Ok(Ok(Reading::Split(envelopes))) if !envelopes.is_empty() => {
                            (stream, Decoded::Split(envelopes))
                        }
                        // Retired, or split into nothing: skipped unread.
                        Ok(Ok(Reading::Retired | Reading::Split(_))) => {
                            let ignored =
                                Decoded::Ignored(at, clean(&event_type), version as i32, RETIRED);
                            (stream, ignored)
                        }
                        Ok(Err(e)) if let Some(why) = skipped_unread(&e, unknown_types, newer_versions) => {
                            let ignored =
                                Decoded::Ignored(at, clean(&event_type), version as i32, why);
                            (stream, ignored)
                        }
                        Ok(Err(e)) => (stream, Decoded::Poison(e.to_string(), sequence)),
                        Err(panic) => {
                            let reason = format!("decoding panicked: {}", panic_message(&*panic));
                            (stream, Decoded::Poison(reason, sequence))
                        }
                    }
                }
                Err(e) => {
                    let reason = poison
                        .get(&m.offset)
                        .cloned()
                        .unwrap_or_else(|| e.to_string());
                    (stream_of(m), Decoded::Poison(reason, None))
                }
            }
        })
        .collect()
}

/// Why an event that does not decode is skipped unread under the
/// projection's policies, if it is.
fn skipped_unread(
    error: &crate::DecodeError,
    unknown_types: UnknownTypes,
    newer_versions: NewerVersions,
) -> Option<&'static str> {
    match error {
        crate::DecodeError::UnknownType { .. } if unknown_types == UnknownTypes::Skip => {
            Some(UNKNOWN_TYPE)
        }
        crate::DecodeError::FutureVersion { .. } if newer_versions == NewerVersions::Skip => {
            Some(NEWER_VERSION)
        }
        _ => None,
    }
}

/// What becomes of one fresh message of a batch.
pub(super) enum Action<'m, E> {
    /// Already applied (a duplicate): nothing to do.
    Skip,
    /// Skipped unread by policy: counted under its type, version and
    /// reason, its position taken like an applied event's.
    Ignore {
        /// Its sequence.
        sequence: i64,
        /// Its type, version and why it was not read.
        kind: (&'m str, i32, &'static str),
    },
    /// Set aside in `tidings_parked`: dead-lettered, or parked behind an
    /// earlier dead letter of its stream.
    Park {
        /// Whether it is a dead letter (else parked behind one).
        dead_letter: bool,
        /// Why.
        reason: String,
    },
    /// Applied: the event, or a split's events, in order.
    Apply(&'m [Envelope<E>]),
}

/// One fresh message and what becomes of it.
pub(super) struct Planned<'m, E> {
    pub(super) message: &'m Message,
    pub(super) stream: &'m Stream,
    /// Its sequence, when its envelope was readable.
    pub(super) sequence: Option<i64>,
    pub(super) action: Action<'m, E>,
}

/// Why an event is parked behind its stream's dead letter.
pub(super) const PARKED_BEHIND: &str = "parked behind an earlier dead-lettered event of its stream";

/// Decides what becomes of each fresh message (in offset order), given
/// each stream's position and the streams with parked events. Streams
/// that a dead letter of this batch blocks are added to `blocked`.
pub(super) fn plan<'m, E>(
    fresh: &[(&'m Message, &'m (Stream, Decoded<E>))],
    last_sequence: &Map<Stream, i64>,
    blocked: &mut Set<Stream>,
) -> Vec<Planned<'m, E>> {
    let mut position: Map<&Stream, i64> = Map::default();
    let gap = |last: i64, stream: &Stream, sequence: i64| {
        format!(
            "sequence gap: expected {} of {}/{}, got {sequence}",
            last + 1,
            stream.0,
            stream.1
        )
    };
    fresh
        .iter()
        .map(|&(message, (stream, item))| {
            let sequence = item.sequence();
            let last = position
                .get(stream)
                .copied()
                .unwrap_or_else(|| last_sequence.get(stream).copied().unwrap_or(0));
            let action = if blocked.contains(stream) {
                Action::Park {
                    dead_letter: false,
                    reason: PARKED_BEHIND.to_owned(),
                }
            } else {
                match item {
                    // Already applied (a republished duplicate that no
                    // longer decodes, say after a variant was removed):
                    // skipped, never a reason to park an up-to-date stream.
                    _ if sequence.is_some_and(|s| s <= last) => Action::Skip,
                    Decoded::Poison(reason, _) => Action::Park {
                        dead_letter: true,
                        reason: reason.clone(),
                    },
                    _ if sequence.is_some_and(|s| s > last + 1) => Action::Park {
                        dead_letter: true,
                        reason: gap(last, stream, sequence.unwrap_or_default()),
                    },
                    Decoded::Ignored(s, event_type, version, why) => {
                        position.insert(stream, *s);
                        Action::Ignore {
                            sequence: *s,
                            kind: (event_type.as_str(), *version, *why),
                        }
                    }
                    Decoded::Event(envelope) => {
                        position.insert(stream, envelope.sequence as i64);
                        Action::Apply(std::slice::from_ref(envelope))
                    }
                    Decoded::Split(envelopes) => {
                        position.insert(stream, sequence.unwrap_or_default());
                        Action::Apply(envelopes)
                    }
                }
            };
            if matches!(
                action,
                Action::Park {
                    dead_letter: true,
                    ..
                }
            ) {
                blocked.insert(stream.clone());
            }
            Planned {
                message,
                stream,
                sequence,
                action,
            }
        })
        .collect()
}

/// Events skipped unread, counted per type, version and reason.
pub(super) type Ignored<'m> = BTreeMap<(&'m str, i32, &'static str), i64>;

/// What a batch's plan adds up to, once carried out: the positions to
/// save, the events skipped unread per type, version and reason.
pub(super) fn positions<'m, E>(planned: &[Planned<'m, E>]) -> (Map<&'m Stream, i64>, Ignored<'m>) {
    let mut positions = Map::default();
    let mut ignored = BTreeMap::new();
    for p in planned {
        match &p.action {
            Action::Apply(_) => {
                positions.insert(p.stream, p.sequence.unwrap_or_default());
            }
            Action::Ignore { sequence, kind } => {
                positions.insert(p.stream, *sequence);
                *ignored.entry(*kind).or_insert(0) += 1;
            }
            Action::Skip | Action::Park { .. } => {}
        }
    }
    (positions, ignored)
}
