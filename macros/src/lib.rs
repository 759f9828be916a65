//! `#[derive(Event)]` for tidings. Use it through `tidings::Event`, which
//! re-exports it beside the trait of the same name.
//!
//! The derive turns an enum into a set of versioned event types: one variant,
//! one event type, with its wire name, current version, optional topic and the
//! upcasters that bring older versions to the current one. Mistakes are
//! compile errors pointing at the attribute at fault.
//!
//! Stages: `attr` reads the attributes, `ast` builds a typed view of the
//! enum, `valid` checks rules across variants, `expand` writes the code
//! and `fallback` stands in when there is an error, so that the user sees
//! the one real error rather than a cascade.

mod ast;
mod attr;
mod expand;
mod fallback;
mod valid;

use proc_macro::TokenStream;
use syn::{DeriveInput, parse_macro_input};

/// Derives `tidings::Event` for an enum. See the `tidings::Event` trait for
/// the attributes and an example.
#[proc_macro_derive(Event, attributes(event, serde, schemars))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match ast::Input::from_syn(&input).and_then(|parsed| {
        valid::validate(&parsed)?;
        Ok(expand::expand(&parsed))
    }) {
        Ok(tokens) => tokens.into(),
        Err(error) => fallback::expand(&input, error).into(),
    }
}
