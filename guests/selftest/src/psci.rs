//! PSCI / SMCCC calls through `hvc #0` (and `smc #0`, which the hypervisor
//! also traps).

use core::arch::asm;

pub const SMCCC_VERSION: u32 = 0x8000_0000;
pub const PSCI_VERSION: u32 = 0x8400_0000;
pub const CPU_OFF: u32 = 0x8400_0002;
pub const CPU_ON64: u32 = 0xc400_0003;
pub const AFFINITY_INFO64: u32 = 0xc400_0004;
pub const SYSTEM_OFF: u32 = 0x8400_0008;
pub const SYSTEM_RESET: u32 = 0x8400_0009;
pub const PSCI_FEATURES: u32 = 0x8400_000a;

pub const NOT_SUPPORTED: i32 = -1;
pub const INVALID_PARAMETERS: i32 = -2;
pub const ALREADY_ON: i32 = -4;

/// AFFINITY_INFO result: the vCPU is off.
pub const AFF_OFF: i32 = 1;

/// How a call reaches the hypervisor.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Conduit {
    Hvc,
    Smc,
}

/// Makes an SMCCC call and returns x0 unmodified.
///
/// # Safety
/// The call must not break memory safety: in particular a CPU_ON entry point
/// must be code that can run a vCPU from reset state (use [`cpu_on`]).
pub unsafe fn call_raw(conduit: Conduit, fid: u32, a1: u64, a2: u64, a3: u64) -> u64 {
    // SAFETY: per the caller.
    let [x0, ..] = unsafe { call_regs(conduit, fid, a1, a2, a3) };
    x0
}

/// Makes an SMCCC call and returns x0..x3 as the callee left them (for calls
/// that return more than a status).
///
/// # Safety
/// As for [`call_raw`].
pub unsafe fn call_regs(conduit: Conduit, fid: u32, a1: u64, a2: u64, a3: u64) -> [u64; 4] {
    let (mut x0, mut x1, mut x2, mut x3) = (u64::from(fid), a1, a2, a3);
    match conduit {
        // SAFETY: the caller guarantees the call itself is harmless; the
        // asm declares every register SMCCC lets the callee clobber.
        Conduit::Hvc => unsafe {
            asm!("hvc #0", inout("x0") x0, inout("x1") x1, inout("x2") x2,
                 inout("x3") x3, clobber_abi("C"), options(nostack));
        },
        // SAFETY: as above.
        Conduit::Smc => unsafe {
            asm!("smc #0", inout("x0") x0, inout("x1") x1, inout("x2") x2,
                 inout("x3") x3, clobber_abi("C"), options(nostack));
        },
    }
    [x0, x1, x2, x3]
}

/// Makes a call that has no side effects on this guest's memory or vCPUs
/// (version and feature queries, unknown function IDs) and returns x0.
pub fn query(conduit: Conduit, fid: u32, a1: u64) -> u64 {
    assert!(
        !matches!(fid, CPU_ON64 | CPU_OFF | SYSTEM_OFF | SYSTEM_RESET),
        "not a query: {fid:#x}"
    );
    // SAFETY: the functions allowed here only return information.
    unsafe { call_raw(conduit, fid, a1, 0, 0) }
}

/// The PSCI (int32) result in x0.
pub fn status(x0: u64) -> i32 {
    x0 as u32 as i32
}

/// PSCI_VERSION through `hvc`.
pub fn version() -> u64 {
    query(Conduit::Hvc, PSCI_VERSION, 0) & 0xffff_ffff
}

/// CPU_ON64 for `mpidr`, entering at the secondary entry point with
/// `context` in x0.
pub fn cpu_on(mpidr: u64, context: u64) -> i32 {
    // SAFETY: the entry point is the boot code's secondary entry, which sets
    // up its own stack and MMU and only touches this guest's atomics.
    status(unsafe {
        call_raw(
            Conduit::Hvc,
            CPU_ON64,
            mpidr,
            crate::boot::secondary_entry(),
            context,
        )
    })
}

/// CPU_OFF for the calling vCPU; returns only on failure.
pub fn cpu_off() -> i32 {
    // SAFETY: turning the calling vCPU off only stops this vCPU.
    status(unsafe { call_raw(Conduit::Hvc, CPU_OFF, 0, 0, 0) })
}

/// AFFINITY_INFO64 for `mpidr` at level 0.
pub fn affinity_info(mpidr: u64) -> i32 {
    status(query(Conduit::Hvc, AFFINITY_INFO64, mpidr))
}

/// SYSTEM_OFF; parks the vCPU if the call returns.
pub fn system_off() -> ! {
    // SAFETY: powering the VM off ends this guest; no memory is touched.
    let r = unsafe { call_raw(Conduit::Hvc, SYSTEM_OFF, 0, 0, 0) };
    crate::console::println!("selftest: SYSTEM_OFF returned {:#x}", r);
    park()
}

/// SYSTEM_RESET; parks the vCPU if the call returns.
pub fn system_reset() -> ! {
    // SAFETY: resetting the VM ends this guest; no memory is touched.
    let r = unsafe { call_raw(Conduit::Hvc, SYSTEM_RESET, 0, 0, 0) };
    crate::console::println!("selftest: SYSTEM_RESET returned {:#x}", r);
    park()
}

/// Waits forever.
pub fn park() -> ! {
    loop {
        // SAFETY: `wfe` only waits for an event.
        unsafe { asm!("wfe", options(nomem, nostack, preserves_flags)) };
    }
}
