//! Handing freed heap back to the kernel after a burst.
//!
//! glibc's allocator keeps memory freed in its arenas for reuse, so after an overload (thousands
//! of requests queued, then done) the process's RSS stays at its peak, ~350 MiB against ~14 at
//! rest. Every [`INTERVAL`] the trimmer reads how much of the heap is free (`mallinfo2`) and,
//! when that is a lot and the heap changed since the last trim, asks glibc to return the free
//! pages (`malloc_trim(0)`; the chunks stay in the free lists, their pages go back). A busy
//! server reuses its free memory at once and so has little of it free: the trim runs after a
//! burst, not during one, and not again while the server stays idle. Other C libraries (musl)
//! return memory themselves; there it does nothing.

use std::time::Duration;

/// How often the heap is looked at.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Free heap below this is not worth a trim (each trim walks the arenas).
const FREE_FLOOR: usize = 16 << 20;

/// Starts the trimmer on the current runtime; it stops with the runtime.
pub fn spawn_trimmer() {
    tokio::spawn(async {
        let mut ticks = tokio::time::interval(INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = None;
        loop {
            ticks.tick().await;
            // Both calls walk the arenas: off the runtime's threads.
            match tokio::task::spawn_blocking(move || trim_if_changed(last)).await {
                Ok(Some(heap)) => last = Some(heap),
                Ok(None) => {}
                Err(_) => return,
            }
        }
    });
}

/// Trims when [`worth_trimming`]; returns the heap's (free, total) bytes when it did.
fn trim_if_changed(last: Option<(usize, usize)>) -> Option<(usize, usize)> {
    let heap = free_heap()?;
    if !worth_trimming(heap, last) {
        return None;
    }
    trim();
    Some(heap)
}

/// At least [`FREE_FLOOR`] bytes and a quarter of the heap free, and the heap not as it was at
/// the last trim (`last`): an idle heap trimmed once has nothing more to give. Half the heap
/// was asked for before, and after an overload whose memory was partly still held (idle
/// connections, caches) 95 MiB stayed free and resident.
fn worth_trimming((free, total): (usize, usize), last: Option<(usize, usize)>) -> bool {
    let changed = last.is_none_or(|(last_free, last_total)| {
        total != last_total || free.abs_diff(last_free) >= FREE_FLOOR / 16
    });
    free >= FREE_FLOOR && free.saturating_mul(4) >= total && changed
}

/// (free, total) bytes of the heap's arenas, mapped chunks left out.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn free_heap() -> Option<(usize, usize)> {
    // SAFETY: mallinfo2 takes no arguments and only reads the allocator's own statistics.
    let info = unsafe { libc::mallinfo2() };
    Some((info.fordblks, info.arena))
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn free_heap() -> Option<(usize, usize)> {
    None
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only releases free pages the allocator holds; no pointer is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_needs_a_lot_of_the_heap_free_and_a_heap_that_changed() {
        const MIB: usize = 1 << 20;
        assert!(
            !worth_trimming((MIB, 2 * MIB), None),
            "little free: not worth a walk"
        );
        assert!(
            !worth_trimming((20 * MIB, 100 * MIB), None),
            "a busy heap reuses its free memory"
        );
        assert!(
            worth_trimming((95 * MIB, 290 * MIB), None),
            "after a burst whose memory is partly still held"
        );
        assert!(
            worth_trimming((300 * MIB, 350 * MIB), None),
            "after a burst"
        );
        assert!(
            !worth_trimming((300 * MIB, 350 * MIB), Some((300 * MIB, 350 * MIB))),
            "idle since the last trim"
        );
        assert!(
            worth_trimming((300 * MIB, 350 * MIB), Some((200 * MIB, 350 * MIB))),
            "another burst since"
        );
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn rss_bytes() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        // SAFETY: sysconf only reads a system constant.
        pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize
    }

    /// Memory the allocator kept after a burst goes back to the kernel.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_heap_goes_back_after_a_burst() {
        // 64 MiB of small blocks (below the mmap threshold, so from an arena), written so their
        // pages are resident, then all freed but the last, which keeps the arena's top from
        // shrinking by itself.
        let mut blocks: Vec<Vec<u8>> = (0..65_536).map(|i| vec![i as u8; 1000]).collect();
        let keep = blocks.pop().unwrap();
        drop(blocks);
        let (free, _) = free_heap().unwrap();
        assert!(free >= 32 << 20, "the burst left {free} bytes free");
        let before = rss_bytes();
        trim();
        let after = rss_bytes();
        assert!(
            after + (32 << 20) <= before,
            "RSS {before} → {after} bytes: the freed blocks stayed resident"
        );
        assert_eq!(keep.len(), 1000);
    }
}
