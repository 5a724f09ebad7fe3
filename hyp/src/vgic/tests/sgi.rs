//! ICC_SGI1R_EL1 decoding and SGI delivery.

extern crate std;

use std::vec::Vec;

use crate::vgic::testutil::{GuestCpu, Vm};
use crate::vgic::{Sgi1r, VcpuSet, vcpu_affinity, vcpu_of_affinity};

fn ids(set: VcpuSet) -> Vec<usize> {
    set.iter().collect()
}

#[test]
fn field_positions() {
    // TargetList 0x8001, Aff1 0x12, INTID 0xd, Aff2 0x34, IRM, RS 0x5, Aff3 0x56, RES0 bits set.
    let value = 0x8001 | (0x12 << 16) | (0xd << 24) | (0x34 << 32) | (1 << 40) | (0x5 << 44);
    let value = value | (0x56 << 48) | (0xf << 28) | (0x7 << 41) | (0xff << 56);
    let sgi = Sgi1r::decode(value);
    assert_eq!(
        sgi,
        Sgi1r {
            intid: 0xd,
            target_list: 0x8001,
            aff1: 0x12,
            aff2: 0x34,
            aff3: 0x56,
            rs: 5,
            irm: true,
        }
    );
    // Encoding drops the RES0 bits.
    assert_eq!(
        sgi.encode(),
        0x8001 | (0x12 << 16) | (0xd << 24) | (0x34 << 32) | (1 << 40) | (0x5 << 44) | (0x56 << 48)
    );
    assert_eq!(Sgi1r::decode(sgi.encode()), sgi);
}

fn sgi(intid: u32, target_list: u16) -> Sgi1r {
    Sgi1r {
        intid,
        target_list,
        aff1: 0,
        aff2: 0,
        aff3: 0,
        rs: 0,
        irm: false,
    }
}

#[test]
fn targets_are_this_vms_vcpus_only() {
    // Target list: vCPUs 0, 2 and 5, in a VM of 4.
    let s = sgi(1, 0b10_0101);
    assert_eq!(ids(s.targets(0, 4)), [0, 2]);
    // Sending to oneself is allowed with IRM = 0.
    assert_eq!(ids(sgi(1, 0b1).targets(0, 4)), [0]);
    // Any other affinity level names no vCPU of the VM.
    for (aff1, aff2, aff3) in [(1, 0, 0), (0, 1, 0), (0, 0, 1)] {
        let s = Sgi1r {
            aff1,
            aff2,
            aff3,
            ..sgi(1, 0xffff)
        };
        assert!(s.targets(0, 4).is_empty(), "{aff1}.{aff2}.{aff3}");
    }
    // RS selects Aff0 16..31.
    let s = Sgi1r {
        rs: 1,
        ..sgi(1, 0b11)
    };
    assert!(s.targets(0, 16).is_empty());
    assert_eq!(ids(s.targets(0, 20)), [16, 17]);
    let s = Sgi1r {
        rs: 15,
        ..sgi(1, 0x8000)
    };
    assert_eq!(ids(s.targets(0, 256)), [255]);
}

#[test]
fn irm_means_every_other_vcpu_of_the_vm() {
    let s = Sgi1r {
        irm: true,
        ..sgi(3, 0)
    };
    assert_eq!(ids(s.targets(1, 4)), [0, 2, 3]);
    assert!(s.targets(0, 1).is_empty());
    // The target list and affinities are ignored.
    let s = Sgi1r {
        irm: true,
        aff1: 7,
        ..sgi(3, 0xffff)
    };
    assert_eq!(ids(s.targets(3, 4)), [0, 1, 2]);
}

#[test]
fn affinity_round_trip() {
    for v in [0, 1, 15, 16, 255] {
        assert_eq!(vcpu_affinity(v), v as u32);
        assert_eq!(vcpu_of_affinity(vcpu_affinity(v), 256), Some(v));
    }
    assert_eq!(vcpu_of_affinity(4, 4), None);
    assert_eq!(vcpu_of_affinity(0x100, 256), None);
}

#[test]
fn write_sgi1r_makes_sgis_pending() {
    let vm = Vm::new(3, &[]);
    vm.enable_grp1();
    for v in 0..3 {
        vm.setup_private(v, 6, 0x80);
    }
    vm.kick.take();
    // vCPU 0 sends SGI 6 to vCPUs 1 and 2 (and to a 4th that does not exist).
    let targets = vm.vgic.write_sgi1r(0, (6 << 24) | 0b1110);
    assert_eq!(ids(targets), [1, 2]);
    assert_eq!(vm.kick.take(), [1, 2]);
    assert_eq!(vm.sgi_read(0, 0x200), 0);
    assert_eq!(vm.sgi_read(1, 0x200), 1 << 6);
    assert_eq!(vm.sgi_read(2, 0x200), 1 << 6);
    // Twice before delivery: still one pending SGI (no source ID in affinity-routing mode).
    vm.vgic.write_sgi1r(0, (6 << 24) | 0b10);
    let mut cpu = GuestCpu::new(4);
    vm.vgic.flush(1, &mut cpu);
    assert_eq!(cpu.drain(), [6]);
    vm.vgic.sync(1, &mut cpu);
    vm.vgic.flush(1, &mut cpu);
    assert!(cpu.valid().is_empty());
    // IRM: everyone else.
    let targets = vm.vgic.write_sgi1r(2, (1 << 40) | (6 << 24));
    assert_eq!(ids(targets), [0, 1]);
}

#[test]
#[should_panic(expected = "not in this VM")]
fn write_sgi1r_from_a_foreign_vcpu_panics() {
    Vm::new(2, &[]).vgic.write_sgi1r(2, 1);
}

#[test]
fn vtimer_helper() {
    use crate::vgic::vtimer_asserted;
    // ENABLE | ISTATUS, not IMASK.
    assert!(vtimer_asserted(0b101));
    assert!(!vtimer_asserted(0b111));
    assert!(!vtimer_asserted(0b100));
    assert!(!vtimer_asserted(0b001));
    assert!(!vtimer_asserted(0));
    assert!(vtimer_asserted(0xf0 | 0b101), "other bits ignored");
}
