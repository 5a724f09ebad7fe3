//! Per-pCPU EL2 configuration for running a guest: HCR_EL2, stage-2 registers, the guest's
//! identity registers, trap controls, EL1 register reset and exception injection.

use super::sysreg::{isb, read_sysreg, write_sysreg};
use crate::trap::InjectedException;

/// HCR_EL2: VM (stage 2 on), SWIO, FMO/IMO/AMO (physical interrupts and SErrors to EL2), FB and
/// BSU=inner (broadcast the guest's TLB/cache maintenance), TWI (trap WFI: the hypervisor waits
/// for the vCPU's next virtual interrupt itself, since one raised by the hypervisor would not wake
/// a physical WFI), TSC (trap SMC: guests' PSCI via SMC is emulated too), RW (EL1 is AArch64),
/// APK and API (pointer authentication keys and instructions do not trap: each pCPU runs one
/// vCPU and the hypervisor never uses pointer authentication, so the guest owns the keys).
const HCR_EL2: u64 = (1 << 0)
    | (1 << 1)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 9)
    | (1 << 10)
    | (1 << 13)
    | (1 << 19)
    | (1 << 31)
    | (1 << 40)
    | (1 << 41);

/// CPTR_EL2 (non-VHE) RES1 bits; TFP, TZ and TSM clear: the guest owns FP/SIMD/SVE outright
/// because the hypervisor (soft-float) never uses those registers.
const CPTR_EL2: u64 = (1 << 13) | (1 << 9) | 0xff;

/// SCTLR_EL1 at vCPU reset: MMU and caches off, RES1 bits set.
const SCTLR_EL1_RESET: u64 = 0x30d0_0800;

/// PSTATE for a vCPU at reset: EL1h, D/A/I/F masked.
pub const SPSR_EL1H_MASKED: u64 = 0x3c5;

/// Routes physical IRQs, FIQs and SErrors to EL2 (HCR_EL2.IMO/FMO/AMO) with EL1 in AArch64, so
/// the hypervisor's own interrupts reach it before any guest runs (an interrupt that targets EL1
/// is never taken while executing at EL2).
pub fn route_interrupts_to_el2() {
    // SAFETY: no guest runs yet; this only changes where physical interrupts are taken.
    unsafe { write_sysreg!("hcr_el2", (1 << 31) | (1 << 5) | (1 << 4) | (1 << 3)) };
    isb();
}

/// Stage-2 translation setup for a VM.
#[derive(Clone, Copy, Debug)]
pub struct Stage2Regs {
    pub vtcr: u64,
    pub vttbr: u64,
}

/// VTCR_EL2 for a 4 KiB-granule table of `ipa_bits` starting at `start_level`, with the output
/// size the CPU supports and 16-bit VMIDs where available.
pub fn vtcr(ipa_bits: u32, start_level: u32) -> u64 {
    let t0sz = 64 - ipa_bits as u64;
    // SL0 for 4 KiB granule: 0 → level 2, 1 → level 1, 2 → level 0.
    let sl0 = match start_level {
        0 => 2,
        1 => 1,
        _ => 0,
    };
    let ps = super::mmu::pa_range_code();
    let vmid16 = (read_sysreg!("id_aa64mmfr1_el1") >> 4) & 0xf == 2;
    t0sz | (sl0 << 6)
        | (1 << 8)       // IRGN0: write-back write-allocate
        | (1 << 10)      // ORGN0
        | (3 << 12)      // SH0: inner shareable
        | (ps << 16)
        | ((vmid16 as u64) << 19)
        | (1 << 31)
}

/// Configures this pCPU to run vCPU `vcpu_index` of a VM with the given stage 2.
///
/// # Safety
/// `s2` must describe a complete, valid stage-2 table for the VM; nothing else may be running
/// guest code on this pCPU.
pub unsafe fn configure(s2: &Stage2Regs, vcpu_index: usize) {
    let midr = read_sysreg!("midr_el1");
    // SAFETY: per the caller's guarantee; these registers only affect the guest about to run.
    unsafe {
        write_sysreg!("vtcr_el2", s2.vtcr);
        write_sysreg!("vttbr_el2", s2.vttbr);
        write_sysreg!("hcr_el2", HCR_EL2);
        write_sysreg!("cptr_el2", CPTR_EL2);
        write_sysreg!("hstr_el2", 0);
        // EL1 may read the counter but not program the physical timer (EL1PCTEN=1, EL1PCEN=0).
        write_sysreg!("cnthctl_el2", 1);
        write_sysreg!("cntvoff_el2", 0);
        write_sysreg!("vpidr_el2", midr);
        write_sysreg!("vmpidr_el2", (1 << 31) | vcpu_index as u64);
        isb();
        core::arch::asm!("tlbi vmalls12e1", "dsb nsh", "isb", options(nostack));
    }
}

/// Puts the EL1 registers the guest owns into their reset state (MMU off), before a vCPU starts
/// or restarts after CPU_OFF.
pub fn reset_el1() {
    // SAFETY: EL1 state belongs to the guest about to be (re)started on this pCPU; EL2 does not
    // depend on it.
    unsafe {
        write_sysreg!("sctlr_el1", SCTLR_EL1_RESET);
        write_sysreg!("tcr_el1", 0);
        write_sysreg!("ttbr0_el1", 0);
        write_sysreg!("ttbr1_el1", 0);
        write_sysreg!("mair_el1", 0);
        write_sysreg!("vbar_el1", 0);
        write_sysreg!("cpacr_el1", 0);
        write_sysreg!("contextidr_el1", 0);
        write_sysreg!("tpidr_el1", 0);
        write_sysreg!("tpidr_el0", 0);
        write_sysreg!("tpidrro_el0", 0);
        write_sysreg!("sp_el1", 0);
        write_sysreg!("sp_el0", 0);
        write_sysreg!("cntv_ctl_el0", 0);
        write_sysreg!("cntkctl_el1", 0);
        write_sysreg!("mdscr_el1", 0);
    }
    isb();
}

/// Syndrome of the exception the guest just took to EL2.
pub fn trap_syndrome() -> (u64, u64, u64) {
    (
        read_sysreg!("esr_el2"),
        read_sysreg!("far_el2"),
        read_sysreg!("hpfar_el2"),
    )
}

/// VBAR_EL1 of the running guest (for exception injection).
pub fn guest_vbar() -> u64 {
    read_sysreg!("vbar_el1")
}

/// SCTLR_EL1 of the running guest (its SPAN/DSSBS bits shape an injected exception's PSTATE).
pub fn guest_sctlr() -> u64 {
    read_sysreg!("sctlr_el1")
}

/// Writes the EL1 side of an injected exception; the caller sets the guest's ELR/SPSR (the
/// EL2 return state) from the same value.
pub fn apply_injection(inj: &InjectedException) {
    // SAFETY: these EL1 registers are the guest's exception state; changing them is what an
    // exception taken to EL1 would do.
    unsafe {
        write_sysreg!("esr_el1", inj.esr_el1);
        write_sysreg!("far_el1", inj.far_el1);
        write_sysreg!("elr_el1", inj.elr_el1);
        write_sysreg!("spsr_el1", inj.spsr_el1);
    }
    isb();
}

/// Points TPIDR_EL2 at the running vCPU's register block (the exit path stores into it).
///
/// # Safety
/// `regs` must stay valid while the guest can exit, i.e. for the vCPU's lifetime.
pub unsafe fn set_current_regs(regs: *mut super::exceptions::GuestRegs) {
    // SAFETY: per the caller's guarantee.
    unsafe { write_sysreg!("tpidr_el2", regs as u64) };
}
