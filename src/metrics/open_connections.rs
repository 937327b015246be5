//! The `/metrics` server's open connections, and which one to close when room is needed.
//!
//! A connection holds a slot for nothing when it has been sending its request head for longer
//! than a client takes ([`STALE_HEAD_AFTER`]: a scraper sends its head with, or right after,
//! the handshake), or when its answer has not moved for [`STALLED_WRITE_AFTER`] (a client
//! that does not read). When room is needed, the oldest of the first kind is closed, else the
//! longest stalled of the second; a connection that is making progress is never closed for
//! room. Only the server's thread uses these, one task at a time.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::AbortHandle;

/// When room is needed, a connection that has been sending its head this long is closed.
pub(crate) const STALE_HEAD_AFTER: Duration = Duration::from_millis(50);

/// When room is needed, a connection whose answer has not moved for this long is closed.
pub(crate) const STALLED_WRITE_AFTER: Duration = Duration::from_secs(1);

/// What the server knows of one connection's progress, shared with the connection's task.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// Set once the request head is in.
    answering: AtomicBool,
    /// Since when the answer's last write has been waiting for the client to read.
    write_blocked_since: Mutex<Option<Instant>>,
}

impl Progress {
    /// The request head is in: the connection is being answered.
    pub(super) fn head_received(&self) {
        self.answering.store(true, Ordering::Relaxed);
    }

    fn answering(&self) -> bool {
        self.answering.load(Ordering::Relaxed)
    }

    fn blocked_since(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // Taken by one thread, never while another lock is held: a poisoned one is intact.
        self.write_blocked_since.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes what a write returned: waiting for the client starts (or goes on), or progress.
    fn note_write<T>(&self, polled: &Poll<io::Result<T>>) {
        let mut since = self.blocked_since();
        match polled {
            Poll::Pending => {
                since.get_or_insert_with(Instant::now);
            }
            Poll::Ready(_) => *since = None,
        }
    }

    fn write_blocked_since(&self) -> Option<Instant> {
        *self.blocked_since()
    }
}

/// A connection's stream, noting in its [`Progress`] when writes stop making progress.
pub(super) struct Watched {
    stream: TcpStream,
    progress: Arc<Progress>,
}

impl Watched {
    pub(super) fn new(stream: TcpStream, progress: Arc<Progress>) -> Self {
        Watched { stream, progress }
    }
}

impl AsyncRead for Watched {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.progress.note_write(&polled);
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.progress.note_write(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The connections being served, oldest first.
#[derive(Debug, Default)]
pub(super) struct OpenConnections {
    next_id: u64,
    connections: VecDeque<OpenConnection>,
}

#[derive(Debug)]
struct OpenConnection {
    id: u64,
    accepted: Instant,
    progress: Arc<Progress>,
    task: AbortHandle,
}

impl OpenConnections {
    pub(super) fn len(&self) -> usize {
        self.connections.len()
    }

    /// An id for the next connection.
    pub(super) fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// A connection accepted now, served by `task`.
    pub(super) fn push(&mut self, id: u64, progress: Arc<Progress>, task: AbortHandle) {
        self.connections.push_back(OpenConnection {
            id,
            accepted: Instant::now(),
            progress,
            task,
        });
    }

    /// Forgets a connection that has ended.
    pub(super) fn remove(&mut self, id: u64) {
        if let Some(at) = self.connections.iter().position(|open| open.id == id) {
            self.connections.remove(at);
        }
    }

    /// Closes the connection that has held its slot for nothing the longest (see the module's
    /// doc). Without one, `Err` says when one will have, if any connection may.
    pub(super) fn close_idlest(&mut self, now: Instant) -> Result<(), Option<Instant>> {
        let mut next = None;
        let slow_head = self
            .connections
            .iter()
            .position(|open| !open.progress.answering())
            .map(|at| (at, self.connections[at].accepted + STALE_HEAD_AFTER));
        let stalled = self
            .connections
            .iter()
            .enumerate()
            .filter_map(|(at, open)| Some((at, open.progress.write_blocked_since()? + STALLED_WRITE_AFTER)))
            .min_by_key(|&(_, stalled_at)| stalled_at);
        for (at, idle_at) in slow_head.into_iter().chain(stalled) {
            if idle_at <= now {
                if let Some(open) = self.connections.remove(at) {
                    open.task.abort();
                }
                return Ok(());
            }
            next = Some(next.map_or(idle_at, |next: Instant| next.min(idle_at)));
        }
        Err(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A current-thread runtime whose tasks never finish, for abort handles.
    fn pending_task(runtime: &tokio::runtime::Runtime) -> AbortHandle {
        runtime.spawn(std::future::pending::<()>()).abort_handle()
    }

    #[test]
    fn the_connection_idle_longest_is_closed_and_a_busy_one_never() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut open = OpenConnections::default();
        let (reading, answering, stalled) = (
            Arc::new(Progress::default()),
            Arc::new(Progress::default()),
            Arc::new(Progress::default()),
        );
        answering.head_received();
        stalled.head_received();
        stalled.note_write(&Poll::<io::Result<()>>::Pending);
        let tasks: Vec<AbortHandle> = (0..3).map(|_| pending_task(&runtime)).collect();
        for (progress, task) in [&reading, &answering, &stalled].into_iter().zip(&tasks) {
            let id = open.next_id();
            open.push(id, Arc::clone(progress), task.clone());
        }
        let now = Instant::now();
        // Nothing is idle long enough yet: the head goes stale first.
        let next = open.close_idlest(now).unwrap_err().unwrap();
        assert!(next <= now + STALE_HEAD_AFTER);
        // The slow head first, then the stalled answer; the busy one stays.
        let later = now + STALLED_WRITE_AFTER + Duration::from_millis(1);
        assert_eq!(open.close_idlest(later), Ok(()));
        assert_eq!(open.len(), 2);
        assert_eq!(open.close_idlest(later), Ok(()));
        assert_eq!(open.len(), 1);
        assert_eq!(open.close_idlest(later + Duration::from_secs(3600)), Err(None));
        // The closed ones' tasks were aborted, the busy one's not.
        runtime.block_on(tokio::task::yield_now());
        assert!(tasks[0].is_finished() && tasks[2].is_finished());
        assert!(!tasks[1].is_finished());
    }

    #[test]
    fn a_write_that_moves_again_is_no_longer_stalled() {
        let progress = Progress::default();
        progress.note_write(&Poll::<io::Result<usize>>::Pending);
        let since = progress.write_blocked_since().unwrap();
        progress.note_write(&Poll::<io::Result<usize>>::Pending);
        assert_eq!(progress.write_blocked_since(), Some(since), "still since the first");
        progress.note_write(&Poll::Ready(Ok(10)));
        assert_eq!(progress.write_blocked_since(), None);
    }
}
