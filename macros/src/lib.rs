//! The `#[instrument]` attribute of [agent-telemetry](https://docs.rs/agent-telemetry),
//! re-exported there as `agent_telemetry::instrument`: use it from there.

#![deny(missing_docs)]

use proc_macro::TokenStream;
use proc_macro2::{TokenStream as TokenStream2, TokenTree};
use quote::quote;

/// Instruments a function as an agent execution: `tracing`'s `#[instrument]` with
/// `name = "agent_execution"` and `err` (when the function returns a `Result`, or a future of
/// one) unless given, and, on an `async fn`, a body that reports the execution as cancelled
/// when its future is dropped before it completed. So does a function that returns a future
/// as `impl Future<..>` or `Pin<Box<dyn Future<..>>>`: an `async` block, as it is or in
/// `Box::pin` (what `#[async_trait]` makes of an `async fn`, which runs before this
/// attribute), or any other future, which then runs in the span the call opens (its `Err`
/// reported by the attribute: `err` is refused there). Every argument `tracing::instrument`
/// takes is passed on.
#[proc_macro_attribute]
pub fn instrument(args: TokenStream, item: TokenStream) -> TokenStream {
    let args = TokenStream2::from(args);
    let mut function: syn::ItemFn = match syn::parse(item) {
        Ok(function) => function,
        Err(error) => return error.to_compile_error().into(),
    };
    let returned = match &function.sig.output {
        syn::ReturnType::Type(_, ty) => Some((**ty).clone()),
        syn::ReturnType::Default => None,
    };
    let (name, errs) = scan(&args);
    let mut added = Vec::new();
    let name = name.unwrap_or_else(|| {
        added.push(quote!(name = "agent_execution"));
        quote!("agent_execution")
    });
    let returned_async = function.sig.asyncness.is_none() && returned_async_block(&mut function.block).is_some();
    let shape = match (&returned, returned_future_boxes(&function.sig.output)) {
        _ if function.sig.asyncness.is_some() => Shape::Async,
        _ if returned_async => Shape::ReturnedAsync,
        (Some(_), Some(boxes)) => Shape::ReturnedFuture { boxes },
        _ => Shape::Sync,
    };
    // What the function's future outputs, where its type says.
    let output = match &shape {
        Shape::Async => Some(returned.clone().unwrap_or_else(|| syn::parse_quote!(()))),
        Shape::ReturnedAsync | Shape::ReturnedFuture { .. } => returned.as_ref().and_then(future_output).cloned(),
        Shape::Sync => None,
    };
    if let (Shape::ReturnedFuture { boxes }, Some(returned)) = (&shape, &returned) {
        if errs {
            let message = "`err` on a function that returns a future it does not write as an `async` block: `tracing` would apply it to the future; the attribute reports the future's `Err` itself, so leave `err` out";
            return syn::Error::new_spanned(&args, message).to_compile_error().into();
        }
        let reports_err = output.as_ref().is_some_and(is_result);
        instrument_returned_future(
            &mut function.block,
            returned,
            *boxes,
            output.as_ref(),
            reports_err,
            &name,
        );
    } else {
        let result = output.as_ref().or(returned.as_ref()).is_some_and(is_result);
        if !errs && result {
            added.push(quote!(err));
        }
        let body = match shape {
            Shape::Async => Some(&mut *function.block),
            Shape::ReturnedAsync => returned_async_block(&mut function.block).map(|body| &mut body.block),
            Shape::ReturnedFuture { .. } | Shape::Sync => None,
        };
        if let Some(body) = body {
            // Unknown behind an alias (`BoxFuture`): then inferred.
            let fixed = output.as_ref().map(|output| fixed_output(&erase_impl_trait(output)));
            let stmts = &body.stmts;
            *body = syn::parse_quote!({
                ::agent_telemetry::__private::ReportsCancellation::of_span_named(async move { #fixed #(#stmts)* }, #name).await
            });
        }
    }
    let args = if args.is_empty() {
        quote!(#(#added),*)
    } else if added.is_empty() {
        args
    } else {
        quote!(#(#added,)* #args)
    };
    quote!(
        #[::tracing::instrument(#args)]
        #function
    )
    .into()
}

/// How a function runs its work, which decides how the attribute instruments it.
enum Shape {
    /// An `async fn`: its body is the execution's future.
    Async,
    /// A function that returns an `async` block (as `#[async_trait]` writes one), which
    /// `tracing::instrument` instruments as an `async fn`'s body.
    ReturnedAsync,
    /// A function that returns another future, as `impl Future<..>` or `Pin<Box<..>>`
    /// (wrapped in `boxes` `Box::pin`s): its span begins with the call, and the future it
    /// returns runs in it.
    ReturnedFuture { boxes: usize },
    /// A synchronous function.
    Sync,
}

/// Makes the body of a function that returns a future it does not write as an `async` block
/// (it calls another function, or returns a future built earlier) return that future in the
/// function's span, reporting its cancellation and, when `reports_err`, its `Err` as
/// `tracing`'s `err` does. The body runs as the function is called, in the span
/// `tracing::instrument` enters, as without the attribute; its cancellation is reported to
/// that span, wherever the future is polled.
fn instrument_returned_future(
    block: &mut syn::Block,
    returned: &syn::Type,
    boxes: usize,
    output: Option<&syn::Type>,
    reports_err: bool,
    name: &TokenStream2,
) {
    let stmts = &block.stmts;
    let returned = erase_impl_trait(returned);
    let fixed = output.map(|output| fixed_output(&erase_impl_trait(output)));
    let err = reports_err.then(|| {
        quote!(
            if let ::std::result::Result::Err(__agent_telemetry_error) = &__agent_telemetry_output {
                ::tracing::error!(error = %__agent_telemetry_error);
            }
        )
    });
    let future = quote!(::tracing::Instrument::in_current_span(
        ::agent_telemetry::__private::ReportsCancellation::of_named_span(
            async move {
                #fixed
                let __agent_telemetry_output = __agent_telemetry_future.await;
                #err
                __agent_telemetry_output
            },
            ::tracing::Span::current(),
            #name,
        )
    ));
    let future = (0..boxes).fold(future, |future, _| quote!(::std::boxed::Box::pin(#future)));
    // In a closure, so that a `return` in the body (one a macro writes included) returns the
    // future to be wrapped; made `FnOnce` by the token it consumes, so that borrows the body
    // hands on (`&mut` ones too) keep the function's lifetimes.
    *block = syn::parse_quote!({
        let __agent_telemetry_once = ::agent_telemetry::__private::CalledOnce;
        #[allow(clippy::redundant_closure_call)]
        let __agent_telemetry_future: #returned = (move || -> #returned {
            __agent_telemetry_once.called();
            #(#stmts)*
        })();
        #future
    });
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

/// A statement that fixes the output type of the `async` block it opens to `output`, so that
/// its `return`s and tail coerce to it (a `Box<dyn Trait>`, a `?` into a boxed error), as in
/// the function `tracing::instrument` writes: an unreachable `return` of that type.
fn fixed_output(output: &syn::Type) -> TokenStream2 {
    quote::quote_spanned! {syn::spanned::Spanned::span(output)=>
        #[allow(
            unknown_lints,
            unreachable_code,
            clippy::diverging_sub_expression,
            clippy::empty_loop,
            clippy::let_unit_value,
            clippy::let_with_type_underscore,
            clippy::needless_return,
            clippy::unreachable
        )]
        if false {
            let __agent_telemetry_output: #output = loop {};
            return __agent_telemetry_output;
        }
    }
}

/// `ty` with each `impl Trait` in it made `_`: a type a `let` can name.
fn erase_impl_trait(ty: &syn::Type) -> syn::Type {
    struct Eraser;
    impl syn::visit_mut::VisitMut for Eraser {
        fn visit_type_mut(&mut self, ty: &mut syn::Type) {
            if let syn::Type::ImplTrait(bounds) = ty {
                *ty = syn::Type::Infer(syn::TypeInfer {
                    underscore_token: syn::Token![_](syn::spanned::Spanned::span(bounds)),
                });
            } else {
                syn::visit_mut::visit_type_mut(self, ty);
            }
        }
    }
    let mut ty = ty.clone();
    syn::visit_mut::VisitMut::visit_type_mut(&mut Eraser, &mut ty);
    ty
}

/// The output of the future `ty` is (`impl Future<Output = T>`, `dyn Future<Output = T>`),
/// through any number of `Pin<..>`, `Box<..>` and parentheses.
fn future_output(ty: &syn::Type) -> Option<&syn::Type> {
    match ty {
        syn::Type::ImplTrait(bounds) => output_bound(&bounds.bounds),
        syn::Type::TraitObject(bounds) => output_bound(&bounds.bounds),
        syn::Type::Paren(inner) => future_output(&inner.elem),
        syn::Type::Group(inner) => future_output(&inner.elem),
        syn::Type::Path(path) => {
            let last = path.path.segments.last()?;
            let syn::PathArguments::AngleBracketed(arguments) = &last.arguments else {
                return None;
            };
            if last.ident != "Pin" && last.ident != "Box" {
                return None;
            }
            arguments.args.iter().find_map(|argument| match argument {
                syn::GenericArgument::Type(inner) => future_output(inner),
                _ => None,
            })
        }
        _ => None,
    }
}

/// The `Output` of a `Future<Output = ..>` among `bounds`.
fn output_bound(bounds: &syn::punctuated::Punctuated<syn::TypeParamBound, syn::Token![+]>) -> Option<&syn::Type> {
    bounds.iter().find_map(|bound| {
        let syn::TypeParamBound::Trait(bound) = bound else {
            return None;
        };
        let last = bound.path.segments.last()?;
        let syn::PathArguments::AngleBracketed(arguments) = &last.arguments else {
            return None;
        };
        if last.ident != "Future" {
            return None;
        }
        arguments.args.iter().find_map(|argument| match argument {
            syn::GenericArgument::AssocType(output) if output.ident == "Output" => Some(&output.ty),
            _ => None,
        })
    })
}

/// How many `Box::pin`s the future a function returns needs around the `async` block that
/// wraps it, when its type is one that block can be made: `impl Future<..>` none,
/// `Pin<Box<dyn Future<..>>>` one; and one more when the future must be `Unpin`, which an
/// `async` block is not (a `Pin<Box<..>>` is).
fn returned_future_boxes(output: &syn::ReturnType) -> Option<usize> {
    let syn::ReturnType::Type(_, ty) = output else {
        return None;
    };
    future_output(ty)?;
    let unpin = |bounds: &syn::punctuated::Punctuated<syn::TypeParamBound, syn::Token![+]>| {
        usize::from(bounds.iter().any(|bound| {
            matches!(bound, syn::TypeParamBound::Trait(bound)
                if bound.path.segments.last().is_some_and(|last| last.ident == "Unpin"))
        }))
    };
    match &**ty {
        syn::Type::ImplTrait(bounds) => Some(unpin(&bounds.bounds)),
        syn::Type::Path(path) => {
            let last = path.path.segments.last()?;
            let syn::PathArguments::AngleBracketed(arguments) = &last.arguments else {
                return None;
            };
            let Some(syn::GenericArgument::Type(syn::Type::Path(boxed))) = arguments.args.first() else {
                return None;
            };
            let inner = boxed.path.segments.last()?;
            if last.ident != "Pin" || inner.ident != "Box" {
                return None;
            }
            let syn::PathArguments::AngleBracketed(arguments) = &inner.arguments else {
                return None;
            };
            match arguments.args.first() {
                Some(syn::GenericArgument::Type(syn::Type::TraitObject(object))) => Some(1 + unpin(&object.bounds)),
                Some(syn::GenericArgument::Type(syn::Type::ImplTrait(bounds))) => Some(1 + unpin(&bounds.bounds)),
                _ => Some(1),
            }
        }
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

/// Whether `ty` is a `Result`, by the last segment of its path.
fn is_result(ty: &syn::Type) -> bool {
    matches!(ty, syn::Type::Path(path) if path.path.segments.last().is_some_and(|last| last.ident == "Result"))
}
