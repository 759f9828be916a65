//! What the derive emits when the input is wrong: the error itself, plus an
//! impl whose bodies never run, so the user's code that uses the trait still
//! type-checks and only the real error is shown.

use proc_macro2::TokenStream;
use quote::quote;
use syn::DeriveInput;

pub(crate) fn expand(input: &DeriveInput, error: syn::Error) -> TokenStream {
    let error = error.to_compile_error();
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let stub = match &input.data {
        // A generic enum is itself the error: a stub would add bound errors.
        syn::Data::Enum(_) if input.generics.params.is_empty() => quote! {
            #[automatically_derived]
            impl #impl_generics ::tidings::Event for #ident #ty_generics #where_clause {
                const TOPIC: ::core::option::Option<&'static str> = ::core::option::Option::None;
                const TYPES: &'static [::tidings::EventType] = &[];
                fn event_type(&self) -> &'static str { ::core::unreachable!() }
                fn event_version(&self) -> u32 { ::core::unreachable!() }
                fn to_payload(&self) -> ::core::result::Result<
                    ::tidings::__private::serde_json::Value,
                    ::tidings::__private::serde_json::Error,
                > { ::core::unreachable!() }
                fn decode(
                    _: &str,
                    _: u32,
                    _: ::tidings::__private::serde_json::Value,
                ) -> ::core::result::Result<Self, ::tidings::DecodeError> { ::core::unreachable!() }
                fn schemas() -> ::std::vec::Vec<::tidings::EventSchema> { ::core::unreachable!() }
            }
        },
        _ => TokenStream::new(),
    };
    quote! {
        #error
        #stub
    }
}
