//! Decoding of the exception syndrome (`ESR_EL2`) of a trap taken from a guest.
//!
//! The arch layer reads `ESR_EL2`, `FAR_EL2` and `HPFAR_EL2` on the EL2 exception path and hands
//! the raw values to [`decode`]; everything here is plain bit arithmetic so it is unit-tested on
//! the host. Field layouts are from the Arm ARM (DDI 0487), section D24.2.48 "ESR_EL2" and the ISS
//! encodings it references ("ISS encoding for an exception from a Data Abort", "... from an
//! Instruction Abort", "... from an HVC or SVC instruction execution", "... from MSR, MRS, or
//! System instruction execution", "... from a WF* instruction"), and D24.2.62 "HPFAR_EL2".
//!
//! `EC`, `IL` and `ISS` are read with the `aarch64-cpu` bitfield definitions through a
//! [`LocalRegisterCopy`], which is pure and never touches the system register; the ISS sub-fields
//! are not in that crate, so they are spelled out below.

use core::fmt;

use aarch64_cpu::registers::{ESR_EL2, HPFAR_EL2};
use tock_registers::LocalRegisterCopy;

type Esr = LocalRegisterCopy<u64, ESR_EL2::Register>;

/// Exception classes we decode, as raw `ESR_EL2.EC` values.
mod ec {
    use aarch64_cpu::registers::ESR_EL2::EC::Value;

    pub const WFX: u64 = Value::TrappedWFIorWFE as u64;
    pub const FP: u64 = Value::TrappedFP as u64;
    pub const HVC64: u64 = Value::HVC64 as u64;
    pub const SMC64: u64 = Value::SMC64 as u64;
    pub const SYSREG: u64 = Value::TrappedMsrMrs as u64;
    pub const IABT_LOWER: u64 = Value::InstrAbortLowerEL as u64;
    pub const DABT_LOWER: u64 = Value::DataAbortLowerEL as u64;
}

// ISS of a Data Abort (also used, in part, by Instruction Aborts).
/// Instruction Syndrome Valid: `ISS[23:14]` describe the faulting load/store.
const ISS_ISV: u32 = 1 << 24;
/// Syndrome Access Size: log2 of the access size in bytes.
const ISS_SAS_SHIFT: u32 = 22;
/// Syndrome Sign Extend: the load sign-extends its result.
const ISS_SSE: u32 = 1 << 21;
/// Syndrome Register Transfer: the Rt/Rs of the load/store (31 = XZR).
const ISS_SRT_SHIFT: u32 = 16;
/// Sixty-Four: the register is an X register (1) or a W register (0).
const ISS_SF: u32 = 1 << 15;
/// Stage-2 fault on the stage-1 translation table walk rather than on the access itself.
const ISS_S1PTW: u32 = 1 << 7;
/// Write not Read.
const ISS_WNR: u32 = 1 << 6;
/// Data/Instruction Fault Status Code.
const ISS_FSC_MASK: u32 = 0x3f;

// ISS of MSR/MRS/system instruction traps (EC 0x18).
const SYSREG_OP0_SHIFT: u32 = 20;
const SYSREG_OP2_SHIFT: u32 = 17;
const SYSREG_OP1_SHIFT: u32 = 14;
const SYSREG_CRN_SHIFT: u32 = 10;
const SYSREG_RT_SHIFT: u32 = 5;
const SYSREG_CRM_SHIFT: u32 = 1;
/// Direction: 1 = read (MRS, SYSL), 0 = write (MSR, SYS).
const SYSREG_DIR_READ: u32 = 1;

/// `FAR_EL2` bits that HPFAR_EL2 does not carry (the offset within the 4 KiB page).
const PAGE_OFFSET_MASK: u64 = 0xfff;

