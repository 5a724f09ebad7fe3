//! The hypervisor's test hypercalls: a VM whose board entry sets `test_services` may ask the
//! hypervisor to unmap part of its own RAM from its stage 2 and to map it back. System tests use
//! them to change a live stage 2 under a running guest and see that the CPU's TLBs really follow
//! (an unmapped page must fault at once, a remapped one must work with its old contents).
//!
//! The guest names only IPAs; the backing physical memory always comes from the VM's own RAM
//! regions, so these calls cannot give a VM anything it did not already own.
//!
//! Function IDs are in the SMCCC "vendor-specific hypervisor service" range (owner 6), fast calls,
//! SMC64 convention: x1 = IPA, x2 = size, both page aligned; x0 returns 0 or a PSCI-style error.

use crate::config::MemRegion;

/// Unmap `[x1, x1 + x2)` from the caller's stage 2.
pub const HYP_TEST_UNMAP: u32 = 0xc600_0001;
/// Map `[x1, x1 + x2)` back to the VM's own RAM.
pub const HYP_TEST_MAP: u32 = 0xc600_0002;
/// Read the counters of the power domain of the SMMU in front of the VM's devices: returns
/// x0 = 0, x1 = power-downs, x2 = power-ups, x3 = TLB invalidations skipped while off; x0 =
/// [`NOT_SUPPORTED`] when the VM has no SMMU or it has no power domain.
pub const HYP_TEST_POWER_STATS: u32 = 0xc600_0003;

/// Returned when the VM is not allowed the test services.
pub const NOT_SUPPORTED: u64 = -1i64 as u64;
/// Returned for a range outside the VM's RAM, unaligned, or a failed (re)map.
pub const INVALID_PARAMETERS: u64 = -2i64 as u64;

/// A decoded test hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypTestCall {
    Unmap { ipa: u64, size: u64 },
    Map { ipa: u64, size: u64 },
    PowerStats,
}

/// Decodes `fid` with arguments x1, x2 if it is one of the test hypercalls.
pub fn decode(fid: u32, x1: u64, x2: u64) -> Option<HypTestCall> {
    match fid {
        HYP_TEST_UNMAP => Some(HypTestCall::Unmap { ipa: x1, size: x2 }),
        HYP_TEST_MAP => Some(HypTestCall::Map { ipa: x1, size: x2 }),
        HYP_TEST_POWER_STATS => Some(HypTestCall::PowerStats),
        _ => None,
    }
}

/// The physical address backing `[ipa, ipa + size)` when the whole range lies, page aligned, in
/// one of the VM's RAM regions.
pub fn backing(memory: &[MemRegion], ipa: u64, size: u64) -> Option<u64> {
    if size == 0 || (ipa | size) & 0xfff != 0 {
        return None;
    }
    let end = ipa.checked_add(size)?;
    memory
        .iter()
        .find(|m| ipa >= m.ipa && end <= m.ipa + m.size)
        .map(|m| m.pa + (ipa - m.ipa))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: [MemRegion; 2] = [
        MemRegion {
            ipa: 0x8000_0000,
            pa: 0x5000_0000,
            size: 0x400_0000,
        },
        MemRegion {
            ipa: 0x9000_0000,
            pa: 0x6000_0000,
            size: 0x20_0000,
        },
    ];

    #[test]
    fn decodes_only_its_function_ids() {
        assert_eq!(
            decode(HYP_TEST_UNMAP, 1, 2),
            Some(HypTestCall::Unmap { ipa: 1, size: 2 })
        );
        assert_eq!(
            decode(HYP_TEST_MAP, 3, 4),
            Some(HypTestCall::Map { ipa: 3, size: 4 })
        );
        assert_eq!(decode(0x8400_0000, 0, 0), None);
        assert_eq!(
            decode(HYP_TEST_POWER_STATS, 5, 6),
            Some(HypTestCall::PowerStats)
        );
        assert_eq!(decode(0xc600_0004, 0, 0), None);
    }

    #[test]
    fn backing_is_inside_one_region_only() {
        assert_eq!(backing(&RAM, 0x8000_5000, 0x1000), Some(0x5000_5000));
        assert_eq!(backing(&RAM, 0x9000_0000, 0x20_0000), Some(0x6000_0000));
        // Straddles the end of a region, unaligned, empty, outside, overflowing.
        assert_eq!(backing(&RAM, 0x83ff_f000, 0x2000), None);
        assert_eq!(backing(&RAM, 0x8000_0800, 0x1000), None);
        assert_eq!(backing(&RAM, 0x8000_0000, 0), None);
        assert_eq!(backing(&RAM, 0x4000_0000, 0x1000), None);
        assert_eq!(backing(&RAM, !0xfff, 0x2000), None);
    }
}
