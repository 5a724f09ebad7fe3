//! Redistributor register semantics.

extern crate std;

use crate::trap::{MmioDevice, MmioError};
use crate::vgic::testutil::{PhysCall, Vm};
use crate::vgic::{GICR_STRIDE, Redistributors};

const TYPER: u64 = 0x8;
const WAKER: u64 = 0x14;
const IGROUPR0: u64 = 0x80;
const ISENABLER0: u64 = 0x100;
const ICENABLER0: u64 = 0x180;
const ISPENDR0: u64 = 0x200;
const ICPENDR0: u64 = 0x280;
const ISACTIVER0: u64 = 0x300;
const ICACTIVER0: u64 = 0x380;
const IPRIORITYR: u64 = 0x400;
const ICFGR0: u64 = 0xc00;
const ICFGR1: u64 = 0xc04;
const IGRPMODR0: u64 = 0xd00;

#[test]
fn typer_per_vcpu() {
    let vm = Vm::new(3, &[]);
    assert_eq!(vm.redist.size(), 3 * GICR_STRIDE);
    for v in 0..3u64 {
        let typer = vm.redist.read(0, v * GICR_STRIDE + TYPER, 8).unwrap();
        let last = if v == 2 { 1 << 4 } else { 0 };
        assert_eq!(typer, (v << 32) | (v << 8) | last, "vCPU {v}");
        // 32-bit halves.
        assert_eq!(
            vm.redist.read(0, v * GICR_STRIDE + TYPER, 4),
            Ok(typer & 0xffff_ffff)
        );
        assert_eq!(vm.redist.read(0, v * GICR_STRIDE + TYPER + 4, 4), Ok(v));
        // Read-only.
        vm.redist.write(0, v * GICR_STRIDE + TYPER, 8, 0).unwrap();
        assert_eq!(vm.redist.read(0, v * GICR_STRIDE + TYPER, 8), Ok(typer));
    }
    assert_eq!(
        vm.redist.read(0, 3 * GICR_STRIDE, 4),
        Err(MmioError::BadOffset {
            offset: 3 * GICR_STRIDE
        })
    );
}

#[test]
fn rd_frame_registers() {
    let vm = Vm::new(2, &[]);
    let rd = GICR_STRIDE; // vCPU 1
    assert_eq!(vm.redist.read(0, rd, 4), Ok(0), "CTLR");
    vm.redist.write(0, rd, 4, 1).unwrap();
    assert_eq!(vm.redist.read(0, rd, 4), Ok(0), "EnableLPIs RES0");
    assert_eq!(vm.redist.read(0, rd + 4, 4), Ok(0x4800_043b), "IIDR");
    assert_eq!(vm.redist.read(0, rd + 0x10, 4), Ok(0), "STATUSR");
    assert_eq!(vm.redist.read(0, rd + 0x70, 8), Ok(0), "PROPBASER");
    vm.redist.write(0, rd + 0x78, 8, u64::MAX).unwrap();
    assert_eq!(vm.redist.read(0, rd + 0x78, 8), Ok(0), "PENDBASER");
    assert_eq!(vm.redist.read(0, rd + 0xffe8, 4), Ok(0x3b), "PIDR2");
    assert_eq!(
        vm.redist.read(0, rd + 4, 8),
        Err(MmioError::BadSize { size: 8 })
    );
}

#[test]
fn waker_handshake() {
    let vm = Vm::new(2, &[]);
    // Reset: ProcessorSleep = ChildrenAsleep = 1.
    assert_eq!(vm.redist.read(0, WAKER, 4), Ok(0b110));
    // Linux: clear ProcessorSleep, poll until ChildrenAsleep reads 0.
    vm.redist.write(0, WAKER, 4, 0b100).unwrap();
    assert_eq!(vm.redist.read(0, WAKER, 4), Ok(0));
    // The other vCPU's redistributor is still asleep.
    assert_eq!(vm.redist.read(0, GICR_STRIDE + WAKER, 4), Ok(0b110));
    // Going to sleep: set ProcessorSleep, ChildrenAsleep follows.
    vm.redist.write(0, WAKER, 4, 0b10).unwrap();
    assert_eq!(vm.redist.read(0, WAKER, 4), Ok(0b110));
    // Bits 0 and 31 are RAZ/WI.
    vm.redist.write(0, WAKER, 4, 0x8000_0001).unwrap();
    assert_eq!(vm.redist.read(0, WAKER, 4), Ok(0));
}

