//! Isolation: whatever a guest writes to its distributor and redistributors, only its own SPIs
//! change, and the physical side is only called for the physical SPI it was given.

extern crate std;

use std::vec::Vec;

use crate::trap::MmioDevice;
use crate::vgic::testutil::{GuestCpu, PhysCall, Vm, hw, virt};
use crate::vgic::{GICD_SIZE, VgicError};

/// The VM owns virtual SPI 40 and SPI 50 mapped to physical 100.
fn owned() -> Vm {
    Vm::new(2, &[virt(40, true), hw(50, 100, false)])
}

/// Every 32-bit register of the distributor frame, as (offset, value read).
fn gicd_snapshot(vm: &Vm) -> Vec<(u64, u32)> {
    (0..GICD_SIZE)
        .step_by(4)
        .map(|off| (off, vm.gicd_read(off)))
        .collect()
}

/// INTIDs whose bits/bytes/fields a distributor offset covers.
fn intids_of(off: u64) -> Vec<u32> {
    match off {
        0x080..0x400 => (0..32)
            .map(|b| ((off & 0x7f) / 4 * 32) as u32 + b)
            .collect(),
        0x400..0x800 => (0..4).map(|b| (off - 0x400) as u32 + b).collect(),
        0xc00..0xd00 => (0..16)
            .map(|b| ((off - 0xc00) / 4 * 16) as u32 + b)
            .collect(),
        0x6000..0x8000 => std::vec![((off - 0x6000) / 8) as u32],
        _ => Vec::new(),
    }
}

#[test]
fn writing_everything_everywhere_touches_only_owned_spis() {
    let vm = owned();
    let other = Vm::new(2, &[virt(41, true), hw(51, 101, false)]);
    let other_before = gicd_snapshot(&other);
    // All ones, then all zeros, then all ones again, to every offset, as 32-bit and (where
    // allowed) 64-bit and byte writes.
    for value in [u64::MAX, 0, u64::MAX] {
        for off in (0..GICD_SIZE).step_by(4) {
            vm.dist.write(1, off, 4, value).unwrap();
            let _ = vm.dist.write(1, off, 1, value);
            if off % 8 == 0 {
                let _ = vm.dist.write(1, off, 8, value);
            }
        }
    }
    // Physical calls: only for pINTID 100, and routing only to this VM's vCPUs.
    let calls = vm.phys.take();
    assert!(!calls.is_empty());
    for call in &calls {
        match *call {
            PhysCall::Enable(p) | PhysCall::Disable(p) => assert_eq!(p, 100),
            PhysCall::Route(p, v) => assert!(p == 100 && v < 2, "{call:?}"),
            PhysCall::Deactivate(p, v) => assert!(p == 100 && v < 2, "{call:?}"),
        }
    }
    // Every field of an unowned INTID reads as zero.
    for (off, value) in gicd_snapshot(&vm) {
        let ints = intids_of(off);
        if ints.is_empty() {
            continue;
        }
        let owned_mask: u32 = match off {
            0x080..0x400 => ints
                .iter()
                .enumerate()
                .filter(|&(_, i)| matches!(i, 40 | 50))
                .fold(0, |m, (b, _)| m | (1 << b)),
            0x400..0x800 => ints
                .iter()
                .enumerate()
                .filter(|&(_, i)| matches!(i, 40 | 50))
                .fold(0, |m, (b, _)| m | (0xff << (8 * b))),
            0xc00..0xd00 => ints
                .iter()
                .enumerate()
                .filter(|&(_, i)| matches!(i, 40 | 50))
                .fold(0, |m, (b, _)| m | (3 << (2 * b))),
            _ => {
                if matches!(ints[0], 40 | 50) {
                    u32::MAX
                } else {
                    0
                }
            }
        };
        assert_eq!(value & !owned_mask, 0, "offset {off:#x}");
    }
    // No private interrupt changed.
    for v in 0..2 {
        for off in [0x100, 0x200, 0x300, 0x400, 0x41c, 0xc04] {
            assert_eq!(vm.sgi_read(v, off), 0, "vCPU {v} SGI_base {off:#x}");
        }
    }
    // The other VM saw nothing.
    assert_eq!(gicd_snapshot(&other), other_before);
    assert!(other.phys.take().is_empty());
    assert!(other.kick.take().is_empty());
}

