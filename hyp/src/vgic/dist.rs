//! The emulated GICv3 distributor (GICD_*), one 64 KiB frame per VM.
//!
//! Register map and fields: IHI0069 (GICv3/v4 architecture specification), chapter 12,
//! "The GIC Distributor register map". What the guest sees:
//!
//! | register | offset | emulation |
//! |---|---|---|
//! | GICD_CTLR | 0x0000 | single Security state view (DS = 1): EnableGrp1 (bit 1) RW; ARE (bit 4) and DS (bit 6) RAO/WI; EnableGrp0 (bit 0), E1NWF (bit 7) RAZ/WI (no Group 0); RWP (bit 31) reads 0 (writes take effect at once) |
//! | GICD_TYPER | 0x0004 | ITLinesNumber covers the highest SPI the VM owns; IDbits = 9 (INTIDs < 1024); No1N = 1; RSS = 1 only with more than 16 vCPUs; A3V, LPIS, MBIS, DVIS, ESPI, NMI, SecurityExtn, CPUNumber = 0 |
//! | GICD_IIDR | 0x0008 | Implementer 0x43B (JEP106 Arm), ProductID 0x48, Variant/Revision 0 — matches no erratum |
//! | GICD_TYPER2, GICD_STATUSR | 0x000C, 0x0010 | RAZ/WI |
//! | `GICD_IGROUPR<n>` | 0x0080 | owned SPIs RAO/WI (every interrupt is Group 1) |
//! | `GICD_IS/ICENABLER<n>`, `IS/ICPENDR<n>`, `IS/ICACTIVER<n>` | 0x0100–0x03FC | owned SPIs |
//! | `GICD_IPRIORITYR<n>` | 0x0400 | owned SPIs, byte-accessible, top 5 bits kept |
//! | `GICD_ITARGETSR<n>` | 0x0800 | RAZ/WI (affinity routing) |
//! | `GICD_ICFGR<n>` | 0x0C00 | owned SPIs: Int_config[1] RW for virtual SPIs, read-only (the physical trigger given at construction) for SPIs mapped to hardware |
//! | `GICD_IGRPMODR<n>`, `GICD_NSACR<n>` | 0x0D00, 0x0E00 | RAZ/WI |
//! | GICD_SGIR, C/SPENDSGIR, INMIR, SETSPI/CLRSPI | | RAZ/WI (affinity routing; no message-based SPIs) |
//! | `GICD_IROUTER<n>` | 0x6100 + 8(n − 32) | owned SPIs: Aff2..Aff0 RW; IRM (bit 31) and Aff3 RAZ/WI (No1N = 1, A3V = 0); 64-bit or 32-bit halves |
//! | GICD_PIDR2 | 0xFFE8 | ArchRev = 3 (GICv3); the other ID registers as a JEP106 Arm part 0 |
//!
//! For INTIDs 0–31 the banked registers are RAZ/WI here (they live in the redistributors). Every
//! bit, byte or field of an SPI the VM does not own reads as zero and ignores writes: the
//! per-INTID registers look each INTID up in the VM's own table and skip the ones not there,
//! so a guest write can reach nothing but the VM's own interrupts.
//!
//! Access sizes: aligned 32-bit accesses everywhere; IPRIORITYR and ITARGETSR also take bytes;
//! IROUTER and the space above it (reserved, IMPLEMENTATION DEFINED, up to the ID registers) also
//! take aligned 64-bit accesses. Anything else is
//! [`MmioError::BadSize`] or (misaligned) [`MmioError::BadOffset`], and the guest gets an abort.

use alloc::sync::Arc;

use crate::trap::{MmioDevice, MmioError};

use super::state::{BitReg, FIRST_SPI, Vgic};

/// Size of the distributor frame.
pub const GICD_SIZE: u64 = 0x1_0000;

mod reg {
    pub const CTLR: u64 = 0x0000;
    pub const TYPER: u64 = 0x0004;
    pub const IIDR: u64 = 0x0008;
    pub const IGROUPR: u64 = 0x0080;
    pub const IPRIORITYR: u64 = 0x0400;
    pub const ITARGETSR: u64 = 0x0800;
    pub const ICFGR: u64 = 0x0C00;
    pub const IGRPMODR: u64 = 0x0D00;
    pub const IROUTER: u64 = 0x6000;
    pub const IROUTER_END: u64 = 0x8000;
    pub const ID_BASE: u64 = 0xFFD0;
}

