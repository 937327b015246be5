//! The `#[instrument]` attribute of [agent-telemetry](https://docs.rs/agent-telemetry),
//! re-exported there as `agent_telemetry::instrument`: use it from there.

#![deny(missing_docs)]

use proc_macro::TokenStream;
use proc_macro2::{TokenStream as TokenStream2, TokenTree};
use quote::quote;

/// Instruments a function as an agent execution: `tracing`'s `#[instrument]` with
/// `name = "agent_execution"` and `err` (when the function returns a `Result`) unless given,
/// and, on an `async fn`, a body that reports the execution as cancelled when its future is
/// dropped before it completed. So does a function that returns an `async` block, as it is or
/// in `Box::pin` (what `#[async_trait]` makes of an `async fn`, which runs before this
/// attribute). Every argument `tracing::instrument` takes is passed on.
#[proc_macro_attribute]
pub fn instrument(args: TokenStream, item: TokenStream) -> TokenStream {
    let args = TokenStream2::from(args);
    let mut function: syn::ItemFn = match syn::parse(item) {
        Ok(function) => function,
        Err(error) => return error.to_compile_error().into(),
    };
    let (name, errs) = scan(&args);
    let mut added = Vec::new();
    let name = name.unwrap_or_else(|| {
        added.push(quote!(name = "agent_execution"));
        quote!("agent_execution")
    });
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
    let body = if function.sig.asyncness.is_some() {
        Some(&mut *function.block)
    } else {
        returned_async_block(&mut function.block).map(|body| &mut body.block)
    };
    if let Some(body) = body {
        *body = syn::parse_quote!({
            ::agent_telemetry::__private::ReportsCancellation::of_span_named(async move #body, #name).await
        });
    }
    quote!(
        #[::tracing::instrument(#args)]
        #function
    )
    .into()
}

/// The `async` block a function that is not `async` returns as its last expression, as it
/// is or in `Box::pin(...)`: what `#[async_trait]` makes of an `async fn`, and what
/// `tracing::instrument` instruments in such a function.
fn returned_async_block(block: &mut syn::Block) -> Option<&mut syn::ExprAsync> {
    let last = block.stmts.iter_mut().rev().find_map(|stmt| match stmt {
        syn::Stmt::Expr(expr, _) => Some(expr),
        _ => None,
    })?;
    match last {
        syn::Expr::Async(body) => Some(body),
        syn::Expr::Call(call) if is_box_pin(&call.func) => match call.args.first_mut()? {
            syn::Expr::Async(body) => Some(body),
            _ => None,
        },
        _ => None,
    }
}

/// Whether `func` is a path ending in `Box::pin`.
fn is_box_pin(func: &syn::Expr) -> bool {
    let syn::Expr::Path(path) = func else {
        return false;
    };
    let mut segments = path.path.segments.iter().rev();
    matches!(
        (segments.next(), segments.next()),
        (Some(pin), Some(boxed)) if pin.ident == "pin" && boxed.ident == "Box"
    )
}

/// The span's name if the arguments give it (`name = ...`, or a string literal alone), and
/// whether they ask for `err`.
fn scan(args: &TokenStream2) -> (Option<TokenStream2>, bool) {
    let (mut name, mut errs) = (None, false);
    let mut at_start = true;
    let mut first = None;
    let mut naming = false;
    for token in args.clone() {
        match &token {
            TokenTree::Punct(punct) if punct.as_char() == ',' => {
                at_start = true;
                first = None;
                naming = false;
                continue;
            }
            TokenTree::Ident(ident) if at_start => {
                first = Some(ident.to_string());
                errs |= ident == "err";
            }
            // `#[instrument("name", ..)]`: the name, unnamed.
            TokenTree::Literal(_) if at_start => name = Some(TokenStream2::from(token.clone())),
            TokenTree::Punct(punct) if punct.as_char() == '=' && first.as_deref() == Some("name") => {
                naming = true;
                name = Some(TokenStream2::new());
            }
            _ if naming => name.get_or_insert_with(TokenStream2::new).extend([token.clone()]),
            _ => {}
        }
        at_start = false;
    }
    (name, errs)
}

/// Whether the function returns a `Result` (the last segment of its return type's path), or
/// a future of one: `impl Future<Output = Result<..>>`, or `Pin<Box<dyn Future<Output =
/// Result<..>> + ..>>` as `#[async_trait]` writes it.
fn returns_result(output: &syn::ReturnType) -> bool {
    let syn::ReturnType::Type(_, ty) = output else {
        return false;
    };
    is_result(ty) || is_future_of_result(ty)
}

/// Whether `ty` is a `Result`, by the last segment of its path.
fn is_result(ty: &syn::Type) -> bool {
    matches!(ty, syn::Type::Path(path) if path.path.segments.last().is_some_and(|last| last.ident == "Result"))
}

/// Whether `ty` is a future of a `Result`: `impl Future<..>` or `dyn Future<..>`, in any
/// number of `Pin<..>` and `Box<..>`.
fn is_future_of_result(ty: &syn::Type) -> bool {
    match ty {
        syn::Type::ImplTrait(bounds) => future_of_result(&bounds.bounds),
        syn::Type::TraitObject(bounds) => future_of_result(&bounds.bounds),
        syn::Type::Paren(inner) => is_future_of_result(&inner.elem),
        syn::Type::Group(inner) => is_future_of_result(&inner.elem),
        syn::Type::Path(path) => {
            let Some(last) = path.path.segments.last() else {
                return false;
            };
            let syn::PathArguments::AngleBracketed(arguments) = &last.arguments else {
                return false;
            };
            (last.ident == "Pin" || last.ident == "Box")
                && arguments.args.iter().any(|argument| match argument {
                    syn::GenericArgument::Type(inner) => is_future_of_result(inner),
                    _ => false,
                })
        }
        _ => false,
    }
}

/// Whether `bounds` has a `Future<Output = ..>` whose output is a `Result`.
fn future_of_result(bounds: &syn::punctuated::Punctuated<syn::TypeParamBound, syn::Token![+]>) -> bool {
    bounds.iter().any(|bound| {
        let syn::TypeParamBound::Trait(bound) = bound else {
            return false;
        };
        let Some(last) = bound.path.segments.last() else {
            return false;
        };
        let syn::PathArguments::AngleBracketed(arguments) = &last.arguments else {
            return false;
        };
        last.ident == "Future"
            && arguments.args.iter().any(|argument| match argument {
                syn::GenericArgument::AssocType(output) => output.ident == "Output" && is_result(&output.ty),
                _ => false,
            })
    })
}
