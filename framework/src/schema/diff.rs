//! What changed between two JSON Schemas of one payload, and whether it
//! breaks anyone.
//!
//! A change is *compatible* when both sides keep working across it: stored
//! and in-flight payloads of the old shape still decode with the new code,
//! and consumers still built with the old shape still decode what the new
//! code emits. Concretely:
//!
//! | change | class |
//! |---|---|
//! | a new optional field (not in `required`) | compatible, unless the old shape refused unknown fields |
//! | descriptions, titles, examples | compatible |
//! | a new required field | breaking: stored payloads lack it |
//! | a field removed | breaking: consumers of the old shape require it or lose it |
//! | a field's type changed (including nullability and enum values) | breaking |
//! | a field made required, or made optional | breaking: one side rejects what the other writes |
//!
//! References (`$ref` into `$defs`) are followed, so a change inside a
//! nested type is reported at the field that holds it.

use std::collections::{BTreeSet, HashSet};
use std::fmt;

use serde_json::{Map, Value};

/// One difference between a locked schema and the code's, at a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldChange {
    /// Where: `.amount`, `.lines[].sku`, or `(payload)` for the whole payload.
    pub path: String,
    /// What changed.
    pub kind: FieldChangeKind,
}

/// The kinds of [`FieldChange`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldChangeKind {
    /// A field that is not required was added.
    AddedOptional,
    /// A field was added although the old shape refused unknown fields.
    AddedToClosedObject,
    /// A required field was added.
    AddedRequired,
    /// A field was removed.
    Removed,
    /// A field's type changed (from, to: short descriptions).
    Retyped(String, String),
    /// An optional field became required.
    NowRequired,
    /// A required field became optional.
    NowOptional,
    /// Only annotations (descriptions, titles, examples) differ.
    Annotations,
    /// A field of an old version that its upcaster no longer reads: stored
    /// payloads keep it, nothing writes that version any more.
    NotRead,
}

impl FieldChange {
    /// Whether the change breaks readers of either side.
    pub fn breaking(&self) -> bool {
        !matches!(
            self.kind,
            FieldChangeKind::AddedOptional
                | FieldChangeKind::Annotations
                | FieldChangeKind::NotRead
        )
    }
}

impl fmt::Display for FieldChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = &self.path;
        match &self.kind {
            FieldChangeKind::AddedOptional => write!(f, "optional field `{path}` added"),
            FieldChangeKind::AddedToClosedObject => write!(
                f,
                "field `{path}` added to an object that refuses unknown fields (consumers of the old shape reject it)"
            ),
            FieldChangeKind::AddedRequired => {
                write!(f, "required field `{path}` added (stored payloads lack it)")
            }
            FieldChangeKind::Removed => write!(
                f,
                "field `{path}` removed (consumers of the old shape need it)"
            ),
            FieldChangeKind::Retyped(from, to) => {
                write!(f, "field `{path}` changed type from {from} to {to}")
            }
            FieldChangeKind::NowRequired => write!(
                f,
                "field `{path}` is now required (stored payloads may lack it)"
            ),
            FieldChangeKind::NowOptional => write!(
                f,
                "field `{path}` is now optional (consumers of the old shape reject payloads without it)"
            ),
            FieldChangeKind::Annotations => {
                write!(f, "descriptions or titles changed at `{path}`")
            }
            FieldChangeKind::NotRead => write!(
                f,
                "field `{path}` is no longer read by the upcaster (stored payloads keep it)"
            ),
        }
    }
}

/// The changes from `old` to `new` (two root schemas, each with its own
/// `$defs`), in field order. Empty when they describe the same shape with
/// the same annotations.
pub fn compare(old: &Value, new: &Value) -> Vec<FieldChange> {
    let mut changes = Vec::new();
    let roots = Roots { old, new };
    roots.walk("", old, new, &mut changes, 0);
    if changes.is_empty() && shape(old, old, 0) != shape(new, new, 0) {
        // A difference the walk did not place (past its depth, say) is
        // never taken for a compatible one.
        changes.push(FieldChange {
            path: "(payload)".into(),
            kind: FieldChangeKind::Retyped(summary(old), summary(new)),
        });
    } else if changes.is_empty() && old != new {
        changes.push(FieldChange {
            path: "(payload)".into(),
            kind: FieldChangeKind::Annotations,
        });
    }
    changes
}