#[test]
fn unowned_spis_cannot_be_driven_by_the_hypervisor_api_either() {
    let vm = owned();
    assert_eq!(vm.vgic.inject_spi(41), Err(VgicError::NotOwned(41)));
    assert_eq!(vm.vgic.set_level(41, true), Err(VgicError::NotOwned(41)));
    assert_eq!(vm.vgic.inject_spi(50), Err(VgicError::HwMapped(50)));
    assert_eq!(vm.vgic.inject_phys_spi(101), Err(VgicError::NotOwned(101)));
    assert_eq!(vm.vgic.inject_phys_spi(50), Err(VgicError::NotOwned(50)));
    assert_eq!(vm.vgic.inject(2, 1), Err(VgicError::NoSuchVcpu));
    assert_eq!(vm.vgic.inject(0, 32), Err(VgicError::BadIntid(32)));
    assert_eq!(
        vm.vgic.set_ppi_level(0, 3, true),
        Err(VgicError::BadIntid(3))
    );
    assert!(vm.phys.take().is_empty());
    assert!(vm.kick.take().is_empty());
}

#[test]
fn redistributor_writes_stay_in_the_vm() {
    let vm = owned();
    // Every offset of both vCPUs' frames, all ones then zeros.
    for value in [u64::MAX, 0, u64::MAX] {
        for off in (0..vm.redist.size()).step_by(4) {
            let _ = vm.redist.write(0, off, 4, value);
        }
    }
    // Nothing physical: no timer occurrence was outstanding.
    assert!(vm.phys.take().is_empty());
    // The SPIs are untouched.
    assert_eq!(vm.gicd_read(0x104), 0);
    assert_eq!(vm.gicd_read(0x204), 0);
    assert_eq!(vm.gicd_read(0x428), 0);
}

/// A small deterministic generator.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 11
    }
}

#[test]
fn random_guest_activity_keeps_the_physical_side_confined() {
    let vm = owned();
    let mut cpus = [GuestCpu::new(4), GuestCpu::new(4)];
    let mut rng = Lcg(0x5eed);
    let sizes = [1u8, 4, 8];
    for step in 0..20_000 {
        let r = rng.next();
        let v = (r & 1) as usize;
        match (r >> 1) % 8 {
            0..=2 => {
                // A distributor access, biased towards the interesting registers.
                let off = if r & 0x100 != 0 {
                    (rng.next() % 0x1000) & !3
                } else {
                    0x6000 + (rng.next() % 0x400) * 8
                };
                let size = sizes[(rng.next() % 3) as usize];
                let off = off & !(u64::from(size) - 1);
                let _ = vm.dist.write(v, off, size, rng.next());
            }
            3 => {
                let off = (rng.next() % vm.redist.size()) & !3;
                let _ = vm.redist.write(v, off, 4, rng.next());
            }
            4 => {
                let _ = vm.vgic.inject_phys_spi(100);
                let _ = vm.vgic.inject_spi(40);
            }
            5 => {
                let _ = vm.vgic.inject_phys_ppi(v, 27);
                vm.vgic.write_sgi1r(v, rng.next());
            }
            _ => {
                // The vCPU runs a little.
                vm.vgic.flush(v, &mut cpus[v]);
                if let Some(i) = cpus[v].ack()
                    && r & 0x200 != 0
                {
                    cpus[v].eoi(i);
                }
                vm.vgic.sync(v, &mut cpus[v]);
            }
        }
        for call in vm.phys.take() {
            match call {
                PhysCall::Enable(p) | PhysCall::Disable(p) | PhysCall::Route(p, _) => {
                    assert_eq!(p, 100, "step {step}: {call:?}");
                }
                PhysCall::Deactivate(p, _) => {
                    assert!(p == 100 || p == 27, "step {step}: {call:?}");
                }
            }
            if let PhysCall::Route(_, t) | PhysCall::Deactivate(_, t) = call {
                assert!(t < 2, "step {step}: {call:?}");
            }
        }
        for cpu in &cpus {
            for lr in cpu.valid() {
                assert!(
                    lr.vintid < 32 || lr.vintid == 40 || lr.vintid == 50,
                    "step {step}: {lr:?}"
                );
                assert!(lr.pintid.is_none() || matches!(lr.pintid, Some(27 | 100)));
                assert!(lr.group1);
            }
        }
    }
}
