//! A typed view of the enum the derive is applied to.

use proc_macro2::Span;
use syn::spanned::Spanned;
use syn::{Attribute, Data, DeriveInput, Error, Fields, Ident, Result, Type};

use crate::attr::{self, Upcast};

/// The whole enum.
pub(crate) struct Input<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) topic: Option<String>,
    pub(crate) variants: Vec<Variant<'a>>,
    /// Types no variant reads any more, dropped on read.
    pub(crate) retired: Vec<attr::Retired>,
    /// Stored (type, version)s read as several events.
    pub(crate) splits: Vec<attr::Split>,
}

/// The shape of a variant's payload.
pub(crate) enum Payload<'a> {
    /// `Variant { a: A, b: B }`: the payload is a JSON object of the fields.
    Struct(Vec<Field<'a>>),
    /// `Variant(T)`: the payload is `T`'s serialization.
    Newtype(&'a Type),
    /// `Variant`: the payload is `{}`.
    Unit,
}

/// A named field of a struct variant.
pub(crate) struct Field<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) ty: &'a Type,
    /// `#[serde(...)]` and doc attributes, copied to the generated payload types.
    pub(crate) serde_attrs: Vec<&'a Attribute>,
    /// `#[schemars(...)]` attributes, copied to the schema-carrying payload type.
    pub(crate) schemars_attrs: Vec<&'a Attribute>,
}

/// One variant: one event type.
pub(crate) struct Variant<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) name: String,
    pub(crate) name_span: Span,
    pub(crate) version: u32,
    pub(crate) payload: Payload<'a>,
    pub(crate) docs: Vec<&'a Attribute>,
    pub(crate) upcasts: Vec<Upcast>,
}

impl<'a> Input<'a> {
    pub(crate) fn from_syn(input: &'a DeriveInput) -> Result<Input<'a>> {
        let data = match &input.data {
            Data::Enum(data) => data,
            Data::Struct(s) => {
                return Err(Error::new(
                    s.struct_token.span,
                    "#[derive(Event)] only supports enums: one variant per event type",
                ));
            }
            Data::Union(u) => {
                return Err(Error::new(
                    u.union_token.span,
                    "#[derive(Event)] only supports enums: one variant per event type",
                ));
            }
        };
        if !input.generics.params.is_empty() {
            return Err(Error::new(
                input.generics.span(),
                "#[derive(Event)] does not support generic enums: events are concrete, versioned types",
            ));
        }
        if data.variants.is_empty() {
            return Err(Error::new(
                input.ident.span(),
                "an event enum needs at least one variant",
            ));
        }
        let attrs = attr::enum_attrs(&input.attrs)?;
        let mut errors: Option<Error> = None;
        let mut variants = Vec::new();
        for variant in &data.variants {
            match Variant::from_syn(variant) {
                Ok(v) => variants.push(v),
                Err(e) => match &mut errors {
                    Some(all) => all.combine(e),
                    None => errors = Some(e),
                },
            }
        }
        if let Some(e) = errors {
            return Err(e);
        }
        Ok(Input {
            ident: &input.ident,
            topic: attrs.topic.map(|t| t.value()),
            variants,
            retired: attrs.retired,
            splits: attrs.splits,
        })
    }
}

impl<'a> Variant<'a> {
    fn from_syn(variant: &'a syn::Variant) -> Result<Variant<'a>> {
        let attrs = attr::variant_attrs(&variant.attrs)?;
        let payload = match &variant.fields {
            Fields::Named(named) => Payload::Struct(
                named
                    .named
                    .iter()
                    .map(|f| Field {
                        ident: f.ident.as_ref().expect("named field"),
                        ty: &f.ty,
                        serde_attrs: f
                            .attrs
                            .iter()
                            .filter(|a| a.path().is_ident("serde") || a.path().is_ident("doc"))
                            .collect(),
                        schemars_attrs: f
                            .attrs
                            .iter()
                            .filter(|a| a.path().is_ident("schemars"))
                            .collect(),
                    })
                    .collect(),
            ),
            Fields::Unnamed(unnamed) if unnamed.unnamed.len() == 1 => {
                Payload::Newtype(&unnamed.unnamed[0].ty)
            }
            Fields::Unnamed(unnamed) => {
                return Err(Error::new(
                    unnamed.span(),
                    "a tuple variant must hold exactly one field, its payload type; use a struct variant for several fields",
                ));
            }
            Fields::Unit => Payload::Unit,
        };
        let (name, name_span) = match &attrs.name {
            Some(lit) => (lit.value(), lit.span()),
            None => (variant.ident.to_string(), variant.ident.span()),
        };
        if name.is_empty() {
            return Err(Error::new(name_span, "an event name cannot be empty"));
        }
        let version = attrs.version.map_or(1, |(v, _)| v);
        Ok(Variant {
            ident: &variant.ident,
            name,
            name_span,
            version,
            payload,
            docs: variant
                .attrs
                .iter()
                .filter(|a| a.path().is_ident("doc"))
                .collect(),
            upcasts: attrs.upcasts,
        })
    }

    /// The wire name of this event at version `version` (an upcaster may
    /// declare an older name).
    pub(crate) fn name_at(&self, version: u32) -> String {
        self.upcasts
            .iter()
            .find(|u| u.from == version)
            .and_then(|u| u.name.as_ref().map(|n| n.value()))
            .unwrap_or_else(|| self.name.clone())
    }
}