/// The changes to the schema of a version nothing writes any more (read
/// through an upcaster): only what stored payloads must still satisfy
/// counts. A field removed or made optional is one the upcaster no longer
/// reads, and a field added to a closed object is optional for it.
pub fn for_stored_only(changes: Vec<FieldChange>) -> Vec<FieldChange> {
    changes
        .into_iter()
        .map(|mut change| {
            change.kind = match change.kind {
                FieldChangeKind::Removed | FieldChangeKind::NowOptional => FieldChangeKind::NotRead,
                FieldChangeKind::AddedToClosedObject => FieldChangeKind::AddedOptional,
                kind => kind,
            };
            change
        })
        .collect()
}

/// How deep references and nesting are followed (recursive types stop here).
const MAX_DEPTH: usize = 32;

struct Roots<'a> {
    old: &'a Value,
    new: &'a Value,
}

impl Roots<'_> {
    fn walk(&self, path: &str, old: &Value, new: &Value, out: &mut Vec<FieldChange>, depth: usize) {
        if depth > MAX_DEPTH {
            return;
        }
        let old = resolve(self.old, old);
        let new = resolve(self.new, new);
        let shown = if path.is_empty() { "(payload)" } else { path };
        let annotated = |v: &Value| (v.get("description").cloned(), v.get("title").cloned());
        if annotated(old) != annotated(new) {
            out.push(FieldChange {
                path: shown.into(),
                kind: FieldChangeKind::Annotations,
            });
        }
        match (properties(old), properties(new)) {
            (Some(old_props), Some(new_props)) => {
                let old_required = required(old);
                let new_required = required(new);
                let closed = old.get("additionalProperties") == Some(&Value::Bool(false));
                for (name, old_field) in old_props {
                    let at = format!("{path}.{name}");
                    let Some(new_field) = new_props.get(name) else {
                        out.push(FieldChange {
                            path: at,
                            kind: FieldChangeKind::Removed,
                        });
                        continue;
                    };
                    match (old_required.contains(name), new_required.contains(name)) {
                        (false, true) => out.push(FieldChange {
                            path: at.clone(),
                            kind: FieldChangeKind::NowRequired,
                        }),
                        (true, false) => out.push(FieldChange {
                            path: at.clone(),
                            kind: FieldChangeKind::NowOptional,
                        }),
                        _ => {}
                    }
                    self.walk(&at, old_field, new_field, out, depth + 1);
                }
                for name in new_props.keys().filter(|n| !old_props.contains_key(*n)) {
                    let kind = if new_required.contains(name) {
                        FieldChangeKind::AddedRequired
                    } else if closed {
                        FieldChangeKind::AddedToClosedObject
                    } else {
                        FieldChangeKind::AddedOptional
                    };
                    out.push(FieldChange {
                        path: format!("{path}.{name}"),
                        kind,
                    });
                }
                // What else the object says (closedness, pattern properties…).
                let rest = |root: &Value, v: &Value| {
                    let mut v = shape(root, v, 0);
                    if let Value::Object(map) = &mut v {
                        map.remove("properties");
                        map.remove("required");
                    }
                    v
                };
                let (old_rest, new_rest) = (rest(self.old, old), rest(self.new, new));
                if old_rest != new_rest {
                    out.push(FieldChange {
                        path: shown.into(),
                        kind: FieldChangeKind::Retyped(summary(old), summary(new)),
                    });
                }
            }
            _ if old.get("items").is_some()
                && new.get("items").is_some()
                && types(old) == types(new) =>
            {
                // The array itself (lengths, uniqueness), then its items.
                let without_items = |root: &Value, v: &Value| {
                    let mut v = shape(root, v, 0);
                    if let Value::Object(map) = &mut v {
                        map.remove("items");
                    }
                    v
                };
                if without_items(self.old, old) != without_items(self.new, new) {
                    out.push(FieldChange {
                        path: shown.into(),
                        kind: FieldChangeKind::Retyped(summary(old), summary(new)),
                    });
                }
                self.walk(
                    &format!("{path}[]"),
                    &old["items"],
                    &new["items"],
                    out,
                    depth + 1,
                );
            }
            _ => {
                if shape(self.old, old, 0) != shape(self.new, new, 0) {
                    out.push(FieldChange {
                        path: shown.into(),
                        kind: FieldChangeKind::Retyped(summary(old), summary(new)),
                    });
                }
            }
        }
    }
}

