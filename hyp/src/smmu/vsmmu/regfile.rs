//! The guest-writable registers of one emulated SMMU, their reset values and writable bits, and
//! how an MMIO access (offset, size) maps onto a register.
//!
//! # Access sizes
//!
//! As the architecture requires (IHI0070 §6.2): 32-bit registers take aligned 32-bit accesses
//! only; 64-bit registers take an aligned 64-bit access or an aligned 32-bit access to either
//! half. Anything else — 8- or 16-bit accesses, a 64-bit access to a 32-bit register or spanning
//! two of them, a misaligned access — is rejected ([`MmioError::BadSize`] for a wrong size,
//! [`MmioError::BadOffset`] for a misaligned one), and the hypervisor injects an abort, as an
//! SMMU that signals an error response would. Offsets where no register is implemented (reserved
//! space, the registers of features not offered: PRI queue, MSI configuration, the page-0
//! aliases of the page-1 queue pointers) read as zero and ignore writes, for 32- and 64-bit
//! aligned accesses alike.

use crate::smmu::v3::regs::{GBPA, Q_BASE_ADDR_MASK, STRTAB_BASE_ADDR_MASK, off};
use crate::trap::MmioError;

/// `SMMU_CR0`: the bits the guest can set (SMMUEN, EVENTQEN, CMDQEN). PRIQEN, ATSCHK and VMW
/// control features that are not offered and are RES0.
pub(super) const CR0_MASK: u32 = CR0_SMMUEN | CR0_EVENTQEN | CR0_CMDQEN;
pub(super) const CR0_SMMUEN: u32 = 1 << 0;
pub(super) const CR0_EVENTQEN: u32 = 1 << 2;
pub(super) const CR0_CMDQEN: u32 = 1 << 3;
/// `SMMU_CR1`: all six attribute fields.
const CR1_MASK: u32 = 0xfff;
/// `SMMU_CR2`: RECINVSID and PTM (E2H is RES0 without IDR0.HYP).
const CR2_MASK: u32 = 0b110;
pub(super) const CR2_RECINVSID: u32 = 1 << 1;
/// `SMMU_GBPA`: every field except UPDATE.
const GBPA_FIELDS: u32 = 0x001f_3f1f;
const GBPA_UPDATE: u32 = 1 << 31;
/// `SMMU_GBPA` at reset: ABORT = 0 (bypass, which for a VM means "through its stage 2"),
/// SHCFG = use incoming. The value QEMU's SMMU resets to.
const GBPA_RESET: u32 = 0x1000;
/// `SMMU_IRQ_CTRL`: GERROR_IRQEN and EVENTQ_IRQEN (no PRI queue).
const IRQ_CTRL_MASK: u32 = IRQ_GERROR_EN | IRQ_EVENTQ_EN;
pub(super) const IRQ_GERROR_EN: u32 = 1 << 0;
pub(super) const IRQ_EVENTQ_EN: u32 = 1 << 2;
/// Error bits of `SMMU_GERROR` / `SMMU_GERRORN`.
pub(super) const GERROR_MASK: u32 = crate::smmu::v3::regs::GERROR_ERR_MASK;
pub(super) const GERROR_CMDQ_ERR: u32 = 1 << 0;
pub(super) const GERROR_EVENTQ_ABT_ERR: u32 = 1 << 2;
/// `SMMU_STRTAB_BASE`: RA and ADDR.
const STRTAB_BASE_MASK: u64 = (1 << 62) | STRTAB_BASE_ADDR_MASK;
/// `SMMU_STRTAB_BASE_CFG`: FMT, SPLIT, LOG2SIZE.
const STRTAB_BASE_CFG_MASK: u32 = 0x3_07ff;
/// `SMMU_CMDQ_BASE` / `SMMU_EVENTQ_BASE`: RA/WA, ADDR, LOG2SIZE.
const Q_BASE_MASK: u64 = (1 << 62) | Q_BASE_ADDR_MASK | 0x1f;
/// PROD/CONS index + wrap field (WR / RD, 20 bits).
pub(super) const Q_PTR_MASK: u32 = 0xf_ffff;
/// `SMMU_CMDQ_CONS.ERR`.
pub(super) const CMDQ_CONS_ERR_SHIFT: u32 = 24;
pub(super) const CMDQ_CONS_ERR_MASK: u32 = 0x7f << CMDQ_CONS_ERR_SHIFT;
/// OVFLG / OVACKFLG.
pub(super) const Q_OVF: u32 = crate::smmu::v3::regs::Q_OVF;

