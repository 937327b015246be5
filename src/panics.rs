//! The application's own code on our background threads (a log writer, a span exporter) may
//! panic. Such a panic fails the batch in hand, counted as any failed write or export is,
//! and the thread goes on: one bad batch must not end every later line or span. (Only with
//! `panic = "unwind"`, the default; the panic hook still reports each panic.)

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::task::Poll;

/// The text a panic was raised with.
fn message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

/// Runs `f`; a panic in it becomes `Err` with the panic's message.
pub(crate) fn catching<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    // Unwind safety: the callers use what `f` touched again only through calls that may fail
    // (a writer's `write`, an exporter's `export`), and count such failures; a future that
    // panicked is dropped, never polled again.
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| message(payload.as_ref()).to_owned())
}

/// Awaits `future`; a panic while it is polled ends it with `Err` and the panic's message.
pub(crate) async fn catching_async<T>(future: impl Future<Output = T>) -> Result<T, String> {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| match catching(|| future.as_mut().poll(cx)) {
        Ok(Poll::Pending) => Poll::Pending,
        Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
        Err(panic) => Poll::Ready(Err(panic)),
    })
    .await
}
