//! SMMU identification registers, typed as in the Arm SMMU specifications (SMMUv3 `IDR0`/`IDR3`/
//! `IDR5`, SMMUv2 `SMMU_IDR0`/`SMMU_IDR2`), and the capabilities stage-2 sharing needs.

use tock_registers::interfaces::Readable;
use tock_registers::register_bitfields;
use tock_registers::register_structs;
use tock_registers::registers::ReadOnly;

use crate::dt::SmmuKind;

register_bitfields![u32,
    /// SMMUv3 SMMU_IDR0.
    V3_IDR0 [
        S2P OFFSET(0) NUMBITS(1) [],
        S1P OFFSET(1) NUMBITS(1) [],
        COHACC OFFSET(4) NUMBITS(1) [],
        VMID16 OFFSET(18) NUMBITS(1) []
    ],
    /// SMMUv3 SMMU_IDR3.
    V3_IDR3 [
        BBML OFFSET(11) NUMBITS(2) [],
        RIL OFFSET(10) NUMBITS(1) []
    ],
    /// SMMUv3 SMMU_IDR5.
    V3_IDR5 [
        OAS OFFSET(0) NUMBITS(3) []
    ],
    /// SMMUv2 SMMU_IDR0.
    V2_IDR0 [
        CTTW OFFSET(14) NUMBITS(1) [],
        S2TS OFFSET(29) NUMBITS(1) []
    ],
    /// SMMUv2 SMMU_IDR2.
    V2_IDR2 [
        IAS OFFSET(0) NUMBITS(4) [],
        OAS OFFSET(4) NUMBITS(4) []
    ]
];

register_structs! {
    /// SMMUv3 page 0, identification registers.
    pub V3IdRegs {
        (0x00 => idr0: ReadOnly<u32, V3_IDR0::Register>),
        (0x04 => idr1: ReadOnly<u32>),
        (0x08 => idr2: ReadOnly<u32>),
        (0x0c => idr3: ReadOnly<u32, V3_IDR3::Register>),
        (0x10 => idr4: ReadOnly<u32>),
        (0x14 => idr5: ReadOnly<u32, V3_IDR5::Register>),
        (0x18 => @END),
    },

    /// SMMUv2 global register space 0, identification registers.
    pub V2IdRegs {
        (0x00 => _reserved0),
        (0x20 => idr0: ReadOnly<u32, V2_IDR0::Register>),
        (0x24 => idr1: ReadOnly<u32>),
        (0x28 => idr2: ReadOnly<u32, V2_IDR2::Register>),
        (0x2c => @END),
    }
}

/// What an SMMU can do with a stage-2 table it shares with the CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmmuCaps {
    /// Output address size in bits (the IPA size of a shared stage 2 cannot exceed it).
    pub oas_bits: u32,
    /// Break-before-make level (SMMUv3 IDR3.BBML; 0 for SMMUv2).
    pub bbml: u8,
    /// Table walks snoop the CPU caches (SMMUv3 IDR0.COHACC, SMMUv2 IDR0.CTTW).
    pub coherent_walk: bool,
    /// Range invalidation commands (SMMUv3 IDR3.RIL).
    pub range_invalidation: bool,
}

/// Address-size encoding shared by SMMUv3 IDR5.OAS and SMMUv2 IDR2.OAS.
fn size_bits(code: u32) -> u32 {
    match code {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        5 => 48,
        _ => 52,
    }
}

/// Reads the capabilities of the SMMU whose registers start at `base`.
///
/// # Safety
/// `base` must be the SMMU's register base (from the DT), mapped as device memory.
pub unsafe fn read_caps(kind: SmmuKind, base: u64) -> SmmuCaps {
    match kind {
        SmmuKind::V3 => {
            // SAFETY: per the caller's guarantee.
            let r = unsafe { &*(base as *const V3IdRegs) };
            caps_v3(r)
        }
        SmmuKind::V2 => {
            // SAFETY: per the caller's guarantee.
            let r = unsafe { &*(base as *const V2IdRegs) };
            caps_v2(r)
        }
    }
}

fn caps_v3(r: &V3IdRegs) -> SmmuCaps {
    SmmuCaps {
        oas_bits: size_bits(r.idr5.read(V3_IDR5::OAS)),
        bbml: r.idr3.read(V3_IDR3::BBML) as u8,
        coherent_walk: r.idr0.is_set(V3_IDR0::COHACC),
        range_invalidation: r.idr3.is_set(V3_IDR3::RIL),
    }
}

fn caps_v2(r: &V2IdRegs) -> SmmuCaps {
    SmmuCaps {
        oas_bits: size_bits(r.idr2.read(V2_IDR2::OAS)),
        bbml: 0,
        coherent_walk: r.idr0.is_set(V2_IDR0::CTTW),
        range_invalidation: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_smmuv3_ids() {
        // ID register values QEMU 10 virt's SMMUv3 reports (see shared/reference/qemu-virt.md).
        let mut page = [0u32; 6];
        page[0] = 0x0d44_101b;
        page[1] = 0x0273_0010;
        page[3] = 0x1414;
        page[5] = 0x74;
        // SAFETY: `page` has the layout of V3IdRegs (six u32 registers).
        let r = unsafe { &*(page.as_ptr() as *const V3IdRegs) };
        assert_eq!(
            caps_v3(r),
            SmmuCaps {
                oas_bits: 44,
                bbml: 2,
                coherent_walk: true,
                range_invalidation: true
            }
        );
    }

    #[test]
    fn mmu500_ids() {
        let mut regs = [0u32; 11];
        regs[8] = 1 << 14; // IDR0.CTTW
        regs[10] = 0x55; // IDR2: OAS 48-bit, IAS 48-bit
        // SAFETY: `regs` covers V2IdRegs (0x2c bytes of u32 registers).
        let r = unsafe { &*(regs.as_ptr() as *const V2IdRegs) };
        assert_eq!(
            caps_v2(r),
            SmmuCaps {
                oas_bits: 48,
                bbml: 0,
                coherent_walk: true,
                range_invalidation: false
            }
        );
    }
}
