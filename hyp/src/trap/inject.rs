//! Injecting a synchronous abort into a guest's EL1, as pure arithmetic on its saved state.
//!
//! When a guest access cannot be emulated (an IPA no device claims, an access without a valid
//! instruction syndrome, a fault on a stage-1 walk) the guest must see the same thing real
//! hardware would give it: a synchronous external abort taken to its own EL1. The hypervisor does
//! what the PE does on exception entry to AArch64 EL1, by hand, in the guest's saved state; on
//! ERET the guest then starts at its vector with the new PSTATE.
//!
//! Source: Arm ARM (DDI 0487), D1.3 "Exceptions" / "Exception entry" (what is saved where,
//! PSTATE on entry: DAIF set, SS/IL/UAO/BTYPE cleared, PAN set when `SCTLR_ELx.SPAN` is 0, SSBS
//! from `SCTLR_ELx.DSSBS`, NZCV/DIT kept), D1.3.1 "Exception vectors" (table offsets), and the
//! ESR_ELx ISS encodings for Data/Instruction Aborts (EC 0x24/0x25, 0x20/0x21; DFSC/IFSC 0b010000
//! "Synchronous External abort, not on translation table walk").

/// `SPSR_ELx` / PSTATE bits (AArch64 layout).
mod spsr {
    pub const N: u64 = 1 << 31;
    pub const Z: u64 = 1 << 30;
    pub const C: u64 = 1 << 29;
    pub const V: u64 = 1 << 28;
    pub const DIT: u64 = 1 << 24;
    pub const PAN: u64 = 1 << 22;
    pub const SSBS: u64 = 1 << 12;
    pub const D: u64 = 1 << 9;
    pub const A: u64 = 1 << 8;
    pub const I: u64 = 1 << 7;
    pub const F: u64 = 1 << 6;
    /// `M[4]`: the interrupted state was AArch32.
    pub const M_AARCH32: u64 = 1 << 4;
    /// `M[3:2]`: the interrupted Exception level.
    pub const M_EL_SHIFT: u32 = 2;
    /// `M[0]`: SP_ELx (1) or SP_EL0 (0) was selected.
    pub const M_SPX: u64 = 1;
    /// `M[3:0]` = 0b0101: EL1 using SP_EL1.
    pub const M_EL1H: u64 = 0b0101;
}

/// `SCTLR_EL1` bits that decide PSTATE on exception entry.
mod sctlr {
    /// Set Privileged Access Never: 0 means PSTATE.PAN is set on entry to EL1. RES1 without
    /// FEAT_PAN, so PAN is then never set.
    pub const SPAN: u64 = 1 << 23;
    /// Default SSBS value on exception entry (RES0 without FEAT_SSBS).
    pub const DSSBS: u64 = 1 << 44;
}

/// Offsets of the synchronous entries in the vector table at `VBAR_EL1`.
mod vector {
    pub const CURRENT_SP0: u64 = 0x000;
    pub const CURRENT_SPX: u64 = 0x200;
    pub const LOWER_AARCH64: u64 = 0x400;
    pub const LOWER_AARCH32: u64 = 0x600;
}

/// `VBAR_EL1[10:0]` are RES0: the table is 2 KiB aligned.
const VBAR_MASK: u64 = !0x7ff;

const ESR_EC_SHIFT: u32 = 26;
const ESR_IL: u64 = 1 << 25;
/// DFSC/IFSC: synchronous external abort, not on a translation table walk.
const FSC_SYNC_EXTERNAL: u64 = 0x10;

/// The guest state that decides where and how the exception is delivered, as saved on the trap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestExcState {
    /// The guest PC at the trap (for an abort, the faulting instruction).
    pub elr_el2: u64,
    /// The guest PSTATE at the trap.
    pub spsr_el2: u64,
    /// The guest's vector base.
    pub vbar_el1: u64,
    /// The guest's `SCTLR_EL1`: its SPAN and DSSBS bits set PSTATE.PAN and PSTATE.SSBS on entry.
    pub sctlr_el1: u64,
}

/// Which abort to inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortKind {
    /// A data access failed (ESR EC 0x24/0x25).
    Data,
    /// An instruction fetch failed (ESR EC 0x20/0x21).
    Instruction,
}

/// The register values that deliver the exception: the arch layer writes the `*_el1` registers
/// into the guest's EL1 state and `elr_el2`/`spsr_el2` into the saved context, then ERETs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InjectedException {
    /// New guest PC: the synchronous vector.
    pub elr_el2: u64,
    /// New guest PSTATE: EL1h with D, A, I and F masked, as hardware sets on exception entry.
    pub spsr_el2: u64,
    /// Syndrome the guest's handler reads.
    pub esr_el1: u64,
    /// Faulting virtual address the guest's handler reads.
    pub far_el1: u64,
    /// Return address for the guest's handler: the old PC.
    pub elr_el1: u64,
    /// The old PSTATE.
    pub spsr_el1: u64,
}