/// GICD_CTLR (DS = 1 view) bits.
pub const CTLR_ENABLE_GRP1: u32 = 1 << 1;
pub const CTLR_ARE: u32 = 1 << 4;
pub const CTLR_DS: u32 = 1 << 6;

/// GICD_IIDR / GICR_IIDR: ProductID 0x48, Implementer 0x43B.
pub const IIDR: u32 = (0x48 << 24) | 0x43B;

/// The ID registers from 0xFFD0: PIDR4..7, PIDR0..3, CIDR0..3. Part number 0, JEP106 Arm
/// (identity 0x3B in DES_0/DES_1 with JEDEC = 1, continuation 4 in DES_2), PIDR2.ArchRev = 3.
const ID_REGS: [u32; 12] = [
    0x04, 0x00, 0x00, 0x00, 0x00, 0xB0, 0x3B, 0x00, 0x0D, 0xF0, 0x05, 0xB1,
];

/// The ID register at `offset` (0xFFD0..0x10000, 32-bit aligned).
pub(super) fn id_reg(offset: u64) -> u32 {
    ID_REGS[((offset - reg::ID_BASE) / 4) as usize]
}

/// Whether `offset` is in the ID register block of a 64 KiB frame.
pub(super) fn is_id_reg(offset: u64) -> bool {
    (reg::ID_BASE..0x1_0000).contains(&offset)
}

/// Which access sizes a register takes.
#[derive(Clone, Copy)]
pub(super) enum Width {
    /// 32-bit only.
    W32,
    /// 8- or 32-bit (IPRIORITYR, ITARGETSR).
    Byte,
    /// 32- or 64-bit (64-bit registers, reserved space).
    W64,
}

/// Checks size and alignment of an access.
pub(super) fn check(offset: u64, size: u8, width: Width) -> Result<(), MmioError> {
    let ok = match width {
        Width::W32 => size == 4,
        Width::Byte => size == 1 || size == 4,
        Width::W64 => size == 4 || size == 8,
    };
    if !ok {
        return Err(MmioError::BadSize { size });
    }
    if !offset.is_multiple_of(u64::from(size)) {
        return Err(MmioError::BadOffset { offset });
    }
    Ok(())
}

/// The part of 64-bit register `value` that an access of `size` at `offset` (relative to the
/// register) reads.
pub(super) fn read_part(value: u64, offset: u64, size: u8) -> u64 {
    if size == 8 {
        value
    } else {
        (value >> (8 * (offset & 4))) & 0xffff_ffff
    }
}

/// The set/clear bitmap register at `offset` and its index n, if `offset` is one (0x80..0x400,
/// same layout in GICD and in a redistributor's SGI_base frame).
pub(super) fn bitmap_reg(offset: u64) -> Option<(BitReg, u32)> {
    let reg = match offset {
        0x080..0x100 => BitReg::Group,
        0x100..0x180 => BitReg::SetEnable,
        0x180..0x200 => BitReg::ClearEnable,
        0x200..0x280 => BitReg::SetPending,
        0x280..0x300 => BitReg::ClearPending,
        0x300..0x380 => BitReg::SetActive,
        0x380..0x400 => BitReg::ClearActive,
        _ => return None,
    };
    Some((reg, ((offset & 0x7f) / 4) as u32))
}

/// The emulated distributor of one VM. Register it on the VM's bus with a [`GICD_SIZE`] window.
pub struct Distributor {
    vgic: Arc<Vgic>,
}

impl Distributor {
    /// The distributor of `vgic`'s VM.
    pub fn new(vgic: Arc<Vgic>) -> Self {
        Distributor { vgic }
    }

    fn ctlr(&self) -> u32 {
        let grp1 = self.vgic.grp1.load(core::sync::atomic::Ordering::Acquire);
        CTLR_ARE | CTLR_DS | if grp1 { CTLR_ENABLE_GRP1 } else { 0 }
    }

    fn typer(&self) -> u32 {
        let it_lines = (self.vgic.max_spi() + 1).div_ceil(32) - 1;
        let id_bits = 9 << 19;
        let no1n = 1 << 25;
        let rss = u32::from(self.vgic.nr_vcpus() > 16) << 26;
        it_lines | id_bits | no1n | rss
    }
}

/// First INTID of the 2-bit-per-INTID ICFGR register at `offset`.
fn icfgr_first(offset: u64) -> u32 {
    ((offset - reg::ICFGR) / 4 * 16) as u32
}

