//! Where everything goes in physical memory, decided once at boot and checked against the device
//! tree: the hypervisor's image and its pool (heap + page-table frames), the DTB it was given, and
//! each VM's RAM. The board file says where VM RAM is; the bootloader decides where the image and
//! the DTB land. A mismatch (VM RAM over the image, outside RAM, over firmware-reserved memory) is
//! an error that names the VM and the region — never a silent overlap.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::config::VmConfig;

const BLOCK_2M: u64 = 2 << 20;

/// A physical address range `[base, base + size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub base: u64,
    pub size: u64,
}

impl Range {
    pub const fn new(base: u64, size: u64) -> Self {
        Self { base, size }
    }

    pub const fn end(&self) -> u64 {
        self.base + self.size
    }

    pub const fn overlaps(&self, other: &Range) -> bool {
        self.base < other.end() && other.base < self.end()
    }

    pub fn contains(&self, other: &Range) -> bool {
        other.base >= self.base && other.end() <= self.end()
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..{:#x}", self.base, self.end())
    }
}

/// What the hypervisor keeps for itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The loaded image, .bss included.
    pub image: Range,
    /// Heap and page-table frames, right after the image (2 MiB aligned).
    pub pool: Range,
}

/// A layout conflict, with enough detail to fix the board file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutError(pub String);

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err(args: fmt::Arguments<'_>) -> LayoutError {
    LayoutError(alloc::format!("{args}"))
}

/// Places the pool after the image and checks every region against RAM, reserved memory, the DTB
/// and each other.
pub fn plan(
    ram: &[Range],
    reserved: &[Range],
    image: Range,
    dtb: Range,
    pool_size: u64,
    vms: &[VmConfig],
) -> Result<Plan, LayoutError> {
    let pool = Range::new(image.end().next_multiple_of(BLOCK_2M), pool_size);
    let in_ram = |r: &Range| ram.iter().any(|m| m.contains(r));
    if !in_ram(&pool) {
        return Err(err(format_args!(
            "hypervisor pool {pool} (after the image at {image}) is not inside RAM"
        )));
    }
    let mut taken: Vec<(String, Range)> = Vec::new();
    taken.push(("the hypervisor image".into(), image));
    taken.push(("the hypervisor pool".into(), pool));
    taken.push(("the device tree blob".into(), dtb));
    for r in reserved {
        taken.push((alloc::format!("reserved memory {r}"), *r));
    }
    if let Some((what, r)) = taken[2..].iter().find(|(_, r)| r.overlaps(&pool)) {
        return Err(err(format_args!(
            "hypervisor pool {pool} overlaps {what} ({r})"
        )));
    }
    for vm in vms {
        for (i, m) in vm.memory.iter().enumerate() {
            let r = Range::new(m.pa, m.size);
            if !in_ram(&r) {
                return Err(err(format_args!(
                    "VM {:?} memory[{i}] at {r} is not inside RAM the device tree describes",
                    vm.name
                )));
            }
            if let Some((what, t)) = taken.iter().find(|(_, t)| t.overlaps(&r)) {
                return Err(err(format_args!(
                    "VM {:?} memory[{i}] at {r} overlaps {what} ({t})",
                    vm.name
                )));
            }
            taken.push((alloc::format!("VM {:?} memory[{i}]", vm.name), r));
        }
    }
    Ok(Plan { image, pool })
}

