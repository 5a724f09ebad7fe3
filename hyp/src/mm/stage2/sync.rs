//! The atomics the stage-2 code uses, from `core` normally and from [loom] under `--cfg loom`.
//!
//! Everything in `stage2` that is shared between CPUs goes through these names, so the loom models
//! in `table.rs` and `pool.rs` explore every interleaving the memory model allows for the real
//! code, not for a copy of it. Nothing else changes under loom except [`BITS_PER_LEVEL`]: loom
//! tracks every atomic object it sees, and 512-entry tables would be far too many, so a table has
//! 4 entries there and every block size shrinks with it (the page stays 4 KiB).
//!
//! [loom]: https://docs.rs/loom

#[cfg(loom)]
pub use loom::sync::atomic::AtomicU64;
#[cfg(loom)]
pub(crate) use loom::sync::atomic::Ordering;

/// The type of a table entry; implementations of `PageAllocator` name it through
/// `mm::stage2::AtomicU64` so that they also build under loom.
#[cfg(not(loom))]
pub use core::sync::atomic::AtomicU64;
#[cfg(not(loom))]
pub(crate) use core::sync::atomic::Ordering;

/// Index bits per translation level: 9 for 512-entry tables (4 KiB granule), 2 under loom.
#[cfg(not(loom))]
pub(crate) const BITS_PER_LEVEL: u32 = 9;
/// Index bits per translation level: 9 for 512-entry tables (4 KiB granule), 2 under loom.
#[cfg(loom)]
pub(crate) const BITS_PER_LEVEL: u32 = 2;

/// Busy-wait hint. Under loom it yields, so that a spinning thread lets the model run the thread
/// it waits for instead of exploring an endless loop.
#[inline]
pub(crate) fn spin_loop() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    core::hint::spin_loop();
}
