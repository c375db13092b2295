//! The wall clock the runtime passes into the engine.

use shardmq_core::time::Timestamp;

/// The current wall-clock time. Called several times per message, so it reads the kernel's
/// coarse clock (`CLOCK_REALTIME_COARSE`: updated every scheduler tick, 1–4 ms, read without
/// the time-stamp counter), which is plenty for deadlines counted in seconds and costs a
/// fraction of a precise read.
pub fn now() -> Timestamp {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass and has no other effect.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } == 0 {
        return Timestamp(ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000);
    }
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp(d.as_millis() as u64)
}