#[test]
fn sgi_frame_bitmaps_are_per_vcpu() {
    let vm = Vm::new(2, &[]);
    assert_eq!(vm.sgi_read(0, IGROUPR0), 0xffff_ffff, "Group 1, RAO");
    vm.sgi_write(0, IGROUPR0, 0);
    assert_eq!(vm.sgi_read(0, IGROUPR0), 0xffff_ffff);

    vm.sgi_write(1, ISENABLER0, 0x0800_0003);
    assert_eq!(vm.sgi_read(1, ISENABLER0), 0x0800_0003);
    assert_eq!(vm.sgi_read(1, ICENABLER0), 0x0800_0003);
    assert_eq!(vm.sgi_read(0, ISENABLER0), 0, "vCPU 0 unaffected");
    vm.sgi_write(1, ICENABLER0, 1);
    assert_eq!(vm.sgi_read(1, ISENABLER0), 0x0800_0002);

    vm.sgi_write(0, ISPENDR0, 0x10);
    assert_eq!(vm.sgi_read(0, ISPENDR0), 0x10);
    assert_eq!(vm.sgi_read(0, ICPENDR0), 0x10);
    assert_eq!(vm.sgi_read(1, ISPENDR0), 0);
    vm.sgi_write(0, ICPENDR0, 0x10);
    assert_eq!(vm.sgi_read(0, ISPENDR0), 0);

    vm.sgi_write(1, ISACTIVER0, 1 << 20);
    assert_eq!(vm.sgi_read(1, ISACTIVER0), 1 << 20);
    assert_eq!(vm.sgi_read(1, ICACTIVER0), 1 << 20);
    vm.sgi_write(1, ICACTIVER0, 1 << 20);
    assert_eq!(vm.sgi_read(1, ISACTIVER0), 0);

    // Only register 0 of each bank exists in SGI_base.
    vm.sgi_write(0, ISENABLER0 + 4, u32::MAX);
    assert_eq!(vm.sgi_read(0, ISENABLER0 + 4), 0);
    assert_eq!(vm.sgi_read(0, ISENABLER0), 0);
    // No physical side for SGIs/PPIs that are not forwarded.
    assert!(vm.phys.take().is_empty());
}

#[test]
fn sgi_frame_priorities_and_config() {
    let vm = Vm::new(2, &[]);
    vm.sgi_write(1, IPRIORITYR + 4, 0x1122_33ff);
    assert_eq!(vm.sgi_read(1, IPRIORITYR + 4), 0x1020_30f8);
    vm.redist
        .write(0, GICR_STRIDE + 0x1_0000 + IPRIORITYR + 27, 1, 0x80)
        .unwrap();
    assert_eq!(
        vm.redist
            .read(0, GICR_STRIDE + 0x1_0000 + IPRIORITYR + 27, 1),
        Ok(0x80)
    );
    assert_eq!(vm.sgi_read(1, IPRIORITYR + 24), 0x8000_0000);
    assert_eq!(vm.sgi_read(0, IPRIORITYR + 4), 0);

    // SGIs: edge, read-only.
    assert_eq!(vm.sgi_read(0, ICFGR0), 0xaaaa_aaaa);
    vm.sgi_write(0, ICFGR0, 0);
    assert_eq!(vm.sgi_read(0, ICFGR0), 0xaaaa_aaaa);
    // PPIs: level at reset, programmable except the forwarded timer PPI 27 (field 11).
    assert_eq!(vm.sgi_read(0, ICFGR1), 0);
    vm.sgi_write(0, ICFGR1, 0xffff_ffff);
    assert_eq!(vm.sgi_read(0, ICFGR1), 0xaaaa_aaaa & !(3 << 22));
    assert_eq!(vm.sgi_read(1, ICFGR1), 0);

    vm.sgi_write(0, IGRPMODR0, u32::MAX);
    assert_eq!(vm.sgi_read(0, IGRPMODR0), 0);
    vm.sgi_write(0, 0xe00, u32::MAX);
    assert_eq!(vm.sgi_read(0, 0xe00), 0, "NSACR");
}

#[test]
fn forwarded_timer_ppi_deactivates_only_its_own_occurrence() {
    let vm = Vm::new(2, &[]);
    vm.sgi_write(1, ICPENDR0, u32::MAX);
    vm.sgi_write(1, ICACTIVER0, u32::MAX);
    assert!(vm.phys.take().is_empty(), "nothing physical is active");
    vm.vgic.inject_phys_ppi(1, 27).unwrap();
    assert_eq!(vm.sgi_read(1, ISPENDR0), 1 << 27);
    // Clearing pending from vCPU 0 (in vCPU 1's frame): the physical PPI of vCPU 1's CPU.
    vm.redist
        .write(0, GICR_STRIDE + 0x1_0000 + ICPENDR0, 4, 1 << 27)
        .unwrap();
    assert_eq!(vm.phys.take(), [PhysCall::Deactivate(27, 1)]);
    assert_eq!(vm.sgi_read(1, ISPENDR0), 0);
    // Only configured PPIs can be forwarded; software cannot drive them as levels.
    assert!(vm.vgic.inject_phys_ppi(1, 26).is_err());
    assert!(vm.vgic.set_ppi_level(1, 27, true).is_err());
    assert!(vm.vgic.inject_phys_ppi(2, 27).is_err());
}

#[test]
fn bad_accesses() {
    let r = Vm::new(1, &[]).redist;
    let _: &Redistributors = &r;
    assert_eq!(
        r.read(0, 0x1_0000 + ISENABLER0, 8),
        Err(MmioError::BadSize { size: 8 })
    );
    assert_eq!(
        r.read(0, 0x1_0000 + IPRIORITYR + 1, 4),
        Err(MmioError::BadOffset { offset: 0x1_0401 })
    );
    assert_eq!(r.read(0, 0x1_0000 + IPRIORITYR + 1, 1), Ok(0));
    assert_eq!(r.read(0, 0x1_8000, 8), Ok(0));
    assert_eq!(r.name(), "vgic-redist");
}
