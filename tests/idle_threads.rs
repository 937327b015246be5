//! An idle service's background threads sleep: with an export delay of zero (spans exported
//! as they come), the span thread and the log thread use no CPU while no agent runs. Read from
//! the threads' own CPU times in `/proc`, in a test binary of its own so that no other
//! telemetry's threads share their names.

mod support;

use std::time::Duration;

use support::Harness;

/// CPU clock ticks (user and system) used so far by this process's threads named `name`.
fn cpu_ticks(name: &str) -> u64 {
    let mut ticks = 0;
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.join("stat")).unwrap_or_default();
        // After the command's closing parenthesis: state is field 3, utime 14 and stime 15.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        ticks += field(14) + field(15);
    }
    ticks
}

#[cfg(target_os = "linux")]
#[test]
fn idle_background_threads_wait_instead_of_spinning() {
    let harness = Harness::with(|builder| builder.with_span_export_delay(Duration::ZERO));
    harness.run(|| {
        for n in 0..100 {
            tracing::info_span!("agent_execution", agent_name = "a", task = n).in_scope(|| {});
        }
    });
    assert_eq!(harness.spans().len(), 100);
    std::thread::sleep(Duration::from_millis(100));
    let before = (cpu_ticks("agent-tel-spans"), cpu_ticks("agent-tel-logs"));
    // A thread that spun would use about 100 ticks (10 ms each) in a second.
    std::thread::sleep(Duration::from_secs(1));
    let after = (cpu_ticks("agent-tel-spans"), cpu_ticks("agent-tel-logs"));
    assert!(
        after.0 - before.0 <= 3,
        "the idle span thread used {} ticks",
        after.0 - before.0
    );
    assert!(
        after.1 - before.1 <= 3,
        "the idle log thread used {} ticks",
        after.1 - before.1
    );
}
