//! Power for the SMMUs and the bus paths in front of them: Qualcomm power domains (GDSCs), branch
//! clocks and runtime PM.
//!
//! Everything here reaches hardware through [`Regs`], so it builds and is tested on the host against
//! register-level models (`model`, tests only). The target gives it [`Mmio`] windows over the clock
//! controllers (GCC, GPUCC, ...), mapped as device memory in the EL2 map.
//!
//! Every wait is bounded: a poll runs at most [`Timing::max_polls`] times, calling the
//! [`Timing::delay_us`] hook between polls, and gives up with [`PowerError::Timeout`]. Nothing here
//! can hang the CPU on a domain that never reports.
//!
//! - [`gdsc`]: one GDSC (enable, disable, hardware control, status).
//! - [`clock`]: one branch clock (CBCR enable with halt check).
//! - [`config`]: what the board file says about a power domain.
//! - [`rpm`]: runtime PM on top of those.
//! - [`activity`]: what makes a master active (a guest's vote, PCI Bus Master in D0) and the link
//!   that holds the SMMU's domain while it is.
//! - [`tlb_gate`]: stage-2 TLB maintenance that skips a powered-off SMMU.

pub mod activity;
pub mod clock;
pub mod config;
pub mod gdsc;
#[cfg(test)]
pub(crate) mod model;
pub mod rpm;
pub mod tlb_gate;

use alloc::sync::Arc;
use core::fmt;

/// 32-bit register access to one register window (a clock controller), by byte offset.
///
/// The GDSC and clock code does read-modify-write sequences on these registers: callers
/// serialize operations on one domain or clock (runtime PM holds the domain's lock).
pub trait Regs: Send + Sync {
    /// Reads the 32-bit register at byte offset `off`.
    fn read(&self, off: u32) -> u32;
    /// Writes `v` to the 32-bit register at byte offset `off`.
    fn write(&self, off: u32, v: u32);
}

impl<T: Regs + ?Sized> Regs for &T {
    fn read(&self, off: u32) -> u32 {
        (**self).read(off)
    }
    fn write(&self, off: u32, v: u32) {
        (**self).write(off, v)
    }
}

impl<T: Regs + ?Sized> Regs for Arc<T> {
    fn read(&self, off: u32) -> u32 {
        (**self).read(off)
    }
    fn write(&self, off: u32, v: u32) {
        (**self).write(off, v)
    }
}

/// A register window in the EL2 address space (device memory).
#[derive(Debug, Clone, Copy)]
pub struct Mmio {
    base: usize,
    size: u32,
}

impl Mmio {
    /// A window of `size` bytes at virtual address `base`.
    ///
    /// # Safety
    ///
    /// `base..base + size` must be mapped as device memory in the current translation regime for
    /// as long as this value (or a copy) is used, must be 4-byte aligned, and must hold only
    /// registers whose reads have no side effects beyond the device's own state (a clock
    /// controller). Accesses outside the window panic rather than reach other memory.
    pub const unsafe fn new(base: usize, size: u32) -> Self {
        Self { base, size }
    }

    fn reg(&self, off: u32) -> *mut u32 {
        assert!(
            off.is_multiple_of(4) && off.checked_add(4).is_some_and(|end| end <= self.size),
            "register offset {off:#x} outside a {:#x}-byte window",
            self.size
        );
        (self.base + off as usize) as *mut u32
    }
}

impl Regs for Mmio {
    fn read(&self, off: u32) -> u32 {
        let p = self.reg(off);
        // SAFETY: `new`'s contract: the window is mapped device memory; `reg` checked that the
        // aligned 4-byte register lies inside it.
        unsafe { p.read_volatile() }
    }

    fn write(&self, off: u32, v: u32) {
        let p = self.reg(off);
        // SAFETY: as in `read`.
        unsafe { p.write_volatile(v) }
    }
}

/// Why a power operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerError {
    /// `domain` (a GDSC or clock name) did not reach the state `what` within the poll bound.
    Timeout {
        /// The GDSC or clock.
        domain: &'static str,
        /// What was awaited, e.g. `"power on"`, `"clock off"`.
        what: &'static str,
    },
    /// The device behind `domain` (the SMMU) could not be quiesced or restored: `what`, e.g.
    /// `"SMMU resume"`. Its own error was logged where it happened.
    Device {
        /// The domain.
        domain: &'static str,
        /// The step that failed.
        what: &'static str,
    },
}

impl fmt::Display for PowerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout { domain, what } => write!(f, "{domain}: timed out waiting for {what}"),
            Self::Device { domain, what } => write!(f, "{domain}: {what} failed"),
        }
    }
}

/// How long to wait, and how.
///
/// A poll reads its status register up to `max_polls` times and calls `delay_us(1)` between reads,
/// so with a real microsecond delay the bound is about `max_polls` µs. Fixed delays from the
/// Qualcomm sequences (the 1 µs settle after power-up, the 500 µs after dropping a vote) also go
/// through `delay_us`.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Most status reads in one poll (at least one read is always made).
    pub max_polls: u32,
    /// Busy-waits about this many microseconds (the target: the generic timer; tests: a recorder).
    pub delay_us: fn(u32),
}

impl Timing {
    /// GDSC status poll bound, in µs (Linux `STATUS_POLL_TIMEOUT_US`).
    pub const GDSC_POLL_US: u32 = 2000;
    /// Branch clock halt-check bound, in µs (Linux `clk_branch_wait`: 200 × 1 µs).
    pub const CLOCK_POLL_US: u32 = 200;

    /// The GDSC bound with the given delay hook.
    pub const fn gdsc(delay_us: fn(u32)) -> Self {
        Self {
            max_polls: Self::GDSC_POLL_US,
            delay_us,
        }
    }

    /// The branch-clock bound with the given delay hook.
    pub const fn clock(delay_us: fn(u32)) -> Self {
        Self {
            max_polls: Self::CLOCK_POLL_US,
            delay_us,
        }
    }

    /// Reads `off` until `done(value)` holds: `Ok(value)`, or [`PowerError::Timeout`] after
    /// `max_polls` reads.
    pub(crate) fn poll(
        &self,
        regs: &dyn Regs,
        off: u32,
        done: impl Fn(u32) -> bool,
        domain: &'static str,
        what: &'static str,
    ) -> Result<u32, PowerError> {
        let polls = self.max_polls.max(1);
        for i in 0..polls {
            let v = regs.read(off);
            if done(v) {
                return Ok(v);
            }
            if i + 1 < polls {
                (self.delay_us)(1);
            }
        }
        Err(PowerError::Timeout { domain, what })
    }
}

/// Read-modify-write of the bits in `mask` to `val`; skips the write if nothing changes.
pub(crate) fn update_bits(regs: &dyn Regs, off: u32, mask: u32, val: u32) {
    let old = regs.read(off);
    let new = (old & !mask) | (val & mask);
    if new != old {
        regs.write(off, new);
    }
}