/// The registers a guest programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Regs {
    /// CR0; CR0ACK always equals it (every change takes effect at once).
    pub cr0: u32,
    pub cr1: u32,
    pub cr2: u32,
    pub gbpa: u32,
    /// IRQ_CTRL; IRQ_CTRLACK always equals it.
    pub irq_ctrl: u32,
    pub gerror: u32,
    pub gerrorn: u32,
    pub strtab_base: u64,
    pub strtab_base_cfg: u32,
    pub cmdq_base: u64,
    pub cmdq_prod: u32,
    /// RD and ERR.
    pub cmdq_cons: u32,
    pub eventq_base: u64,
    /// WR and OVFLG.
    pub eventq_prod: u32,
    /// RD and OVACKFLG.
    pub eventq_cons: u32,
}

impl Regs {
    /// Reset values: everything disabled and zero but GBPA.
    pub(super) const RESET: Regs = Regs {
        cr0: 0,
        cr1: 0,
        cr2: 0,
        gbpa: GBPA_RESET,
        irq_ctrl: 0,
        gerror: 0,
        gerrorn: 0,
        strtab_base: 0,
        strtab_base_cfg: 0,
        cmdq_base: 0,
        cmdq_prod: 0,
        cmdq_cons: 0,
        eventq_base: 0,
        eventq_prod: 0,
        eventq_cons: 0,
    };

    pub(super) fn smmu_enabled(&self) -> bool {
        self.cr0 & CR0_SMMUEN != 0
    }

    pub(super) fn cmdq_enabled(&self) -> bool {
        self.cr0 & CR0_CMDQEN != 0
    }

    pub(super) fn eventq_enabled(&self) -> bool {
        self.cr0 & CR0_EVENTQEN != 0
    }

    /// GBPA.ABORT: with SMMUEN = 0, traffic is aborted (else it bypasses, through stage 2).
    pub(super) fn gbpa_abort(&self) -> bool {
        self.gbpa & GBPA::ABORT::SET.value != 0
    }

    /// Global errors that are active (GERROR and GERRORN differ).
    pub(super) fn gerror_active(&self) -> u32 {
        (self.gerror ^ self.gerrorn) & GERROR_MASK
    }

    /// Current value of the register at `reg` (a register start offset), or `None` for the ID
    /// registers and unimplemented offsets (handled by the caller).
    pub(super) fn read(&self, reg: u64) -> Option<u64> {
        Some(match reg {
            off::CR0 | off::CR0ACK => self.cr0.into(),
            off::CR1 => self.cr1.into(),
            off::CR2 => self.cr2.into(),
            off::GBPA => self.gbpa.into(),
            off::IRQ_CTRL | off::IRQ_CTRLACK => self.irq_ctrl.into(),
            off::GERROR => self.gerror.into(),
            off::GERRORN => self.gerrorn.into(),
            off::STRTAB_BASE => self.strtab_base,
            off::STRTAB_BASE_CFG => self.strtab_base_cfg.into(),
            off::CMDQ_BASE => self.cmdq_base,
            off::CMDQ_PROD => self.cmdq_prod.into(),
            off::CMDQ_CONS => self.cmdq_cons.into(),
            off::EVENTQ_BASE => self.eventq_base,
            off::EVENTQ_PROD => self.eventq_prod.into(),
            off::EVENTQ_CONS => self.eventq_cons.into(),
            _ => return None,
        })
    }