/// A guest trap, classified from `ESR_EL2`.
///
/// Only the classes the hypervisor acts on get their own variant; everything else is
/// [`Trap::Other`] with the raw class and syndrome, for logging or for injecting an undefined
/// instruction. AArch32 classes (HVC32, SMC32, MCR/MRC) are reported as `Other`: guests run in
/// AArch64 only (`HCR_EL2.RW` = 1 at EL1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trap {
    /// `HVC #imm` from AArch64 (EC 0x16). `ELR_EL2` already points at the *next* instruction
    /// (HVC is reported after it executes), so the PC must not be advanced.
    Hvc { imm: u16 },
    /// `SMC #imm` from AArch64 trapped by `HCR_EL2.TSC` (EC 0x17). Unlike HVC, a trapped SMC is
    /// taken *before* it executes: `ELR_EL2` points at the SMC itself, so the arch layer must
    /// advance the PC by [`instruction_len`] when it emulates the call.
    Smc { imm: u16 },
    /// Data Abort from a lower EL (EC 0x24), normally a stage-2 fault. `ELR_EL2` points at the
    /// faulting instruction; skip it after emulating the access.
    DataAbort(DataAbort),
    /// Instruction Abort from a lower EL (EC 0x20): the guest fetched from an IPA that stage 2
    /// does not map as executable. `ipa` is only meaningful for stage-2 faults (see
    /// [`DataAbort::ipa`]).
    InstructionAbort { ipa: u64, fsc: u8 },
    /// Trapped WFI (`wfe` = false) or WFE (`wfe` = true); WFIT/WFET are reported like their
    /// non-timeout forms. `ELR_EL2` points at the instruction.
    Wfx { wfe: bool },
    /// Trapped MSR/MRS or system instruction (EC 0x18). `rt` = 31 is XZR. `read` is true for
    /// MRS/SYSL (the guest register receives a value). `ELR_EL2` points at the instruction.
    SysReg {
        op0: u8,
        op1: u8,
        crn: u8,
        crm: u8,
        op2: u8,
        rt: u8,
        read: bool,
    },
    /// FP/SIMD access trapped by `CPTR_EL2` (EC 0x07): lazily restore the guest FP state.
    FpAccess,
    /// Any other class (including Data/Instruction Aborts taken *from EL2 itself*, EC 0x25/0x21,
    /// which are hypervisor bugs and must not be treated as guest MMIO).
    Other { ec: u8, iss: u32 },
}

/// A guest Data Abort taken to EL2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataAbort {
    /// Faulting IPA: `HPFAR_EL2.FIPA << 12 | FAR_EL2[11:0]`. `HPFAR_EL2` is only valid for
    /// stage-2 translation, access-flag and permission faults (and faults on a stage-1 walk); for
    /// other faults (e.g. external aborts) this value is meaningless.
    pub ipa: u64,
    /// Faulting virtual address (`FAR_EL2`), for logging and for injecting an abort.
    pub far: u64,
    /// Data Fault Status Code (`ISS[5:0]`).
    pub dfsc: u8,
    /// WnR: the access was a write. For a fault on a stage-1 walk this reports the guest's access,
    /// not the walk (which is always a read, or a write for hardware AF/dirty updates).
    pub write: bool,
    /// The fault happened while the MMU walked the guest's stage-1 tables (their IPA is not
    /// mapped as normal memory at stage 2). This can never be emulated as an MMIO access.
    pub s1ptw: bool,
    /// The decoded single-register load/store, when the hardware provided one (`ISV` = 1).
    /// `None` for pair/exclusive/writeback/SIMD accesses, cache maintenance, and walks
    /// (`s1ptw`); those would need instruction decoding, or an abort injected into the guest.
    pub access: Option<MmioAccess>,
}

/// A single load or store of a general-purpose register, as described by a valid ISS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioAccess {
    /// Access size in bytes: 1, 2, 4 or 8.
    pub size: u8,
    /// The transfer register (SRT). 31 means XZR: reads are discarded, writes store zero. Use
    /// [`MmioAccess::reg_index`] to avoid indexing a 31-entry register file with it.
    pub reg: u8,
    /// The load sign-extends (LDRSB/LDRSH/LDRSW).
    pub sign_extend: bool,
    /// The register is an X register (64-bit); otherwise a W register.
    pub sf: bool,
    /// The access is a store.
    pub write: bool,
}

