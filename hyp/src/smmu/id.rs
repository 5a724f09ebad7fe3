//! What an SMMU's identification registers say about sharing stage-2 tables with the CPUs. SMMUv3
//! IDRs are decoded by the driver ([`SmmuV3Caps`]); SMMUv2 `SMMU_IDR0`/`SMMU_IDR2` are typed here
//! until the SMMUv2 driver exists.

use tock_registers::interfaces::Readable;
use tock_registers::register_bitfields;
use tock_registers::register_structs;
use tock_registers::registers::ReadOnly;

use crate::dt::SmmuKind;
use crate::smmu::v3::driver::SmmuV3Caps;
use crate::smmu::v3::regs::addr_size_bits;

register_bitfields![u32,
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

/// Reads the capabilities of the SMMU whose registers start at `base`.
///
/// # Safety
/// `base` must be the SMMU's register base (from the DT), mapped as device memory.
pub unsafe fn read_caps(kind: SmmuKind, base: u64) -> SmmuCaps {
    match kind {
        SmmuKind::V3 => {
            // SAFETY: per the caller's guarantee; IDR0..IDR5 are the first six 32-bit registers.
            let idr = core::array::from_fn(|i| unsafe {
                ((base + 4 * i as u64) as *const u32).read_volatile()
            });
            SmmuV3Caps::from_idr(idr).stage2_caps()
        }
        SmmuKind::V2 => {
            // SAFETY: per the caller's guarantee.
            let r = unsafe { &*(base as *const V2IdRegs) };
            caps_v2(r)
        }
    }
}

fn caps_v2(r: &V2IdRegs) -> SmmuCaps {
    SmmuCaps {
        oas_bits: addr_size_bits(r.idr2.read(V2_IDR2::OAS)),
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
        let page = [0x0d44_101b, 0x0273_0010, 0, 0x1414, 0, 0x74];
        // SAFETY: `page` stands in for the six ID registers at the start of page 0.
        let caps = unsafe { read_caps(SmmuKind::V3, page.as_ptr() as u64) };
        assert_eq!(
            caps,
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