    /// Stores a guest write of the whole register `reg` for the registers without side effects
    /// beyond the value itself, applying writable-bit masks and the read-only rules. Returns
    /// `false` for registers with side effects (CR0, GBPA, GERRORN, CMDQ_PROD), which the caller
    /// handles, and for read-only or unimplemented offsets (ignored).
    ///
    /// Read-only rules (IHI0070 §6.3, the SMMUv3.2 "writes ignored" behaviour, which earlier
    /// versions allow as a CONSTRAINED UNPREDICTABLE choice): STRTAB_BASE and STRTAB_BASE_CFG
    /// while SMMUEN = 1; CMDQ_BASE and CMDQ_CONS while CMDQEN = 1; EVENTQ_BASE and EVENTQ_PROD
    /// while EVENTQEN = 1. (CR0ACK always equals CR0 here, so "CR0 or CR0ACK" is one test.)
    pub(super) fn write_plain(&mut self, reg: u64, value: u64) -> bool {
        let v32 = value as u32;
        match reg {
            off::CR1 => self.cr1 = v32 & CR1_MASK,
            off::CR2 => self.cr2 = v32 & CR2_MASK,
            off::IRQ_CTRL => self.irq_ctrl = v32 & IRQ_CTRL_MASK,
            off::STRTAB_BASE if !self.smmu_enabled() => {
                self.strtab_base = value & STRTAB_BASE_MASK;
            }
            off::STRTAB_BASE_CFG if !self.smmu_enabled() => {
                self.strtab_base_cfg = v32 & STRTAB_BASE_CFG_MASK;
            }
            off::CMDQ_BASE if !self.cmdq_enabled() => self.cmdq_base = value & Q_BASE_MASK,
            off::CMDQ_CONS if !self.cmdq_enabled() => {
                // ERR is the SMMU's report; software writes the read pointer only.
                self.cmdq_cons = (self.cmdq_cons & CMDQ_CONS_ERR_MASK) | (v32 & Q_PTR_MASK);
            }
            off::EVENTQ_BASE if !self.eventq_enabled() => self.eventq_base = value & Q_BASE_MASK,
            off::EVENTQ_PROD if !self.eventq_enabled() => {
                self.eventq_prod = v32 & (Q_PTR_MASK | Q_OVF);
            }
            off::EVENTQ_CONS => self.eventq_cons = v32 & (Q_PTR_MASK | Q_OVF),
            _ => return false,
        }
        true
    }

    /// A guest write of GBPA: the fields take effect only with UPDATE = 1, and UPDATE reads as 0
    /// again at once (the update completes immediately). Writes without UPDATE are ignored, as
    /// QEMU's SMMU does. Returns whether ABORT changed.
    pub(super) fn write_gbpa(&mut self, value: u32) -> bool {
        if value & GBPA_UPDATE == 0 {
            return false;
        }
        let was_abort = self.gbpa_abort();
        self.gbpa = value & GBPA_FIELDS;
        was_abort != self.gbpa_abort()
    }
}

/// Which part of a register an access covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Part {
    /// The whole register (a 32-bit access to a 32-bit register, or a 64-bit access to a 64-bit
    /// one).
    Whole,
    /// Bits 31..0 of a 64-bit register.
    Low,
    /// Bits 63..32 of a 64-bit register.
    High,
}

/// Where an access lands: a register start offset and the part of it, or nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Target {
    Reg(u64, Part),
    /// No register here: read as zero, writes ignored.
    Unimplemented,
}