/// Decodes a trap from the raw values of `ESR_EL2`, `FAR_EL2` and `HPFAR_EL2`.
///
/// `far` and `hpfar` are only used for aborts; pass anything (e.g. 0) for other exceptions, but
/// note the arch layer has to read them before anything else can fault and overwrite them.
pub fn decode(esr: u64, far: u64, hpfar: u64) -> Trap {
    let reg = Esr::new(esr);
    let ec = reg.read(ESR_EL2::EC);
    // ISS is 25 bits wide: the cast cannot lose anything.
    let iss = reg.read(ESR_EL2::ISS) as u32;
    match ec {
        ec::HVC64 => Trap::Hvc { imm: iss as u16 },
        ec::SMC64 => Trap::Smc { imm: iss as u16 },
        ec::DABT_LOWER => Trap::DataAbort(DataAbort::from_iss(iss, far, hpfar)),
        ec::IABT_LOWER => Trap::InstructionAbort {
            ipa: fault_ipa(far, hpfar),
            fsc: (iss & ISS_FSC_MASK) as u8,
        },
        // TI field, ISS[1:0]: 0b00 WFI, 0b01 WFE, 0b10 WFIT, 0b11 WFET.
        ec::WFX => Trap::Wfx { wfe: iss & 1 != 0 },
        ec::SYSREG => Trap::SysReg {
            op0: ((iss >> SYSREG_OP0_SHIFT) & 0x3) as u8,
            op1: ((iss >> SYSREG_OP1_SHIFT) & 0x7) as u8,
            crn: ((iss >> SYSREG_CRN_SHIFT) & 0xf) as u8,
            crm: ((iss >> SYSREG_CRM_SHIFT) & 0xf) as u8,
            op2: ((iss >> SYSREG_OP2_SHIFT) & 0x7) as u8,
            rt: ((iss >> SYSREG_RT_SHIFT) & 0x1f) as u8,
            read: iss & SYSREG_DIR_READ != 0,
        },
        ec::FP => Trap::FpAccess,
        _ => Trap::Other { ec: ec as u8, iss },
    }
}

/// Length in bytes of the instruction that trapped, from `ESR_EL2.IL`: 4 (A64, or a 32-bit T32
/// instruction) or 2 (16-bit T32). Used to step past an emulated instruction.
///
/// IL is RES1 for exceptions it does not apply to (e.g. aborts with `ISV` = 0), so it returns 4
/// for those, which is right for every AArch64 guest.
pub fn instruction_len(esr: u64) -> u64 {
    if Esr::new(esr).read(ESR_EL2::IL) != 0 {
        4
    } else {
        2
    }
}

/// `HPFAR_EL2.FIPA` gives IPA[..:12]; the page offset comes from the virtual address in FAR.
fn fault_ipa(far: u64, hpfar: u64) -> u64 {
    let fipa = LocalRegisterCopy::<u64, HPFAR_EL2::Register>::new(hpfar).read(HPFAR_EL2::FIPA);
    (fipa << 12) | (far & PAGE_OFFSET_MASK)
}

impl DataAbort {
    fn from_iss(iss: u32, far: u64, hpfar: u64) -> Self {
        let write = iss & ISS_WNR != 0;
        let s1ptw = iss & ISS_S1PTW != 0;
        // The instruction syndrome describes the guest's own load/store. A fault on the stage-1
        // walk is not that access (and the Arm ARM only sets ISV for faults on the access), so
        // even a set ISV is ignored there to be safe: emulating the walk as MMIO would be wrong.
        let access = (iss & ISS_ISV != 0 && !s1ptw).then(|| MmioAccess {
            size: 1 << ((iss >> ISS_SAS_SHIFT) & 0x3),
            reg: ((iss >> ISS_SRT_SHIFT) & 0x1f) as u8,
            sign_extend: iss & ISS_SSE != 0,
            sf: iss & ISS_SF != 0,
            write,
        });
        DataAbort {
            ipa: fault_ipa(far, hpfar),
            far,
            dfsc: (iss & ISS_FSC_MASK) as u8,
            write,
            s1ptw,
            access,
        }
    }

    /// True for translation faults (levels -1..3) and permission faults (levels 0..3), the two
    /// kinds a stage-2 MMIO trap or a missing mapping produce; false for access-flag, alignment,
    /// external aborts, TLB conflicts etc., which point at a real problem.
    pub fn is_translation_or_permission_fault(&self) -> bool {
        matches!(self.dfsc, 0x04..=0x07 | 0x2b | 0x0c..=0x0f)
    }
}