/// The smallest stage-2 input size (IPA bits, at least 32) that covers every IPA below `top`
/// (exclusive). A smaller IPA space means fewer stage-2 levels for every walker: with 4 KiB
/// pages, 40 bits start at level 1 (two concatenated tables) where 44 bits need level 0.
pub fn ipa_bits_for(top: u64) -> u32 {
    let needed = match top {
        0 | 1 => 1,
        t => 64 - (t - 1).leading_zeros(),
    };
    needed.max(32)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ipa_bits_cover_the_top() {
        use super::ipa_bits_for;
        assert_eq!(ipa_bits_for(0), 32);
        assert_eq!(ipa_bits_for(0x8400_0000), 32);
        assert_eq!(ipa_bits_for(1 << 32), 32);
        assert_eq!(ipa_bits_for((1 << 32) + 1), 33);
        // QEMU virt: the high PCIe window ends exactly at 1 TiB.
        assert_eq!(ipa_bits_for(0x100_0000_0000), 40);
        assert_eq!(ipa_bits_for(0x100_0000_0001), 41);
        assert_eq!(ipa_bits_for(u64::MAX), 64);
    }

    use super::*;
    use crate::config::MemRegion;

    const MIB: u64 = 1 << 20;

    fn vm(name: &'static str, pa: u64, size: u64) -> VmConfig {
        let memory: &'static [MemRegion] = Box::leak(Box::new([MemRegion {
            ipa: 0x8000_0000,
            pa,
            size,
        }]));
        VmConfig {
            name,
            cpus: &[0],
            memory,
            devices: &[],
            console_ipa: None,
            pci: &[],
            stream_ids: &[],
            payload_name: "selftest",
            payload: &[],
            initrd: &[],
            bootargs: None,
            test_services: false,
            power_controller_ipa: None,
            power_votes: &[],
        }
    }

    const RAM: [Range; 1] = [Range::new(0x4000_0000, 1 << 30)];
    const IMAGE: Range = Range::new(0x4020_0000, 0x12_3000);
    const DTB: Range = Range::new(0x4800_0000, 0x10_0000);

    #[test]
    fn qemu_layout_is_accepted() {
        let vms = [
            vm("vm0", 0x5000_0000, 64 * MIB),
            vm("vm1", 0x5800_0000, 64 * MIB),
        ];
        let p = plan(&RAM, &[], IMAGE, DTB, 32 * MIB, &vms).unwrap();
        assert_eq!(p.pool, Range::new(0x4040_0000, 32 * MIB));
    }

    #[test]
    fn vm_over_the_image_is_named() {
        let vms = [vm("vm0", 0x4000_0000, 64 * MIB)];
        let e = plan(&RAM, &[], IMAGE, DTB, 32 * MIB, &vms).unwrap_err();
        assert!(e.0.contains("VM \"vm0\" memory[0]"), "{e}");
        assert!(e.0.contains("the hypervisor image"), "{e}");
    }

    #[test]
    fn vm_outside_ram_and_vm_overlap() {
        let e = plan(
            &RAM,
            &[],
            IMAGE,
            DTB,
            32 * MIB,
            &[vm("big", 0x7c00_0000, 128 * MIB)],
        )
        .unwrap_err();
        assert!(e.0.contains("not inside RAM"), "{e}");
        let vms = [
            vm("a", 0x5000_0000, 64 * MIB),
            vm("b", 0x5200_0000, 64 * MIB),
        ];
        let e = plan(&RAM, &[], IMAGE, DTB, 32 * MIB, &vms).unwrap_err();
        assert!(e.0.contains("VM \"b\"") && e.0.contains("VM \"a\""), "{e}");
    }

    #[test]
    fn pool_conflicts() {
        let dtb_in_pool = Range::new(0x4100_0000, 0x1000);
        let e = plan(&RAM, &[], IMAGE, dtb_in_pool, 32 * MIB, &[]).unwrap_err();
        assert!(e.0.contains("device tree blob"), "{e}");
        let e = plan(&RAM, &[], IMAGE, DTB, 2 << 30, &[]).unwrap_err();
        assert!(e.0.contains("not inside RAM"), "{e}");
        let reserved = [Range::new(0x5000_0000, MIB)];
        let e = plan(
            &RAM,
            &reserved,
            IMAGE,
            DTB,
            32 * MIB,
            &[vm("v", 0x5000_0000, 4 * MIB)],
        )
        .unwrap_err();
        assert!(e.0.contains("reserved memory"), "{e}");
    }
}