/// Computes the state that delivers a synchronous external abort at virtual address `far` to the
/// guest's EL1, as if the guest's own memory system had reported it.
///
/// The guest's interrupted Exception level decides the vector and the EC: EL1 (from `spsr_el2`
/// `M[3:2]`; any non-zero level is taken as EL1, the only one a guest above EL0 can have) gives
/// "current EL" (offset 0x000 with SP_EL0, 0x200 with SP_EL1) and EC "same EL"; EL0 gives
/// "lower EL" (0x400 for AArch64, 0x600 for AArch32) and EC "lower EL".
pub fn inject_sync_abort(guest: &GuestExcState, kind: AbortKind, far: u64) -> InjectedException {
    let old = guest.spsr_el2;
    let from_el0 = (old >> spsr::M_EL_SHIFT) & 0b11 == 0 || old & spsr::M_AARCH32 != 0;
    let offset = if old & spsr::M_AARCH32 != 0 {
        vector::LOWER_AARCH32
    } else if from_el0 {
        vector::LOWER_AARCH64
    } else if old & spsr::M_SPX != 0 {
        vector::CURRENT_SPX
    } else {
        vector::CURRENT_SP0
    };

    let ec: u64 = match (kind, from_el0) {
        (AbortKind::Data, true) => 0x24,
        (AbortKind::Data, false) => 0x25,
        (AbortKind::Instruction, true) => 0x20,
        (AbortKind::Instruction, false) => 0x21,
    };
    // WnR, ISV, S1PTW etc. stay 0: an external abort need not say more, and IL is 1 because the
    // syndrome has no instruction-length information (IL is RES1 for these aborts).
    let esr_el1 = (ec << ESR_EC_SHIFT) | ESR_IL | FSC_SYNC_EXTERNAL;

    InjectedException {
        elr_el2: (guest.vbar_el1 & VBAR_MASK) + offset,
        spsr_el2: entry_pstate(old, guest.sctlr_el1),
        esr_el1,
        far_el1: far,
        elr_el1: guest.elr_el2,
        spsr_el1: old,
    }
}

/// PSTATE after exception entry to AArch64 EL1h, given the PSTATE before it.
///
/// Kept: NZCV, DIT, and PAN unless it gets set. Set: D, A, I, F; PAN when `SCTLR_EL1.SPAN` is 0;
/// SSBS from `SCTLR_EL1.DSSBS`. Cleared: everything else (SS, IL, UAO, BTYPE, the AArch32 bits).
/// TCO is left 0 because guests get no MTE (`HCR_EL2.ATA` = 0), where the bit is RES0.
fn entry_pstate(old: u64, sctlr_el1: u64) -> u64 {
    let mut new = old & (spsr::N | spsr::Z | spsr::C | spsr::V | spsr::DIT | spsr::PAN);
    if sctlr_el1 & sctlr::SPAN == 0 {
        new |= spsr::PAN;
    }
    if sctlr_el1 & sctlr::DSSBS != 0 {
        new |= spsr::SSBS;
    }
    new | spsr::D | spsr::A | spsr::I | spsr::F | spsr::M_EL1H
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SCTLR_EL1 of a guest without FEAT_PAN in use (SPAN = 1).
    const SCTLR_SPAN: u64 = sctlr::SPAN;

    #[test]
    fn data_abort_from_el1h() {
        // EL1h, Z and C set, IRQs unmasked.
        let guest = GuestExcState {
            elr_el2: 0xffff_8000_1234_5678,
            spsr_el2: 0x6000_0005,
            vbar_el1: 0xffff_8000_1000_0800,
            sctlr_el1: SCTLR_SPAN,
        };
        let inj = inject_sync_abort(&guest, AbortKind::Data, 0xffff_0000_0900_0000);
        assert_eq!(inj.elr_el2, 0xffff_8000_1000_0a00);
        assert_eq!(inj.spsr_el2, 0x6000_03c5);
        // EC 0x25, IL, DFSC 0x10.
        assert_eq!(inj.esr_el1, 0x9600_0010);
        assert_eq!(inj.far_el1, 0xffff_0000_0900_0000);
        assert_eq!(inj.elr_el1, 0xffff_8000_1234_5678);
        assert_eq!(inj.spsr_el1, 0x6000_0005);
    }

    #[test]
    fn instruction_abort_from_el1t() {
        let guest = GuestExcState {
            elr_el2: 0x4008_0000,
            spsr_el2: 0x3c4,
            vbar_el1: 0x4000_0000,
            sctlr_el1: SCTLR_SPAN,
        };
        let inj = inject_sync_abort(&guest, AbortKind::Instruction, 0x4008_0000);
        assert_eq!(inj.elr_el2, 0x4000_0000);
        assert_eq!(inj.esr_el1, 0x8600_0010);
        assert_eq!(inj.spsr_el2, 0x3c5);
    }

    #[test]
    fn aborts_from_el0() {
        // EL0t, AArch64, with single-step (SS) and BTYPE set, which entry clears; PAN gets set
        // because SPAN = 0 and SSBS comes from DSSBS.
        let guest = GuestExcState {
            elr_el2: 0x40_0000,
            spsr_el2: 0x8000_0000 | (1 << 21) | (0b10 << 10),
            vbar_el1: 0xffff_8000_1000_0000 | 0x7ff,
            sctlr_el1: sctlr::DSSBS,
        };
        let inj = inject_sync_abort(&guest, AbortKind::Data, 0x1234);
        assert_eq!(inj.elr_el2, 0xffff_8000_1000_0400);
        assert_eq!(inj.esr_el1, 0x9200_0010);
        assert_eq!(
            inj.spsr_el2,
            0x8000_0000 | spsr::PAN | spsr::SSBS | 0x3c0 | 0b0101
        );
        assert_eq!(inj.spsr_el1, guest.spsr_el2);
        assert_eq!(inj.elr_el1, 0x40_0000);

        let inj = inject_sync_abort(&guest, AbortKind::Instruction, 0x40_0000);
        assert_eq!(inj.esr_el1, 0x8200_0010);

        // AArch32 EL0 (M = 0b10000, usr).
        let guest = GuestExcState {
            spsr_el2: 0x10,
            ..guest
        };
        let inj = inject_sync_abort(&guest, AbortKind::Data, 0);
        assert_eq!(inj.elr_el2, 0xffff_8000_1000_0600);
        assert_eq!(inj.esr_el1, 0x9200_0010);
    }
}