impl MmioAccess {
    /// The value a load leaves in the register, given the raw `raw` value read from the device:
    /// truncated to the access size, then sign-extended when the load is a signed one (to 64 bits
    /// for an X register; for a W register to 32 bits, with the upper half zeroed as any W write
    /// does), otherwise zero-extended.
    pub fn read_result(&self, raw: u64) -> u64 {
        let bits = u32::from(self.size) * 8;
        let value = raw & size_mask(self.size);
        let value = if self.sign_extend && bits < 64 {
            // Move the sign bit to bit 63, then shift back arithmetically.
            (((value << (64 - bits)) as i64) >> (64 - bits)) as u64
        } else {
            value
        };
        if self.sf { value } else { value & 0xffff_ffff }
    }

    /// The value a store puts on the bus, given the source register's value: its low `size` bytes.
    pub fn write_value(&self, reg_value: u64) -> u64 {
        reg_value & size_mask(self.size)
    }

    /// The index of the transfer register in x0..x30, or `None` for XZR (31).
    pub fn reg_index(&self) -> Option<usize> {
        (self.reg < 31).then_some(usize::from(self.reg))
    }
}

/// All-ones mask of `size` bytes (`size` in 1..=8).
fn size_mask(size: u8) -> u64 {
    match size {
        8.. => u64::MAX,
        n => (1u64 << (u32::from(n) * 8)) - 1,
    }
}

impl fmt::Display for MmioAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = if self.write { "write" } else { "read" };
        let reg = if self.sf { 'x' } else { 'w' };
        let sign = if self.sign_extend { " signed" } else { "" };
        if self.reg == 31 {
            write!(f, "{}-byte{sign} {dir} {reg}zr", self.size)
        } else {
            write!(f, "{}-byte{sign} {dir} {reg}{}", self.size, self.reg)
        }
    }
}

impl fmt::Display for DataAbort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "data abort {} ipa={:#x} va={:#x} dfsc={:#04x}",
            if self.write { "write" } else { "read" },
            self.ipa,
            self.far,
            self.dfsc
        )?;
        if self.s1ptw {
            f.write_str(" (stage-1 walk)")?;
        }
        match &self.access {
            Some(access) => write!(f, " [{access}]"),
            None => f.write_str(" [no syndrome]"),
        }
    }
}

