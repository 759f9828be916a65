//! Parsing of `#[event(...)]` attributes, keeping spans for diagnostics.

use proc_macro2::Span;
use syn::spanned::Spanned;
use syn::{Attribute, Error, LitInt, LitStr, Path, Result, Type};

/// `#[event(topic = "...", retired(...), split(...))]` on the enum.
#[derive(Default)]
pub(crate) struct EnumAttrs {
    pub(crate) topic: Option<LitStr>,
    pub(crate) retired: Vec<Retired>,
    pub(crate) splits: Vec<Split>,
}

/// `retired(name = "...", version = N)`: versions 1 to N of a type no
/// variant reads any more, dropped on read.
pub(crate) struct Retired {
    pub(crate) name: LitStr,
    pub(crate) version: u32,
    pub(crate) span: Span,
}

/// `split(name = "...", version = N, json = path | typed = Type)`: one
/// stored (type, version) read as several events of the enum.
pub(crate) struct Split {
    pub(crate) name: LitStr,
    pub(crate) version: u32,
    pub(crate) kind: UpcastKind,
    pub(crate) span: Span,
}

/// `#[event(name = "...", version = N, upcast(...)...)]` on a variant.
#[derive(Default)]
pub(crate) struct VariantAttrs {
    pub(crate) name: Option<LitStr>,
    pub(crate) version: Option<(u32, Span)>,
    pub(crate) upcasts: Vec<Upcast>,
}

/// How one upcaster turns version `from` into the next one.
pub(crate) enum UpcastKind {
    /// `json = path`: a `fn(serde_json::Value) -> Result<serde_json::Value, UpcastError>`.
    Json(Path),
    /// `typed = Type`: the old payload, deserialized and converted with `Into`.
    Typed(Type),
}

/// `upcast(from = N, name = "OldName", json = path | typed = Type)`.
pub(crate) struct Upcast {
    pub(crate) from: u32,
    pub(crate) from_span: Span,
    pub(crate) name: Option<LitStr>,
    pub(crate) kind: UpcastKind,
    pub(crate) span: Span,
}

fn event_attrs(attrs: &[Attribute]) -> impl Iterator<Item = &Attribute> {
    attrs.iter().filter(|a| a.path().is_ident("event"))
}

fn version_lit(lit: &LitInt, what: &str) -> Result<(u32, Span)> {
    let value: u32 = lit
        .base10_parse()
        .map_err(|_| Error::new(lit.span(), format!("{what} must be a whole number")))?;
    if value == 0 {
        return Err(Error::new(lit.span(), format!("{what} must be at least 1")));
    }
    Ok((value, lit.span()))
}

fn set_once<T>(slot: &mut Option<T>, value: T, span: Span, key: &str) -> Result<()> {
    if slot.is_some() {
        return Err(Error::new(
            span,
            format!("duplicate `{key}` in #[event(...)]"),
        ));
    }
    *slot = Some(value);
    Ok(())
}

