//! Rules across variants and upcasters, checked before any code is written.

use std::collections::BTreeMap;

use syn::{Error, Result};

use crate::ast::Input;
use crate::attr::UpcastKind;

pub(crate) fn validate(input: &Input<'_>) -> Result<()> {
    let mut errors: Vec<Error> = Vec::new();

    if let Some(topic) = &input.topic
        && let Err(why) = topic_name_problem(topic)
    {
        errors.push(Error::new(
            input.ident.span(),
            format!("invalid topic `{topic}`: {why}"),
        ));
    }

    // Every (wire name, version) a variant decodes must belong to one variant only.
    let mut keys: BTreeMap<(String, u32), String> = BTreeMap::new();
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for variant in &input.variants {
        if let Some(first) = names.insert(variant.name.clone(), variant.ident.to_string()) {
            errors.push(Error::new(
                variant.name_span,
                format!(
                    "duplicate event name `{}`: variant `{first}` already uses it",
                    variant.name
                ),
            ));
            continue;
        }
        keys.insert(
            (variant.name.clone(), variant.version),
            variant.ident.to_string(),
        );
    }

    for variant in &input.variants {
        let mut froms: BTreeMap<u32, &crate::attr::Upcast> = BTreeMap::new();
        for upcast in &variant.upcasts {
            if upcast.from >= variant.version {
                errors.push(Error::new(
                    upcast.from_span,
                    format!(
                        "upcaster from version {} of `{}` is not below its current version {}; raise `version` or remove the upcaster",
                        upcast.from, variant.name, variant.version
                    ),
                ));
                continue;
            }
            if froms.insert(upcast.from, upcast).is_some() {
                errors.push(Error::new(
                    upcast.from_span,
                    format!(
                        "duplicate upcaster from version {} of `{}`",
                        upcast.from, variant.name
                    ),
                ));
                continue;
            }
            let key = (variant.name_at(upcast.from), upcast.from);
            if let Some(other) = keys.insert(key.clone(), variant.ident.to_string()) {
                errors.push(Error::new(
                    upcast.span,
                    format!(
                        "`{}` version {} is already decoded by variant `{other}`",
                        key.0, key.1
                    ),
                ));
            }
        }
        // A complete chain: from the oldest declared version up to the current one.
        if let Some((&oldest, first)) = froms.iter().next() {
            for missing in (oldest..variant.version).filter(|v| !froms.contains_key(v)) {
                errors.push(Error::new(
                    first.span,
                    format!(
                        "missing upcaster from version {missing} of `{}`: the chain from version {oldest} must reach version {} one step at a time",
                        variant.name, variant.version
                    ),
                ));
            }
        }
        // A typed step converts into the next typed payload, or into the event
        // itself when it is the last step; JSON cannot follow a typed step.
        for (from, upcast) in &froms {
            if let UpcastKind::Typed(_) = upcast.kind
                && let Some(next) = froms.get(&(from + 1))
                && let UpcastKind::Json(_) = next.kind
            {
                errors.push(Error::new(
                    upcast.span,
                    format!(
                        "typed upcaster from version {from} of `{}` must be followed by a typed upcaster from version {} (it converts into that type with `Into`); make both typed or both `json`",
                        variant.name,
                        from + 1
                    ),
                ));
            }
        }
    }

    // A retired or split (type, version) is read by nothing else.
    for retired in &input.retired {
        for version in 1..=retired.version {
            let key = (retired.name.value(), version);
            if let Some(other) = keys.insert(key.clone(), "retired".into()) {
                errors.push(Error::new(
                    retired.span,
                    format!(
                        "`{}` version {version} cannot be retired: {}; retire only versions that nothing else reads",
                        key.0,
                        reader(&other)
                    ),
                ));
                break;
            }
        }
    }
    for split in &input.splits {
        let key = (split.name.value(), split.version);
        if let Some(variant) = input
            .variants
            .iter()
            .find(|v| v.name == key.0 && v.version < key.1)
        {
            errors.push(Error::new(
                split.span,
                format!(
                    "`{}` version {} is newer than the current version {} of variant `{}`: nothing can have stored it",
                    key.0, key.1, variant.version, variant.ident
                ),
            ));
            continue;
        }
        if let Some(other) = keys.insert(key.clone(), "split".into()) {
            errors.push(Error::new(
                split.span,
                format!(
                    "`{}` version {} cannot be split: {}",
                    key.0,
                    key.1,
                    reader(&other)
                ),
            ));
        }
    }

    let mut errors = errors.into_iter();
    match errors.next() {
        None => Ok(()),
        Some(mut first) => {
            for e in errors {
                first.combine(e);
            }
            Err(first)
        }
    }
}

/// Who already reads a (type, version), for an error message.
fn reader(owner: &str) -> String {
    match owner {
        "retired" => "it is already retired".into(),
        "split" => "it is already split".into(),
        variant => format!("variant `{variant}` reads it"),
    }
}

/// The rules Kafka applies to topic names.
fn topic_name_problem(topic: &str) -> std::result::Result<(), &'static str> {
    if topic.is_empty() {
        return Err("it is empty");
    }
    if topic.len() > 249 {
        return Err("it is longer than 249 characters");
    }
    if topic == "." || topic == ".." {
        return Err("`.` and `..` are reserved");
    }
    if !topic
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err("only ASCII letters, digits, `.`, `_` and `-` are allowed");
    }
    Ok(())
}
