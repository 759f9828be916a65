//! Code generation. Everything is reached through absolute paths
//! (`::tidings::…`, `::core::…`) and lives in a `const _: () = { … };` block,
//! so no import of the user can break it.

use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;

use crate::ast::{Input, Payload, Variant};
use crate::attr::UpcastKind;

pub(crate) fn expand(input: &Input<'_>) -> TokenStream {
    let ident = input.ident;
    let topic = match &input.topic {
        Some(t) => quote!(::core::option::Option::Some(#t)),
        None => quote!(::core::option::Option::None),
    };
    let types = input.variants.iter().map(|v| {
        let name = &v.name;
        let version = v.version;
        quote!(::tidings::EventType { name: #name, version: #version })
    });
    // Every (name, version) the enum reads: current versions, upcast ones
    // under their old names, retired and split ones.
    let mut read_pairs: Vec<(String, u32)> = Vec::new();
    for v in &input.variants {
        read_pairs.push((v.name.clone(), v.version));
        read_pairs.extend(v.upcasts.iter().map(|u| (v.name_at(u.from), u.from)));
    }
    for r in &input.retired {
        read_pairs.extend((1..=r.version).map(|version| (r.name.value(), version)));
    }
    read_pairs.extend(input.splits.iter().map(|s| (s.name.value(), s.version)));
    let reads = read_pairs
        .iter()
        .map(|(name, version)| quote!(::tidings::EventType { name: #name, version: #version }));
    let read_arms = input
        .retired
        .iter()
        .map(|r| {
            let name = r.name.value();
            let last = r.version;
            quote! {
                (#name, 1..=#last) => ::core::result::Result::Ok(::tidings::Reading::Retired),
            }
        })
        .chain(input.splits.iter().map(|split| {
            let name = split.name.value();
            let version = split.version;
            let body = split_body(split);
            quote! {
                (#name, #version) => #body.map(::tidings::Reading::Split),
            }
        }));
    let decode_refusals = input
        .retired
        .iter()
        .map(|r| {
            let name = r.name.value();
            let last = r.version;
            quote! {
                (#name, 1..=#last) => ::core::result::Result::Err(::tidings::DecodeError::Retired {
                    event_type: #name.to_owned(),
                    version: event_version,
                }),
            }
        })
        .chain(input.splits.iter().map(|split| {
            let name = split.name.value();
            let version = split.version;
            let body = split_body(split);
            quote! {
                (#name, #version) => {
                    let mut events = #body?;
                    if events.len() == 1 {
                        ::core::result::Result::Ok(events.remove(0))
                    } else {
                        ::core::result::Result::Err(::tidings::DecodeError::Split {
                            event_type: #name.to_owned(),
                            version: #version,
                            count: events.len(),
                        })
                    }
                }
            }
        }));
    let split_schemas = input.splits.iter().filter_map(|split| {
        let UpcastKind::Typed(ty) = &split.kind else {
            return None;
        };
        let name = split.name.value();
        let version = split.version;
        Some(quote!(::tidings::__private::schema::<#ty>(#name, #version)))
    });
    let payload_types = input.variants.iter().map(payload_types);
    let type_arms = input.variants.iter().map(|v| {
        let pat = pattern(v);
        let name = &v.name;
        quote!(#pat => #name)
    });
    let version_arms = input.variants.iter().map(|v| {
        let pat = pattern(v);
        let version = v.version;
        quote!(#pat => #version)
    });
    // The current versions, read from the payload's text (a pair a split or
    // a retirement also names is left to `read`).
    let read_json_arms = input
        .variants
        .iter()
        .filter(|v| {
            !input
                .splits
                .iter()
                .any(|s| s.name.value() == v.name && s.version == v.version)
                && !input
                    .retired
                    .iter()
                    .any(|r| r.name.value() == v.name && v.version <= r.version)
        })
        .map(|v| {
            let name = &v.name;
            let version = v.version;
            let body = decode_current_with(v, quote!(::tidings::__private::payload_from_str));
            quote!((#name, #version) => (#body).map(::tidings::Reading::One),)
        });
    let encode_arms = input.variants.iter().map(encode_arm);
    let decode_arms = input.variants.iter().flat_map(decode_arms);
    let schemas = input.variants.iter().flat_map(schemas).chain(split_schemas);

    quote! {
        #[allow(non_camel_case_types, non_snake_case, clippy::all)]
        const _: () = {
            #(#payload_types)*

            #[automatically_derived]
            impl ::tidings::Event for #ident {
                const TOPIC: ::core::option::Option<&'static str> = #topic;
                const TYPES: &'static [::tidings::EventType] = &[#(#types),*];
                const READS: &'static [::tidings::EventType] = &[#(#reads),*];

                fn event_type(&self) -> &'static str {
                    match self { #(#type_arms,)* }
                }

                fn event_version(&self) -> u32 {
                    match self { #(#version_arms,)* }
                }

                fn to_payload(&self) -> ::core::result::Result<
                    ::tidings::__private::serde_json::Value,
                    ::tidings::__private::serde_json::Error,
                > {
                    match self { #(#encode_arms)* }
                }

                fn decode(
                    event_type: &str,
                    event_version: u32,
                    payload: ::tidings::__private::serde_json::Value,
                ) -> ::core::result::Result<Self, ::tidings::DecodeError> {
                    match (event_type, event_version) {
                        #(#decode_arms)*
                        #(#decode_refusals)*
                        _ => ::core::result::Result::Err(
                            ::tidings::__private::unknown::<Self>(event_type, event_version),
                        ),
                    }
                }

                fn read(
                    event_type: &str,
                    event_version: u32,
                    payload: ::tidings::__private::serde_json::Value,
                ) -> ::core::result::Result<::tidings::Reading<Self>, ::tidings::DecodeError> {
                    match (event_type, event_version) {
                        #(#read_arms)*
                        _ => <Self as ::tidings::Event>::decode(event_type, event_version, payload)
                            .map(::tidings::Reading::One),
                    }
                }

                fn read_json(
                    event_type: &str,
                    event_version: u32,
                    payload: &::tidings::__private::serde_json::value::RawValue,
                ) -> ::core::result::Result<::tidings::Reading<Self>, ::tidings::DecodeError> {
                    match (event_type, event_version) {
                        #(#read_json_arms)*
                        _ => <Self as ::tidings::Event>::read(
                            event_type,
                            event_version,
                            ::tidings::__private::payload_from_str(event_type, event_version, payload)?,
                        ),
                    }
                }

                fn schemas() -> ::std::vec::Vec<::tidings::EventSchema> {
                    ::std::vec![#(#schemas),*]
                }
            }
        };
    }
}

fn pattern(v: &Variant<'_>) -> TokenStream {
    let ident = v.ident;
    match v.payload {
        Payload::Struct(_) => quote!(Self::#ident { .. }),
        Payload::Newtype(_) => quote!(Self::#ident(..)),
        Payload::Unit => quote!(Self::#ident),
    }
}

fn owned_type(v: &Variant<'_>) -> syn::Ident {
    format_ident!("__{}_Payload", v.ident)
}

/// For struct variants: a payload struct with the variant's fields and their
/// own `#[serde]`/`#[schemars]` attributes, which serializes, deserializes and
/// carries the JSON Schema of the event.
fn payload_types(v: &Variant<'_>) -> TokenStream {
    let Payload::Struct(fields) = &v.payload else {
        return TokenStream::new();
    };
    let name = &v.name;
    let docs = &v.docs;
    let owned_ty = owned_type(v);
    let owned_fields = fields.iter().map(|f| {
        let ident = f.ident;
        let ty = f.ty;
        let serde = &f.serde_attrs;
        let schemars = &f.schemars_attrs;
        quote!(#(#serde)* #(#schemars)* #ident: #ty)
    });
    quote! {
        #(#docs)*
        #[derive(
            ::tidings::__private::serde::Serialize,
            ::tidings::__private::serde::Deserialize,
            ::tidings::__private::schemars::JsonSchema,
        )]
        #[serde(crate = "::tidings::__private::serde", rename = #name)]
        #[schemars(crate = "::tidings::__private::schemars")]
        struct #owned_ty { #(#owned_fields,)* }
    }
}

fn encode_arm(v: &Variant<'_>) -> TokenStream {
    let ident = v.ident;
    match &v.payload {
        Payload::Struct(fields) => {
            let owned_ty = owned_type(v);
            let names: Vec<_> = fields.iter().map(|f| f.ident).collect();
            let clones = fields.iter().map(|f| {
                let ident = f.ident;
                quote_spanned!(f.ty.span()=> #ident: ::core::clone::Clone::clone(#ident))
            });
            quote! {
                Self::#ident { #(#names),* } => ::tidings::__private::serde_json::to_value(
                    &#owned_ty { #(#clones),* }
                ),
            }
        }
        Payload::Newtype(_) => quote! {
            Self::#ident(payload) => ::tidings::__private::serde_json::to_value(payload),
        },
        Payload::Unit => quote! {
            Self::#ident => ::core::result::Result::Ok(::tidings::__private::empty_payload()),
        },
    }
}

/// Decoding of the current version: deserialize the payload into the variant.
fn decode_current(v: &Variant<'_>) -> TokenStream {
    decode_current_with(v, quote!(::tidings::__private::from_payload))
}

/// [`decode_current`] with `helper` turning `payload` into the variant's
/// payload type (`from_payload` for a `Value`, `payload_from_str` for text).
fn decode_current_with(v: &Variant<'_>, helper: TokenStream) -> TokenStream {
    let ident = v.ident;
    let name = &v.name;
    let version = v.version;
    match &v.payload {
        Payload::Struct(fields) => {
            let owned_ty = owned_type(v);
            let names: Vec<_> = fields.iter().map(|f| f.ident).collect();
            quote! {{
                let p: #owned_ty = #helper(#name, #version, payload)?;
                ::core::result::Result::Ok(Self::#ident { #(#names: p.#names),* })
            }}
        }
        Payload::Newtype(ty) => quote! {{
            let p: #ty = #helper(#name, #version, payload)?;
            ::core::result::Result::Ok(Self::#ident(p))
        }},
        Payload::Unit => quote! {{
            #helper::<::tidings::__private::Empty>(#name, #version, payload)?;
            ::core::result::Result::Ok(Self::#ident)
        }},
    }
}

fn decode_arms(v: &Variant<'_>) -> Vec<TokenStream> {
    let mut arms = Vec::new();
    let name = &v.name;
    let version = v.version;
    let current = decode_current(v);
    arms.push(quote!((#name, #version) => #current,));

    for upcast in &v.upcasts {
        let from = upcast.from;
        let old_name = v.name_at(from);
        let span = upcast.span;
        let body = match &upcast.kind {
            UpcastKind::Json(path) => {
                let next_name = v.name_at(from + 1);
                let next = from + 1;
                quote_spanned! {span=> {
                    let payload = ::tidings::__private::upcast(#old_name, #from, #path, payload)?;
                    <Self as ::tidings::Event>::decode(#next_name, #next, payload)
                }}
            }
            UpcastKind::Typed(ty) => {
                // Follow the run of typed steps up to the current version.
                let mut steps = Vec::new();
                let mut at = from + 1;
                while at < v.version {
                    match v.upcasts.iter().find(|u| u.from == at).map(|u| &u.kind) {
                        Some(UpcastKind::Typed(next)) => steps.push(quote_spanned! {span=>
                            let value: #next = ::core::convert::Into::into(value);
                        }),
                        _ => break,
                    }
                    at += 1;
                }
                // Deserializing and converting run user code: a panic
                // there is this event's decode error.
                quote_spanned! {span=>
                    ::tidings::__private::guarded(#old_name, #from, move || {
                        let value: #ty = ::tidings::__private::from_payload(#old_name, #from, payload)?;
                        #(#steps)*
                        let value: Self = ::core::convert::Into::into(value);
                        ::core::result::Result::Ok(value)
                    })
                }
            }
        };
        arms.push(quote!((#old_name, #from) => #body,));
    }
    arms
}

fn schemas(v: &Variant<'_>) -> Vec<TokenStream> {
    let name = &v.name;
    let version = v.version;
    let current = match &v.payload {
        Payload::Struct(_) => {
            let owned = owned_type(v);
            quote!(#owned)
        }
        Payload::Newtype(ty) => quote!(#ty),
        Payload::Unit => quote!(::tidings::__private::Empty),
    };
    let mut out = vec![quote!(::tidings::__private::schema::<#current>(#name, #version))];
    for upcast in &v.upcasts {
        if let UpcastKind::Typed(ty) = &upcast.kind {
            let old_name = v.name_at(upcast.from);
            let from = upcast.from;
            out.push(quote!(::tidings::__private::schema::<#ty>(#old_name, #from)));
        }
    }
    out
}

/// Reading a split (type, version): `Result<Vec<Self>, DecodeError>`.
fn split_body(split: &crate::attr::Split) -> TokenStream {
    let name = split.name.value();
    let version = split.version;
    let span = split.span;
    match &split.kind {
        UpcastKind::Json(path) => quote_spanned! {span=>
            ::tidings::__private::split::<Self>(#name, #version, #path, payload)
        },
        UpcastKind::Typed(ty) => quote_spanned! {span=>
            ::tidings::__private::guarded(#name, #version, move || {
                let value: #ty = ::tidings::__private::from_payload(#name, #version, payload)?;
                let events: ::std::vec::Vec<Self> = ::core::convert::Into::into(value);
                ::core::result::Result::Ok(events)
            })
        },
    }
}