/// Follows `$ref`s into the root's `$defs` (or `definitions`).
fn resolve<'a>(root: &'a Value, mut node: &'a Value) -> &'a Value {
    let mut seen = HashSet::new();
    while let Some(Value::String(reference)) = node.get("$ref") {
        if !seen.insert(reference.clone()) {
            break;
        }
        match lookup(root, reference) {
            Some(target) => node = target,
            None => break,
        }
    }
    node
}

fn lookup<'a>(root: &'a Value, reference: &str) -> Option<&'a Value> {
    let pointer = reference.strip_prefix('#')?;
    root.pointer(pointer)
}

fn properties(node: &Value) -> Option<&Map<String, Value>> {
    node.get("properties").and_then(Value::as_object)
}

fn required(node: &Value) -> BTreeSet<String> {
    node.get("required")
        .and_then(Value::as_array)
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn types(node: &Value) -> BTreeSet<String> {
    match node.get("type") {
        Some(Value::String(t)) => BTreeSet::from([t.clone()]),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect(),
        _ => BTreeSet::new(),
    }
}

/// Keywords that do not constrain a payload.
const ANNOTATIONS: &[&str] = &[
    "description",
    "title",
    "examples",
    "$schema",
    "$defs",
    "definitions",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
    "default",
];

/// The node with references inlined and annotations dropped: what a
/// payload must look like, nothing else. Lists of types are sorted.
fn shape(root: &Value, node: &Value, depth: usize) -> Value {
    let node = resolve(root, node);
    if depth > MAX_DEPTH {
        return Value::Null;
    }
    match node {
        Value::Object(map) => {
            let mut out = Map::new();
            for (key, value) in map {
                if ANNOTATIONS.contains(&key.as_str()) || key == "$ref" {
                    continue;
                }
                let value = match (key.as_str(), value) {
                    ("type", Value::Array(_)) => {
                        Value::Array(types(node).into_iter().map(Value::String).collect())
                    }
                    ("required" | "enum", Value::Array(items)) => {
                        let mut items: Vec<String> = items.iter().map(|v| v.to_string()).collect();
                        items.sort();
                        Value::Array(items.into_iter().map(Value::String).collect())
                    }
                    ("properties" | "patternProperties", Value::Object(fields)) => Value::Object(
                        fields
                            .iter()
                            .map(|(k, v)| (k.clone(), shape(root, v, depth + 1)))
                            .collect(),
                    ),
                    _ => shape(root, value, depth + 1),
                };
                out.insert(key.clone(), value);
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|item| shape(root, item, depth + 1))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A short description of a node's type: `string`, `integer | null`,
/// `array`, `object`, `one of 3 variants`, `one of "EUR", "USD"`.
fn summary(node: &Value) -> String {
    if let Some(Value::Array(values)) = node.get("enum") {
        let shown: Vec<String> = values.iter().map(Value::to_string).collect();
        return format!("one of {}", shown.join(", "));
    }
    if let Some(value) = node.get("const") {
        return format!("the constant {value}");
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(Value::Array(variants)) = node.get(key) {
            return format!("one of {} variants", variants.len());
        }
    }
    let mut types: Vec<String> = types(node).into_iter().collect();
    if let Some(format) = node.get("format").and_then(Value::as_str) {
        for t in &mut types {
            if t != "null" {
                *t = format!("{t} ({format})");
            }
        }
    }
    if types.is_empty() {
        "any value".into()
    } else {
        types.join(" | ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kinds(old: Value, new: Value) -> Vec<(String, FieldChangeKind)> {
        compare(&old, &new)
            .into_iter()
            .map(|c| (c.path, c.kind))
            .collect()
    }

    #[test]
    fn a_new_optional_field_is_compatible_and_a_new_required_one_breaks() {
        let old =
            json!({"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]});
        let optional = json!({"type": "object", "properties": {"id": {"type": "string"}, "note": {"type": ["string", "null"]}}, "required": ["id"]});
        let required = json!({"type": "object", "properties": {"id": {"type": "string"}, "note": {"type": "string"}}, "required": ["id", "note"]});
        let changes = compare(&old, &optional);
        assert_eq!(changes.len(), 1);
        assert!(!changes[0].breaking(), "{}", changes[0]);
        assert_eq!(
            kinds(old, required),
            vec![(".note".into(), FieldChangeKind::AddedRequired)]
        );
    }

    #[test]
    fn removed_and_retyped_fields_break_inside_referenced_types() {
        let old = json!({"type": "object", "properties": {"line": {"$ref": "#/$defs/Line"}}, "required": ["line"],
            "$defs": {"Line": {"type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}}, "required": ["sku", "qty"]}}});
        let new = json!({"type": "object", "properties": {"line": {"$ref": "#/$defs/Line"}}, "required": ["line"],
            "$defs": {"Line": {"type": "object", "properties": {"qty": {"type": "number"}}, "required": ["qty"]}}});
        assert_eq!(
            kinds(old, new),
            vec![
                (".line.sku".into(), FieldChangeKind::Removed),
                (
                    ".line.qty".into(),
                    FieldChangeKind::Retyped("integer".into(), "number".into())
                ),
            ]
        );
    }

    #[test]
    fn an_array_whose_length_changed_breaks() {
        let old = json!({"type": "object", "properties": {"key": {"type": "array", "items": {"type": "integer"}}}, "required": ["key"]});
        let new = json!({"type": "object", "properties": {"key": {"type": "array", "items": {"type": "integer"}, "minItems": 32, "maxItems": 32}}, "required": ["key"]});
        let changes = compare(&old, &new);
        assert!(changes.iter().any(FieldChange::breaking), "{changes:?}");
        assert_eq!(changes[0].path, ".key");
    }

    #[test]
    fn descriptions_alone_are_compatible_annotations() {
        let old = json!({"type": "object", "properties": {"id": {"type": "string"}}});
        let new = json!({"type": "object", "description": "An order.", "properties": {"id": {"type": "string", "description": "Its id."}}});
        assert_eq!(
            kinds(old, new),
            vec![
                ("(payload)".into(), FieldChangeKind::Annotations),
                (".id".into(), FieldChangeKind::Annotations),
            ]
        );
        assert!(
            !FieldChange {
                path: ".id".into(),
                kind: FieldChangeKind::Annotations
            }
            .breaking()
        );
    }

    #[test]
    fn nullability_enum_values_and_requiredness_break() {
        let old = json!({"type": "object", "properties": {"c": {"type": "string", "enum": ["EUR"]}, "n": {"type": "integer"}}, "required": ["c"]});
        let new = json!({"type": "object", "properties": {"c": {"type": "string", "enum": ["EUR", "USD"]}, "n": {"type": ["integer", "null"]}}, "required": ["n"]});
        let changes = compare(&old, &new);
        assert!(changes.iter().all(FieldChange::breaking), "{changes:?}");
        let paths: Vec<&str> = changes.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, vec![".c", ".c", ".n", ".n"], "{changes:?}");
    }
}