impl MmioDevice for Distributor {
    fn name(&self) -> &str {
        "vgic-dist"
    }

    fn read(&self, _vcpu: usize, offset: u64, size: u8) -> Result<u64, MmioError> {
        let vgic = &*self.vgic;
        let value = match offset {
            reg::IPRIORITYR..reg::ITARGETSR => {
                check(offset, size, Width::Byte)?;
                let first = (offset - reg::IPRIORITYR) as u32;
                (0..u32::from(size))
                    .map(|i| first + i)
                    .filter(|&intid| intid >= FIRST_SPI)
                    .fold(0, |acc, intid| {
                        acc | u64::from(vgic.priority_read(0, intid)) << (8 * (intid - first))
                    })
            }
            reg::ITARGETSR..reg::ICFGR => {
                check(offset, size, Width::Byte)?;
                0
            }
            reg::IROUTER..reg::IROUTER_END => {
                check(offset, size, Width::W64)?;
                let n = ((offset - reg::IROUTER) / 8) as u32;
                read_part(vgic.irouter_read(n), offset & 7, size)
            }
            _ if is_id_reg(offset) => {
                check(offset, size, Width::W32)?;
                u64::from(id_reg(offset))
            }
            reg::IROUTER_END.. => {
                // Reserved and IMPLEMENTATION DEFINED space.
                check(offset, size, Width::W64)?;
                0
            }
            _ => {
                check(offset, size, Width::W32)?;
                let value = match offset {
                    reg::CTLR => self.ctlr(),
                    reg::TYPER => self.typer(),
                    reg::IIDR => IIDR,
                    reg::IGROUPR..reg::IPRIORITYR => {
                        let (reg, n) = bitmap_reg(offset).expect("bitmap range");
                        vgic.spi_bits_read(reg, n * 32)
                    }
                    reg::ICFGR..reg::IGRPMODR => {
                        let first = icfgr_first(offset);
                        (0..16)
                            .filter(|&k| first + k >= FIRST_SPI && vgic.edge_read(0, first + k))
                            .fold(0, |acc, k| acc | (2 << (2 * k)))
                    }
                    // TYPER2, STATUSR, IGRPMODR, NSACR, SGIR, the SGI pending registers,
                    // INMIR, the message-based SPI registers, reserved space.
                    _ => 0,
                };
                u64::from(value)
            }
        };
        Ok(value)
    }

    fn write(&self, _vcpu: usize, offset: u64, size: u8, value: u64) -> Result<(), MmioError> {
        let vgic = &*self.vgic;
        match offset {
            reg::IPRIORITYR..reg::ITARGETSR => {
                check(offset, size, Width::Byte)?;
                let first = (offset - reg::IPRIORITYR) as u32;
                for i in 0..u32::from(size) {
                    let intid = first + i;
                    if intid >= FIRST_SPI {
                        vgic.priority_write(0, intid, (value >> (8 * i)) as u8);
                    }
                }
            }
            reg::ITARGETSR..reg::ICFGR => check(offset, size, Width::Byte)?,
            reg::IROUTER..reg::IROUTER_END => {
                check(offset, size, Width::W64)?;
                let n = ((offset - reg::IROUTER) / 8) as u32;
                // The upper half holds only Aff3, RES0 here.
                if offset & 4 == 0 {
                    vgic.irouter_write(n, value & 0xffff_ffff);
                }
            }
            _ if is_id_reg(offset) => check(offset, size, Width::W32)?,
            reg::IROUTER_END.. => check(offset, size, Width::W64)?,
            _ => {
                check(offset, size, Width::W32)?;
                let value = value as u32;
                match offset {
                    reg::CTLR => vgic.set_grp1(value & CTLR_ENABLE_GRP1 != 0),
                    reg::IGROUPR..reg::IPRIORITYR => {
                        let (reg, n) = bitmap_reg(offset).expect("bitmap range");
                        vgic.spi_bits_write(reg, n * 32, value);
                    }
                    reg::ICFGR..reg::IGRPMODR => {
                        let first = icfgr_first(offset);
                        for k in (0..16).filter(|&k| first + k >= FIRST_SPI) {
                            vgic.edge_write(0, first + k, value & (2 << (2 * k)) != 0);
                        }
                    }
                    // Read-only registers and everything RAZ/WI.
                    _ => {}
                }
            }
        }
        Ok(())
    }
}