impl fmt::Display for Trap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trap::Hvc { imm } => write!(f, "hvc #{imm:#x}"),
            Trap::Smc { imm } => write!(f, "smc #{imm:#x}"),
            Trap::DataAbort(abort) => fmt::Display::fmt(abort, f),
            Trap::InstructionAbort { ipa, fsc } => {
                write!(f, "instruction abort ipa={ipa:#x} ifsc={fsc:#04x}")
            }
            Trap::Wfx { wfe } => f.write_str(if *wfe { "wfe" } else { "wfi" }),
            Trap::SysReg {
                op0,
                op1,
                crn,
                crm,
                op2,
                rt,
                read,
            } => write!(
                f,
                "{} S{op0}_{op1}_C{crn}_C{crm}_{op2} {}x{rt}",
                if *read { "mrs" } else { "msr" },
                if *read { "-> " } else { "<- " },
            ),
            Trap::FpAccess => f.write_str("fp/simd access"),
            Trap::Other { ec, iss } => write!(f, "ec={ec:#04x} iss={iss:#09x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    /// Builds an ESR for a lower-EL data abort from its fields (IL = 1).
    fn dabt_esr(isv: bool, sas: u32, sse: bool, srt: u32, sf: bool, wnr: bool, dfsc: u32) -> u64 {
        let iss = (u32::from(isv) << 24)
            | (sas << 22)
            | (u32::from(sse) << 21)
            | (srt << 16)
            | (u32::from(sf) << 15)
            | (u32::from(wnr) << 6)
            | dfsc;
        (0x24 << 26) | (1 << 25) | u64::from(iss)
    }

    #[test]
    fn hvc_and_smc() {
        assert_eq!(decode(0x5800_0000, 0, 0), Trap::Hvc { imm: 0 });
        assert_eq!(decode(0x5a00_0000, 0, 0), Trap::Hvc { imm: 0 });
        assert_eq!(decode(0x5a00_1234, 0, 0), Trap::Hvc { imm: 0x1234 });
        assert_eq!(decode(0x5e00_0000, 0, 0), Trap::Smc { imm: 0 });
        assert_eq!(decode(0x5e00_0001, 0, 0), Trap::Smc { imm: 1 });
        assert_eq!(instruction_len(0x5e00_0000), 4);
        assert_eq!(instruction_len(0x5c00_0000), 2);
    }

    #[test]
    fn str_w1_with_syndrome() {
        // STR w1, [x0] to an unmapped IPA: ISV=1, SAS=0b10 (word), SSE=0, SRT=1, SF=0, WnR=1,
        // DFSC=0b000111 (translation fault, level 3).
        let esr = dabt_esr(true, 0b10, false, 1, false, true, 0x07);
        assert_eq!(esr, 0x9381_0047);
        let Trap::DataAbort(abort) = decode(esr, 0xffff_0000_0900_0abc, 0x9000 << 4) else {
            panic!("not a data abort");
        };
        assert_eq!(abort.ipa, 0x0900_0abc);
        assert_eq!(abort.far, 0xffff_0000_0900_0abc);
        assert_eq!(abort.dfsc, 0x07);
        assert!(abort.write);
        assert!(!abort.s1ptw);
        assert!(abort.is_translation_or_permission_fault());
        let access = abort.access.unwrap();
        assert_eq!(
            access,
            MmioAccess {
                size: 4,
                reg: 1,
                sign_extend: false,
                sf: false,
                write: true
            }
        );
        assert_eq!(access.write_value(0xdead_beef_1234_5678), 0x1234_5678);
        assert_eq!(access.reg_index(), Some(1));
        assert_eq!(
            format!("{abort}"),
            "data abort write ipa=0x9000abc va=0xffff000009000abc dfsc=0x07 [4-byte write w1]"
        );
    }

    #[test]
    fn ldrsb_into_w_and_x() {
        // LDRSB w3, [x0]: SAS=0 (byte), SSE=1, SF=0.
        let esr = dabt_esr(true, 0, true, 3, false, false, 0x06);
        let Trap::DataAbort(abort) = decode(esr, 0, 0) else {
            panic!()
        };
        let w = abort.access.unwrap();
        assert!(!w.write && w.sign_extend && !w.sf && w.size == 1 && w.reg == 3);
        assert_eq!(w.read_result(0x80), 0xffff_ff80);
        assert_eq!(w.read_result(0xffff_ff7f), 0x7f);

        // LDRSB x3, [x0]: SF=1.
        let esr = dabt_esr(true, 0, true, 3, true, false, 0x06);
        let Trap::DataAbort(abort) = decode(esr, 0, 0) else {
            panic!()
        };
        let x = abort.access.unwrap();
        assert_eq!(x.read_result(0x80), 0xffff_ffff_ffff_ff80);

        // LDRSW x0 and LDRSH w0, LDRH w0 (zero-extend).
        let ldrsw = MmioAccess {
            size: 4,
            reg: 0,
            sign_extend: true,
            sf: true,
            write: false,
        };
        assert_eq!(ldrsw.read_result(0x1_8000_0000), 0xffff_ffff_8000_0000);
        let ldrsh = MmioAccess {
            size: 2,
            sf: false,
            ..ldrsw
        };
        assert_eq!(ldrsh.read_result(0x8001), 0xffff_8001);
        let ldrh = MmioAccess {
            sign_extend: false,
            ..ldrsh
        };
        assert_eq!(ldrh.read_result(0xabcd_8001), 0x8001);
        let ldr_x = MmioAccess {
            size: 8,
            sign_extend: false,
            ..ldrsw
        };
        assert_eq!(ldr_x.read_result(u64::MAX), u64::MAX);
        assert_eq!(ldr_x.write_value(u64::MAX), u64::MAX);
    }

    #[test]
    fn no_syndrome_and_stage1_walk() {
        // LDP x0, x1, [x2]: ISV=0, the other syndrome bits are RES0; WnR=0.
        let esr = dabt_esr(false, 0, false, 0, false, false, 0x07);
        let Trap::DataAbort(abort) = decode(esr, 0x1000, 0x10) else {
            panic!()
        };
        assert_eq!(abort.access, None);
        assert!(!abort.write);
        assert_eq!(abort.ipa, 0x1000);

        // A fault on the stage-1 walk never yields an access, even with ISV set.
        let esr = dabt_esr(true, 3, false, 2, true, false, 0x07) | (1 << 7);
        let Trap::DataAbort(abort) = decode(esr, 0, 0) else {
            panic!()
        };
        assert!(abort.s1ptw);
        assert_eq!(abort.access, None);

        // STR xzr: SRT=31.
        let esr = dabt_esr(true, 3, false, 31, true, true, 0x0f);
        let Trap::DataAbort(abort) = decode(esr, 0, 0) else {
            panic!()
        };
        let access = abort.access.unwrap();
        assert_eq!((access.size, access.reg, access.reg_index()), (8, 31, None));
        assert!(abort.is_translation_or_permission_fault());

        // Access flag fault and synchronous external abort are neither.
        for dfsc in [0x0b, 0x10, 0x21] {
            let Trap::DataAbort(abort) =
                decode(dabt_esr(false, 0, false, 0, false, false, dfsc), 0, 0)
            else {
                panic!()
            };
            assert!(!abort.is_translation_or_permission_fault());
        }
    }

    #[test]
    fn ipa_from_hpfar_and_far() {
        // FIPA (IPA[51:12]) sits at HPFAR_EL2[47:4]; NS (bit 63) must be ignored.
        let hpfar = (0x8_1234_5678u64 << 4) | (1 << 63);
        let Trap::DataAbort(abort) =
            decode(dabt_esr(false, 0, false, 0, false, false, 4), 0x7123, hpfar)
        else {
            panic!()
        };
        assert_eq!(abort.ipa, 0x8123_4567_8123);

        // Instruction abort from EL1, translation fault level 2.
        let esr = (0x20 << 26) | (1 << 25) | 0x06;
        assert_eq!(
            decode(esr, 0x4000_0ff8, 0x4_0000 << 4),
            Trap::InstructionAbort {
                ipa: 0x4000_0ff8,
                fsc: 0x06
            }
        );
    }

    #[test]
    fn wfi_wfe_sysreg_fp_other() {
        assert_eq!(decode(0x0600_0000, 0, 0), Trap::Wfx { wfe: false });
        assert_eq!(decode(0x0600_0001, 0, 0), Trap::Wfx { wfe: true });
        // WFET counts as WFE.
        assert_eq!(decode(0x0600_0003, 0, 0), Trap::Wfx { wfe: true });

        // MRS x2, CNTPCT_EL0 = S3_3_C14_C0_1: Op0=3, Op2=1, Op1=3, CRn=14, Rt=2, CRm=0, read.
        let iss = (3 << 20) | (1 << 17) | (3 << 14) | (14 << 10) | (2 << 5) | 1;
        let esr = (0x18u64 << 26) | (1 << 25) | iss;
        assert_eq!(
            decode(esr, 0, 0),
            Trap::SysReg {
                op0: 3,
                op1: 3,
                crn: 14,
                crm: 0,
                op2: 1,
                rt: 2,
                read: true
            }
        );
        assert_eq!(format!("{}", decode(esr, 0, 0)), "mrs S3_3_C14_C0_1 -> x2");

        // MSR ICC_SGI1R_EL1, x5 = S3_0_C12_C11_5: write.
        let iss = (3 << 20) | (5 << 17) | (12 << 10) | (5 << 5) | (11 << 1);
        let esr = (0x18u64 << 26) | (1 << 25) | iss;
        assert_eq!(
            decode(esr, 0, 0),
            Trap::SysReg {
                op0: 3,
                op1: 0,
                crn: 12,
                crm: 11,
                op2: 5,
                rt: 5,
                read: false
            }
        );

        assert_eq!(decode(0x1e00_0000, 0, 0), Trap::FpAccess);
        // Data abort from EL2 itself (EC 0x25) is not a guest abort.
        assert_eq!(
            decode(0x9600_0045, 0, 0),
            Trap::Other {
                ec: 0x25,
                iss: 0x45
            }
        );
        // BRK #0 (EC 0x3c).
        assert_eq!(decode(0xf200_0000, 0, 0), Trap::Other { ec: 0x3c, iss: 0 });
        assert_eq!(
            format!("{}", decode(0xf200_0000, 0, 0)),
            "ec=0x3c iss=0x0000000"
        );
    }
}
