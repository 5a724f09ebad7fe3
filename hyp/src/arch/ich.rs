//! The GICv3 virtual CPU interface control registers (ICH_*_EL2) of this pCPU.
//!
//! Each pCPU runs one vCPU for the whole run, so the list registers are never switched between
//! vCPUs: the portable vGIC (`crate::vgic`) fills them before the guest runs and reads them back
//! after it exits, through these accessors.

use super::sysreg::{isb, read_sysreg, write_sysreg};

/// ICH_HCR_EL2.En: the virtual CPU interface is on.
pub const HCR_EN: u64 = 1 << 0;
/// ICH_HCR_EL2.UIE: maintenance interrupt when (almost) no list register holds a valid entry.
pub const HCR_UIE: u64 = 1 << 1;
/// ICH_HCR_EL2.NPIE: maintenance interrupt when no list register holds a pending entry.
pub const HCR_NPIE: u64 = 1 << 3;

/// Number of implemented list registers (ICH_VTR_EL2.ListRegs + 1).
pub fn num_lrs() -> usize {
    ((read_sysreg!("ich_vtr_el2") & 0x1f) + 1) as usize
}

/// Reads ICH_LR<n>_EL2.
pub fn read_lr(n: usize) -> u64 {
    macro_rules! rd {
        ($($i:literal => $r:literal),*) => {
            match n { $($i => read_sysreg!($r),)* _ => panic!("no list register {n}") }
        };
    }
    rd!(0 => "ich_lr0_el2", 1 => "ich_lr1_el2", 2 => "ich_lr2_el2", 3 => "ich_lr3_el2",
        4 => "ich_lr4_el2", 5 => "ich_lr5_el2", 6 => "ich_lr6_el2", 7 => "ich_lr7_el2",
        8 => "ich_lr8_el2", 9 => "ich_lr9_el2", 10 => "ich_lr10_el2", 11 => "ich_lr11_el2",
        12 => "ich_lr12_el2", 13 => "ich_lr13_el2", 14 => "ich_lr14_el2", 15 => "ich_lr15_el2")
}

/// Writes ICH_LR<n>_EL2.
pub fn write_lr(n: usize, v: u64) {
    macro_rules! wr {
        ($($i:literal => $r:literal),*) => {
            // SAFETY: a list register only affects the virtual interrupts of this pCPU's vCPU.
            match n { $($i => unsafe { write_sysreg!($r, v) },)* _ => panic!("no list register {n}") }
        };
    }
    wr!(0 => "ich_lr0_el2", 1 => "ich_lr1_el2", 2 => "ich_lr2_el2", 3 => "ich_lr3_el2",
        4 => "ich_lr4_el2", 5 => "ich_lr5_el2", 6 => "ich_lr6_el2", 7 => "ich_lr7_el2",
        8 => "ich_lr8_el2", 9 => "ich_lr9_el2", 10 => "ich_lr10_el2", 11 => "ich_lr11_el2",
        12 => "ich_lr12_el2", 13 => "ich_lr13_el2", 14 => "ich_lr14_el2", 15 => "ich_lr15_el2")
}

/// Writes ICH_HCR_EL2.
pub fn write_hcr(v: u64) {
    // SAFETY: controls only this pCPU's virtual CPU interface.
    unsafe { write_sysreg!("ich_hcr_el2", v) };
    isb();
}

/// Reads ICH_MISR_EL2 (why a maintenance interrupt is asserted).
pub fn misr() -> u64 {
    read_sysreg!("ich_misr_el2")
}

/// Reads ICH_ELRSR_EL2 (bit n: list register n holds no valid interrupt).
pub fn elrsr() -> u64 {
    read_sysreg!("ich_elrsr_el2")
}

/// Resets the virtual CPU interface for a vCPU that starts: every list register empty, the
/// virtual machine control register cleared (the guest programs its own priority mask and
/// group enables), the interface on.
pub fn reset(lrs: usize) {
    for n in 0..lrs {
        write_lr(n, 0);
    }
    // SAFETY: the guest's virtual interface state; the vCPU is (re)starting.
    unsafe {
        write_sysreg!("ich_vmcr_el2", 0);
        write_sysreg!("ich_ap1r0_el2", 0);
    }
    write_hcr(HCR_EN);
}
