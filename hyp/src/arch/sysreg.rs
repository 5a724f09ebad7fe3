//! System registers `aarch64-cpu` does not cover, cache and TLB maintenance, and barriers.
//!
//! aarch64-cpu's accessors are used where it has the register (typed fields); the macros here
//! cover the rest (GIC CPU interface, EL2 timer compare values, VPIDR_EL2, EL1 context registers).

/// Reads a system register by name.
macro_rules! read_sysreg {
    ($name:literal) => {{
        let v: u64;
        // SAFETY: reading a system register has no memory effects.
        #[allow(unused_unsafe)]
        unsafe { core::arch::asm!(concat!("mrs {}, ", $name), out(reg) v, options(nomem, nostack, preserves_flags)) };
        v
    }};
}

/// Writes a system register by name. Callers justify the write with a `// SAFETY:` line.
macro_rules! write_sysreg {
    ($name:literal, $v:expr) => {{
        let v: u64 = $v;
        core::arch::asm!(concat!("msr ", $name, ", {}"), in(reg) v, options(nostack, preserves_flags))
    }};
}

pub(crate) use {read_sysreg, write_sysreg};

/// Cache line size used for maintenance (the architectural minimum is 16 bytes; read CTR_EL0).
fn dcache_line() -> u64 {
    let ctr = read_sysreg!("ctr_el0");
    4 << ((ctr >> 16) & 0xf)
}

/// Cleans `[start, start + len)` to the point of coherency, so agents that read memory with
/// caches off (a guest with its MMU off, a CPU being started, a non-coherent SMMU) see our writes.
pub fn clean_dcache_range(start: u64, len: u64) {
    let line = dcache_line();
    let mut addr = start & !(line - 1);
    while addr < start + len {
        // SAFETY: cache maintenance by VA on mapped memory does not change its contents.
        unsafe { core::arch::asm!("dc cvac, {}", in(reg) addr, options(nostack, preserves_flags)) };
        addr += line;
    }
    dsb_sy();
}

/// Invalidates all instruction caches to the point of unification, inner shareable.
pub fn invalidate_icache_all() {
    // SAFETY: invalidating the instruction cache has no effect on memory contents.
    unsafe {
        core::arch::asm!(
            "ic ialluis",
            "dsb ish",
            "isb",
            options(nostack, preserves_flags)
        )
    };
}

/// Full-system data synchronisation barrier.
pub fn dsb_sy() {
    // SAFETY: barriers only order memory accesses.
    unsafe { core::arch::asm!("dsb sy", options(nostack, preserves_flags)) };
}

/// Inner-shareable data synchronisation barrier.
pub fn dsb_ish() {
    // SAFETY: barriers only order memory accesses.
    unsafe { core::arch::asm!("dsb ish", options(nostack, preserves_flags)) };
}

/// Instruction synchronisation barrier.
pub fn isb() {
    // SAFETY: barriers only order instruction fetch.
    unsafe { core::arch::asm!("isb", options(nostack, preserves_flags)) };
}

/// Send event to all CPUs (wakes WFE waiters).
pub fn sev() {
    // SAFETY: SEV has no memory effects.
    unsafe { core::arch::asm!("dsb ishst", "sev", options(nostack, preserves_flags)) };
}

/// Wait for event.
pub fn wfe() {
    // SAFETY: WFE only pauses the CPU.
    unsafe { core::arch::asm!("wfe", options(nostack, preserves_flags)) };
}

/// The MPIDR affinity fields of this CPU (Aff3..Aff0, without the U/MT bits).
pub fn mpidr() -> u64 {
    read_sysreg!("mpidr_el1") & 0xff_00ff_ffff
}

/// The system counter, in ticks of [`counter_freq`].
pub fn counter() -> u64 {
    isb();
    read_sysreg!("cntpct_el0")
}

/// The system counter frequency in Hz.
pub fn counter_freq() -> u64 {
    read_sysreg!("cntfrq_el0")
}
