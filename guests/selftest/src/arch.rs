//! Small wrappers around system registers, the generic timer and MMIO.

use core::arch::asm;

/// The affinity fields of MPIDR_EL1 (Aff3, Aff2, Aff1, Aff0), as used by PSCI.
pub const MPIDR_AFF_MASK: u64 = 0xff_00ff_ffff;

macro_rules! read_sysreg {
    ($name:ident, $reg:literal) => {
        #[doc = concat!("Reads `", $reg, "`.")]
        pub fn $name() -> u64 {
            let v: u64;
            // SAFETY: reading this system register has no side effects.
            unsafe {
                asm!(concat!("mrs {}, ", $reg), out(reg) v, options(nomem, nostack, preserves_flags));
            }
            v
        }
    };
}

read_sysreg!(mpidr_el1, "mpidr_el1");
read_sysreg!(esr_el1, "esr_el1");
read_sysreg!(far_el1, "far_el1");
read_sysreg!(elr_el1, "elr_el1");
read_sysreg!(cntfrq_el0, "cntfrq_el0");

/// Writes ELR_EL1 (only meaningful inside an exception handler).
pub fn set_elr_el1(v: u64) {
    // SAFETY: ELR_EL1 only matters for the next `eret`, which happens in the
    // exception handler that calls this to skip the faulting instruction.
    unsafe { asm!("msr elr_el1, {}", in(reg) v, options(nomem, nostack, preserves_flags)) };
}

/// The affinity of the calling vCPU (MPIDR_EL1 with only the Aff fields).
pub fn my_mpidr() -> u64 {
    mpidr_el1() & MPIDR_AFF_MASK
}

/// Reads the virtual counter (CNTVCT_EL0), ordered after earlier instructions.
pub fn cntvct_el0() -> u64 {
    let v: u64;
    // SAFETY: reading the virtual counter has no side effects.
    unsafe {
        asm!("isb", "mrs {}, cntvct_el0", out(reg) v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// A point in time, measured with the virtual counter.
pub struct Deadline(u64);

impl Deadline {
    /// `ms` milliseconds from now.
    pub fn after_ms(ms: u64) -> Self {
        Deadline(cntvct_el0().saturating_add(Self::freq() * ms / 1000))
    }

    /// `us` microseconds from now.
    pub fn after_us(us: u64) -> Self {
        Deadline(cntvct_el0().saturating_add(Self::freq() * us / 1_000_000))
    }

    /// The counter's frequency in Hz.
    pub fn freq() -> u64 {
        match cntfrq_el0() & 0xffff_ffff {
            0 => 100_000_000, // CNTFRQ not set up: assume 100 MHz
            f => f,
        }
    }

    /// Spins until the deadline has passed.
    pub fn wait(&self) {
        while !self.expired() {
            core::hint::spin_loop();
        }
    }

    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        cntvct_el0() >= self.0
    }
}

/// Spins until `cond` holds or `ms` milliseconds pass; returns whether `cond`
/// held.
pub fn wait_until(ms: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Deadline::after_ms(ms);
    loop {
        if cond() {
            return true;
        }
        if deadline.expired() {
            return cond();
        }
        core::hint::spin_loop();
    }
}

/// 32-bit MMIO read with a single `ldr` (a trap with a valid syndrome).
///
/// # Safety
/// `addr` must be a 4-byte aligned device register (or memory) that may be
/// read without breaking memory safety.
pub unsafe fn mmio_read32(addr: usize) -> u32 {
    let v: u32;
    // SAFETY: the caller guarantees the address may be read.
    unsafe {
        asm!("ldr {v:w}, [{a}]", a = in(reg) addr, v = out(reg) v, options(nostack, preserves_flags))
    };
    v
}

/// 32-bit MMIO write with a single `str` (a trap with a valid syndrome).
///
/// # Safety
/// `addr` must be a 4-byte aligned device register (or memory) that may be
/// written without breaking memory safety.
pub unsafe fn mmio_write32(addr: usize, v: u32) {
    // SAFETY: the caller guarantees the address may be written.
    unsafe {
        asm!("str {v:w}, [{a}]", a = in(reg) addr, v = in(reg) v, options(nostack, preserves_flags))
    };
}