/// Width in bytes of the register starting at `offset`, if one is implemented there.
fn width(offset: u64) -> Option<u8> {
    if off::is_64bit(offset) {
        return Some(8);
    }
    match offset {
        off::IDR0
        | off::IDR1
        | off::IDR2
        | off::IDR3
        | off::IDR4
        | off::IDR5
        | off::IIDR
        | off::AIDR
        | off::CR0
        | off::CR0ACK
        | off::CR1
        | off::CR2
        | off::STATUSR
        | off::GBPA
        | off::AGBPA
        | off::IRQ_CTRL
        | off::IRQ_CTRLACK
        | off::GERROR
        | off::GERRORN
        | off::GERROR_IRQ_CFG1
        | off::GERROR_IRQ_CFG2
        | off::STRTAB_BASE_CFG
        | off::CMDQ_PROD
        | off::CMDQ_CONS
        | off::EVENTQ_IRQ_CFG1
        | off::EVENTQ_IRQ_CFG2
        | off::PRIQ_IRQ_CFG1
        | off::PRIQ_IRQ_CFG2
        | off::EVENTQ_PROD
        | off::EVENTQ_CONS
        | off::PRIQ_PROD
        | off::PRIQ_CONS => Some(4),
        _ => None,
    }
}

/// Checks an access of `size` bytes at `offset` (inside the 128 KiB window) against the access
/// rules in the module docs and says which register it reaches.
pub(super) fn decode_access(offset: u64, size: u8) -> Result<Target, MmioError> {
    if size != 4 && size != 8 {
        return Err(MmioError::BadSize { size });
    }
    if !offset.is_multiple_of(u64::from(size)) || offset >= off::SIZE {
        return Err(MmioError::BadOffset { offset });
    }
    if size == 8 {
        return match (width(offset), width(offset + 4)) {
            (Some(8), _) => Ok(Target::Reg(offset, Part::Whole)),
            // A 64-bit access to one or two 32-bit registers.
            (Some(_), _) | (_, Some(_)) => Err(MmioError::BadSize { size }),
            (None, None) => Ok(Target::Unimplemented),
        };
    }
    match width(offset) {
        Some(4) => Ok(Target::Reg(offset, Part::Whole)),
        Some(_) => Ok(Target::Reg(offset, Part::Low)),
        None if offset >= 4 && width(offset - 4) == Some(8) => {
            Ok(Target::Reg(offset - 4, Part::High))
        }
        None => Ok(Target::Unimplemented),
    }
}

/// The bits an access to `part` of a register whose value is `reg_value` reads.
pub(super) fn extract(reg_value: u64, part: Part) -> u64 {
    match part {
        Part::Whole => reg_value,
        Part::Low => reg_value & 0xffff_ffff,
        Part::High => reg_value >> 32,
    }
}

