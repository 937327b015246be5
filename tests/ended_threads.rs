//! What threads that have ended leave behind: per-thread state lives in slots that outlive
//! their threads (a new thread takes an old one's over), so a spike of threads must leave
//! next to nothing in them. Heap is counted by this binary's global allocator, against the
//! bare registry's for the same threads.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::{Arc, Barrier};

use support::Harness;

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed to the system allocator as it came; only a counter is added.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(pointer, layout) }
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        LIVE.fetch_add(size as isize - layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(pointer, layout, size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// `at_once` threads alive together, each running `agent` once, then all joined.
fn spike(dispatch: &tracing::Dispatch, at_once: usize, agent: fn(usize)) {
    let barrier = Arc::new(Barrier::new(at_once));
    let threads: Vec<_> = (0..at_once)
        .map(|n| {
            let (dispatch, barrier) = (dispatch.clone(), Arc::clone(&barrier));
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    tracing::dispatcher::with_default(&dispatch, || agent(n));
                    barrier.wait();
                })
                .unwrap()
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
}

/// Heap still held after a spike of `at_once` threads ended and 50 more ran one at a time.
fn held_after_spike(dispatch: &tracing::Dispatch, settle: &dyn Fn(), at_once: usize, agent: fn(usize)) -> isize {
    spike(dispatch, 4, agent);
    settle();
    let before = LIVE.load(Ordering::Relaxed);
    spike(dispatch, at_once, agent);
    settle();
    for _ in 0..50 {
        spike(dispatch, 1, agent);
    }
    settle();
    LIVE.load(Ordering::Relaxed) - before
}

/// What the telemetry keeps per ended thread, beyond what the bare registry keeps.
fn kept_per_ended_thread(at_once: usize, agent: fn(usize)) -> isize {
    let bare = tracing::Dispatch::new(tracing_subscriber::registry());
    let bare_held = held_after_spike(&bare, &|| {}, at_once, agent);
    let harness = Harness::new();
    let settle = || {
        harness.telemetry().flush().unwrap();
        // The test's in-memory exporter keeps what it got; the telemetry does not.
        harness.exporter.reset();
        harness.telemetry().metrics().render().unwrap();
    };
    let ours = held_after_spike(&harness.dispatch, &settle, at_once, agent);
    (ours - bare_held) / at_once as isize
}

/// One test: the heap count is the whole process's, so nothing may run beside it.
#[test]
fn a_spike_of_threads_leaves_next_to_nothing_once_they_end() {
    fn agent(n: usize) {
        tracing::info_span!("agent_execution", agent_name = "a", task = %format!("task {n}")).in_scope(|| {});
    }
    let per_thread = kept_per_ended_thread(1000, agent);
    assert!(per_thread < 4096, "{per_thread} bytes kept per thread that has ended");

    fn long_names(n: usize) {
        for i in 0..32 {
            let name = format!("{i:02}{}", "\u{1F600}".repeat(5000));
            tracing::info_span!("agent_execution", agent_name = %name, task = %format!("task {n}")).in_scope(|| {});
        }
    }
    let per_thread = kept_per_ended_thread(200, long_names);
    // A slot keeps the metric series of its thread's last 8 agent names, whose labels are up
    // to 1 KiB here; before, it kept 695 kB with these names.
    assert!(
        per_thread < 64 * 1024,
        "{per_thread} bytes kept per thread that has ended"
    );
}
