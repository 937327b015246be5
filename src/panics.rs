//! The application's own code on our background threads (a log writer, a span exporter) may
//! panic. Such a panic fails the batch in hand, counted as any failed write or export is,
//! and the thread goes on: one bad batch must not end every later line or span. (Only with
//! `panic = "unwind"`, the default; the panic hook still reports each panic.) A panic in a
//! dependency's parsing of a setting becomes that setting's error, and one in a field value's
//! `Debug`, formatted in the layer, ends its text where it panicked (`text::debug_text`).

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::task::Poll;

/// The text a panic was raised with.
pub(crate) fn message(payload: &(dyn Any + Send)) -> &str {
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
    // panicked is dropped, never polled again; `debug_text` keeps the text its writer took,
    // which is whole between two writes.
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| message(payload.as_ref()).to_owned())
}

/// Awaits `future`; a panic while it is polled ends it with `Err` and the panic's message.
/// Once it has finished it is dropped inside a catch too; a panic there leaves the result as
/// it was (the panic hook reports it), since what the future did is done. (Dropped before it
/// finishes, it is dropped outside any catch: the callers always run it to the end.)
pub(crate) async fn catching_async<T>(future: impl Future<Output = T>) -> Result<T, String> {
    // Boxed so that it can be dropped here, inside the catch (once per batch, not per item).
    let mut future = Some(Box::pin(future));
    std::future::poll_fn(|cx| {
        let Some(running) = future.as_mut() else {
            return Poll::Ready(Err("polled again after it finished".to_owned()));
        };
        let outcome = match catching(|| running.as_mut().poll(cx)) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(output)) => Ok(output),
            Err(panic) => Err(panic),
        };
        let _ = catching(|| drop(future.take()));
        Poll::Ready(outcome)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A future that panics when it is dropped, and when polled if told to.
    struct PanicsOnDrop {
        poll_panics: bool,
    }

    impl Future for PanicsOnDrop {
        type Output = u8;
        fn poll(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> Poll<u8> {
            assert!(!self.poll_panics, "polled badly");
            Poll::Ready(7)
        }
    }

    impl Drop for PanicsOnDrop {
        fn drop(&mut self) {
            panic!("dropped badly");
        }
    }

    #[test]
    fn a_panic_becomes_its_message() {
        assert_eq!(catching(|| 1), Ok(1));
        assert_eq!(
            catching(|| panic!("static text")),
            Err::<(), _>("static text".to_owned())
        );
        let n = 3;
        assert_eq!(
            catching(|| panic!("formatted {n}")),
            Err::<(), _>("formatted 3".to_owned())
        );
    }

    #[tokio::test]
    async fn a_panic_when_polled_is_the_result_and_one_when_dropped_is_not() {
        assert_eq!(catching_async(async { 5 }).await, Ok(5));
        let panics_when_polled = async { panic!("polled badly") };
        assert_eq!(
            catching_async(panics_when_polled).await,
            Err::<(), _>("polled badly".to_owned())
        );
        let done = PanicsOnDrop { poll_panics: false };
        assert_eq!(catching_async(done).await, Ok(7), "its work was done");
        let broken = PanicsOnDrop { poll_panics: true };
        assert_eq!(catching_async(broken).await, Err("polled badly".to_owned()));
    }
}