pub(crate) fn enum_attrs(attrs: &[Attribute]) -> Result<EnumAttrs> {
    let mut out = EnumAttrs::default();
    for attr in event_attrs(attrs) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("topic") {
                let lit: LitStr = meta.value()?.parse()?;
                set_once(&mut out.topic, lit, meta.path.span(), "topic")
            } else if meta.path.is_ident("retired") || meta.path.is_ident("split") {
                let retiring = meta.path.is_ident("retired");
                let what = if retiring { "retired" } else { "split" };
                let span = meta.path.span();
                let (mut name, mut version, mut kind) = (None, None, None);
                meta.parse_nested_meta(|inner| {
                    if inner.path.is_ident("name") {
                        let lit: LitStr = inner.value()?.parse()?;
                        set_once(&mut name, lit, inner.path.span(), "name")
                    } else if inner.path.is_ident("version") {
                        let lit: LitInt = inner.value()?.parse()?;
                        let v = version_lit(&lit, &format!("{what} version"))?;
                        set_once(&mut version, v, inner.path.span(), "version")
                    } else if !retiring && inner.path.is_ident("json") {
                        let path: Path = inner.value()?.parse()?;
                        set_once(&mut kind, UpcastKind::Json(path), inner.path.span(), "json` or `typed")
                    } else if !retiring && inner.path.is_ident("typed") {
                        let ty: Type = inner.value()?.parse()?;
                        set_once(&mut kind, UpcastKind::Typed(ty), inner.path.span(), "json` or `typed")
                    } else if retiring {
                        Err(inner.error("unknown `retired` key; expected `name = \"...\"` or `version = N`"))
                    } else {
                        Err(inner.error(
                            "unknown `split` key; expected `name = \"...\"`, `version = N`, `json = path` or `typed = Type`",
                        ))
                    }
                })?;
                let Some(name) = name else {
                    return Err(Error::new(span, format!("{what}(...) needs `name = \"...\"`: the event type's wire name")));
                };
                if name.value().is_empty() {
                    return Err(Error::new(name.span(), "an event name cannot be empty"));
                }
                if retiring {
                    let Some((version, _)) = version else {
                        return Err(Error::new(
                            span,
                            "retired(...) needs `version = N`: versions 1 to N of the type are dropped on read",
                        ));
                    };
                    out.retired.push(Retired { name, version, span });
                    return Ok(());
                }
                let version = version.map_or(1, |(v, _)| v);
                let Some(kind) = kind else {
                    return Err(Error::new(
                        span,
                        "split needs `json = path` (a fn from the JSON payload to `Vec<Self>`) or `typed = Type` (the old payload type, `Into<Vec<Self>>`)",
                    ));
                };
                out.splits.push(Split { name, version, kind, span });
                Ok(())
            } else {
                Err(meta.error(
                    "unknown enum attribute; expected `topic = \"...\"`, `retired(...)` or `split(...)`",
                ))
            }
        })?;
    }
    Ok(out)
}

pub(crate) fn variant_attrs(attrs: &[Attribute]) -> Result<VariantAttrs> {
    let mut out = VariantAttrs::default();
    for attr in event_attrs(attrs) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                let lit: LitStr = meta.value()?.parse()?;
                set_once(&mut out.name, lit, meta.path.span(), "name")
            } else if meta.path.is_ident("version") {
                let lit: LitInt = meta.value()?.parse()?;
                let version = version_lit(&lit, "event version")?;
                set_once(&mut out.version, version, meta.path.span(), "version")
            } else if meta.path.is_ident("upcast") {
                let span = meta.path.span();
                let mut from = None;
                let mut name = None;
                let mut kind = None;
                meta.parse_nested_meta(|inner| {
                    if inner.path.is_ident("from") {
                        let lit: LitInt = inner.value()?.parse()?;
                        let version = version_lit(&lit, "upcaster `from` version")?;
                        set_once(&mut from, version, inner.path.span(), "from")
                    } else if inner.path.is_ident("name") {
                        let lit: LitStr = inner.value()?.parse()?;
                        set_once(&mut name, lit, inner.path.span(), "name")
                    } else if inner.path.is_ident("json") {
                        let path: Path = inner.value()?.parse()?;
                        set_once(&mut kind, UpcastKind::Json(path), inner.path.span(), "json` or `typed")
                    } else if inner.path.is_ident("typed") {
                        let ty: Type = inner.value()?.parse()?;
                        set_once(&mut kind, UpcastKind::Typed(ty), inner.path.span(), "json` or `typed")
                    } else {
                        Err(inner.error(
                            "unknown upcast key; expected `from = N`, `name = \"...\"`, `json = path` or `typed = Type`",
                        ))
                    }
                })?;
                let Some((from, from_span)) = from else {
                    return Err(Error::new(span, "upcast needs `from = N`: the version it upcasts"));
                };
                let Some(kind) = kind else {
                    return Err(Error::new(
                        span,
                        "upcast needs `json = path` (a fn over the JSON payload) or `typed = Type` (the old payload type)",
                    ));
                };
                out.upcasts.push(Upcast { from, from_span, name, kind, span });
                Ok(())
            } else {
                Err(meta.error(
                    "unknown event attribute; expected `name = \"...\"`, `version = N` or `upcast(...)`",
                ))
            }
        })?;
    }
    Ok(out)
}
