//! The `#[instrument]` attribute of [agent-telemetry](https://docs.rs/agent-telemetry),
//! re-exported there as `agent_telemetry::instrument`: use it from there.

#![deny(missing_docs)]

use proc_macro::TokenStream;
use proc_macro2::{TokenStream as TokenStream2, TokenTree};
use quote::quote;

/// Instruments a function as an agent execution: `tracing`'s `#[instrument]` with
/// `name = "agent_execution"` and `err` (when the function returns a `Result`) unless given,
/// and, on an `async fn`, a body that reports the execution as cancelled when its future is
/// dropped before it completed. Every argument `tracing::instrument` takes is passed on.
#[proc_macro_attribute]
pub fn instrument(args: TokenStream, item: TokenStream) -> TokenStream {
    let args = TokenStream2::from(args);
    let mut function: syn::ItemFn = match syn::parse(item) {
        Ok(function) => function,
        Err(error) => return error.to_compile_error().into(),
    };
    let (named, errs) = scan(&args);
    let mut added = Vec::new();
    if !named {
        added.push(quote!(name = "agent_execution"));
    }
    if !errs && returns_result(&function.sig.output) {
        added.push(quote!(err));
    }
    let args = if args.is_empty() {
        quote!(#(#added),*)
    } else if added.is_empty() {
        args
    } else {
        quote!(#(#added,)* #args)
    };
    if function.sig.asyncness.is_some() {
        let block = &function.block;
        *function.block = syn::parse_quote!({
            ::agent_telemetry::__private::ReportsCancellation::new(async move #block).await
        });
    }
    quote!(
        #[::tracing::instrument(#args)]
        #function
    )
    .into()
}

/// Whether the arguments name the span (`name = ...`) and ask for `err` already.
fn scan(args: &TokenStream2) -> (bool, bool) {
    let (mut named, mut errs) = (false, false);
    let mut at_start = true;
    let mut first = None;
    for token in args.clone() {
        match &token {
            TokenTree::Punct(punct) if punct.as_char() == ',' => {
                at_start = true;
                first = None;
                continue;
            }
            TokenTree::Ident(ident) if at_start => {
                first = Some(ident.to_string());
                errs |= ident == "err";
            }
            TokenTree::Punct(punct) if punct.as_char() == '=' && first.as_deref() == Some("name") => {
                named = true;
            }
            _ => {}
        }
        at_start = false;
    }
    (named, errs)
}

/// Whether the function returns a `Result` (the last segment of its return type's path).
fn returns_result(output: &syn::ReturnType) -> bool {
    let syn::ReturnType::Type(_, ty) = output else {
        return false;
    };
    matches!(&**ty, syn::Type::Path(path) if path.path.segments.last().is_some_and(|last| last.ident == "Result"))
}