/// The register value after writing `value` to `part` of it (the other half keeps `current`).
pub(super) fn merge(current: u64, part: Part, value: u64) -> u64 {
    match part {
        Part::Whole => value,
        Part::Low => (current & !0xffff_ffff) | (value & 0xffff_ffff),
        Part::High => (current & 0xffff_ffff) | (value << 32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_rules() {
        use Part::*;
        use Target::*;
        let ok = |o, s| decode_access(o, s).unwrap();
        assert_eq!(ok(off::CR0, 4), Reg(off::CR0, Whole));
        assert_eq!(ok(off::STRTAB_BASE, 8), Reg(off::STRTAB_BASE, Whole));
        assert_eq!(ok(off::STRTAB_BASE, 4), Reg(off::STRTAB_BASE, Low));
        assert_eq!(ok(off::STRTAB_BASE + 4, 4), Reg(off::STRTAB_BASE, High));
        assert_eq!(ok(off::EVENTQ_PROD, 4), Reg(off::EVENTQ_PROD, Whole));
        // Reserved page-0 aliases of the page-1 pointers, and reserved space.
        assert_eq!(ok(0xa8, 4), Unimplemented);
        assert_eq!(ok(0x30, 8), Unimplemented);
        assert_eq!(ok(0x1_fff8, 8), Unimplemented);
        assert_eq!(ok(0xffc, 4), Unimplemented);
        // Wrong sizes.
        for size in [1, 2, 3, 16] {
            assert_eq!(
                decode_access(off::CR0, size),
                Err(MmioError::BadSize { size })
            );
        }
        assert_eq!(
            decode_access(off::CR0, 8),
            Err(MmioError::BadSize { size: 8 })
        );
        assert_eq!(
            decode_access(off::CMDQ_PROD, 8),
            Err(MmioError::BadSize { size: 8 })
        );
        // 0x28 (CR1) + 0x2c (CR2).
        assert_eq!(
            decode_access(off::CR1, 8),
            Err(MmioError::BadSize { size: 8 })
        );
        // 0xa8: reserved, but 0xac... is too; 0x40 STATUSR + 0x44 GBPA.
        assert_eq!(
            decode_access(off::STATUSR, 8),
            Err(MmioError::BadSize { size: 8 })
        );
        // Misaligned.
        assert_eq!(
            decode_access(off::STRTAB_BASE + 4, 8),
            Err(MmioError::BadOffset { offset: 0x84 })
        );
        assert_eq!(
            decode_access(0x22, 4),
            Err(MmioError::BadOffset { offset: 0x22 })
        );
        assert_eq!(
            decode_access(off::SIZE, 4),
            Err(MmioError::BadOffset { offset: off::SIZE })
        );
    }

    #[test]
    fn halves() {
        let v = 0x1122_3344_5566_7788;
        assert_eq!(extract(v, Part::Low), 0x5566_7788);
        assert_eq!(extract(v, Part::High), 0x1122_3344);
        assert_eq!(merge(v, Part::Low, 0xaabb_ccdd), 0x1122_3344_aabb_ccdd);
        assert_eq!(merge(v, Part::High, 0xaabb_ccdd), 0xaabb_ccdd_5566_7788);
        assert_eq!(merge(v, Part::Whole, 5), 5);
    }

    #[test]
    fn gbpa_update() {
        let mut r = Regs::RESET;
        assert!(!r.gbpa_abort());
        // Without UPDATE: ignored.
        assert!(!r.write_gbpa(1 << 20));
        assert_eq!(r.gbpa, GBPA_RESET);
        assert!(r.write_gbpa(GBPA_UPDATE | (1 << 20)));
        assert_eq!(r.gbpa, 1 << 20, "UPDATE reads back as 0");
        assert!(r.gbpa_abort());
        assert!(!r.write_gbpa(u32::MAX));
        assert_eq!(r.gbpa, GBPA_FIELDS);
    }

    #[test]
    fn read_only_while_enabled() {
        let mut r = Regs::RESET;
        assert!(r.write_plain(off::STRTAB_BASE, u64::MAX));
        assert_eq!(r.strtab_base, STRTAB_BASE_MASK);
        r.cr0 = CR0_SMMUEN;
        assert!(!r.write_plain(off::STRTAB_BASE, 0));
        assert!(!r.write_plain(off::STRTAB_BASE_CFG, 0));
        assert_eq!(r.strtab_base, STRTAB_BASE_MASK);
        // Queue bases follow their own enables.
        assert!(r.write_plain(off::CMDQ_BASE, 0x8000_0000 | 5));
        r.cr0 |= CR0_CMDQEN;
        assert!(!r.write_plain(off::CMDQ_BASE, 0));
        assert!(!r.write_plain(off::CMDQ_CONS, 3));
        assert_eq!(r.cmdq_base, 0x8000_0005);
        assert!(r.write_plain(off::EVENTQ_PROD, 7));
        r.cr0 |= CR0_EVENTQEN;
        assert!(!r.write_plain(off::EVENTQ_PROD, 0));
        assert!(!r.write_plain(off::EVENTQ_BASE, 0));
        assert!(r.write_plain(off::EVENTQ_CONS, u64::MAX));
        assert_eq!(r.eventq_cons, Q_PTR_MASK | Q_OVF);
        assert_eq!(r.eventq_prod, 7);
    }
}
