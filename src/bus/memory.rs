//! Handing memory back after a peak: tables shrink as they empty, and the allocator is asked to
//! return the pages it freed. A hash map never shrinks by itself, and allocators keep freed
//! pages for reuse, so what a peak took (a client that queued 100k replies, or made 50k match
//! rules) would otherwise stay with the process after the client leaves.

use std::cell::Cell;
use std::time::Duration;

use tracing::debug;

/// What hands freed memory back to the system; the binary sets it, as it chooses the allocator.
static RELEASE_MEMORY: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// How long after a peer leaves the bus hands back what was freed: long enough for the peer's
/// task to drop its queues, and a burst of departures costs one release.
const RELEASE_DELAY: Duration = Duration::from_secs(1);

thread_local! {
    /// A release is due: later calls of [`release_memory_soon`] join it.
    static RELEASE_SCHEDULED: Cell<bool> = const { Cell::new(false) };
}

/// Sets what `release_memory_soon` runs: allocators keep freed pages for reuse, so what a
/// peak took (a client that queued 100k replies, or made 50k match rules) would stay with the
/// process after the client leaves.
pub fn set_memory_release(release: fn()) {
    // Set once at start; a second call changes nothing.
    let _ = RELEASE_MEMORY.set(release);
}

/// Has freed memory handed back to the system in `RELEASE_DELAY`, once for all calls until then.
/// Call it on the bus's thread, within its task set.
pub fn release_memory_soon() {
    let Some(&release) = RELEASE_MEMORY.get() else {
        return;
    };
    if RELEASE_SCHEDULED.with(|due| due.replace(true)) {
        return;
    }
    tokio::task::spawn_local(async move {
        tokio::time::sleep(RELEASE_DELAY).await;
        RELEASE_SCHEDULED.with(|due| due.set(false));
        let started = std::time::Instant::now();
        release();
        debug!(took = ?started.elapsed(), "handed freed memory back to the system");
    });
}

/// Gives back the spare room of a map that holds less than a quarter of what it has room for:
/// a hash map never shrinks by itself, so one peak (50k names) would keep its table for good.
/// Halving at a quarter keeps the cost of shrinking in proportion to the removals.
pub(super) fn shrink_map<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(
    map: &mut std::collections::HashMap<K, V, S>,
) {
    /// Small tables are not worth the copy.
    const FLOOR: usize = 1024;
    if map.capacity() > FLOOR && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}
