//! Distributor register semantics.

extern crate std;

use std::vec;

use crate::trap::{MmioDevice, MmioError};
use crate::vgic::testutil::{PhysCall, Vm, hw, virt};
use crate::vgic::{SpiConfig, VgicConfig, VgicError};

const CTLR: u64 = 0x0;
const TYPER: u64 = 0x4;
const IIDR: u64 = 0x8;
const TYPER2: u64 = 0xc;
const STATUSR: u64 = 0x10;
const IGROUPR: u64 = 0x80;
const ISENABLER: u64 = 0x100;
const ICENABLER: u64 = 0x180;
const ISPENDR: u64 = 0x200;
const ICPENDR: u64 = 0x280;
const ISACTIVER: u64 = 0x300;
const ICACTIVER: u64 = 0x380;
const IPRIORITYR: u64 = 0x400;
const ITARGETSR: u64 = 0x800;
const ICFGR: u64 = 0xc00;
const IGRPMODR: u64 = 0xd00;
const NSACR: u64 = 0xe00;
const IROUTER: u64 = 0x6000;
const PIDR2: u64 = 0xffe8;

/// VM with SPIs 40 (virtual, level), 41 (virtual, edge), 70 (mapped to physical 100, level).
fn vm() -> Vm {
    Vm::new(2, &[virt(40, false), virt(41, true), hw(70, 100, false)])
}

#[test]
fn ctlr() {
    let vm = vm();
    // ARE and DS set, nothing enabled.
    assert_eq!(vm.gicd_read(CTLR), 0x50);
    vm.gicd_write(CTLR, 0xffff_ffff);
    // Only EnableGrp1 sticks: no Group 0, no E1NWF, RWP reads 0.
    assert_eq!(vm.gicd_read(CTLR), 0x52);
    vm.gicd_write(CTLR, 0);
    assert_eq!(vm.gicd_read(CTLR), 0x50);
    // Enabling or disabling Group 1 makes every vCPU re-evaluate.
    vm.kick.take();
    vm.gicd_write(CTLR, 2);
    assert_eq!(vm.kick.take(), [0, 1]);
    vm.gicd_write(CTLR, 2);
    assert!(vm.kick.take().is_empty());
}

#[test]
fn typer_iidr_and_ids() {
    let vm = vm();
    let typer = vm.gicd_read(TYPER);
    // SPIs up to 70: INTIDs < 96 → ITLinesNumber 2.
    assert_eq!(typer & 0x1f, 2);
    assert_eq!((typer >> 19) & 0x1f, 9, "IDbits: 10 bits");
    assert_eq!(typer & (1 << 25), 1 << 25, "No1N");
    assert_eq!(typer & (1 << 26), 0, "RSS with 2 vCPUs");
    // LPIS, MBIS, DVIS, A3V, SecurityExtn, ESPI, NMI, CPUNumber: 0.
    assert_eq!(typer & !(0x1f | (0x1f << 19) | (1 << 25)), 0);

    assert_eq!(Vm::new(1, &[]).gicd_read(TYPER) & 0x1f, 0);
    assert_eq!(Vm::new(1, &[virt(63, true)]).gicd_read(TYPER) & 0x1f, 1);
    assert_eq!(Vm::new(1, &[virt(64, true)]).gicd_read(TYPER) & 0x1f, 2);
    assert_eq!(Vm::new(1, &[virt(1019, true)]).gicd_read(TYPER) & 0x1f, 31);
    assert_eq!(
        Vm::new(17, &[]).gicd_read(TYPER) & (1 << 26),
        1 << 26,
        "RSS"
    );

    assert_eq!(vm.gicd_read(IIDR), 0x4800_043b);
    assert_eq!(vm.gicd_read(TYPER2), 0);
    assert_eq!(vm.gicd_read(STATUSR), 0);
    vm.gicd_write(TYPER, 0);
    vm.gicd_write(IIDR, 0);
    assert_eq!(vm.gicd_read(TYPER), typer);
    assert_eq!(vm.gicd_read(PIDR2), 0x3b);
    assert_eq!((vm.gicd_read(PIDR2) >> 4) & 0xf, 3, "ArchRev: GICv3");
    let cids: vec::Vec<u32> = (0..4).map(|i| vm.gicd_read(0xfff0 + 4 * i)).collect();
    assert_eq!(cids, [0x0d, 0xf0, 0x05, 0xb1]);
    vm.gicd_write(PIDR2, 0);
    assert_eq!(vm.gicd_read(PIDR2), 0x3b);
}

#[test]
fn group_and_raz_wi_registers() {
    let vm = vm();
    // Owned SPIs are Group 1, RAO/WI.
    assert_eq!(vm.gicd_read(IGROUPR + 4), (1 << 8) | (1 << 9));
    assert_eq!(vm.gicd_read(IGROUPR + 8), 1 << 6);
    vm.gicd_write(IGROUPR + 4, 0);
    assert_eq!(vm.gicd_read(IGROUPR + 4), (1 << 8) | (1 << 9));
    // SGIs/PPIs are not the distributor's with affinity routing.
    assert_eq!(vm.gicd_read(IGROUPR), 0);
    for off in [
        IGRPMODR + 4,
        NSACR + 8,
        ITARGETSR + 40,
        0xf00,
        0xf10,
        0xf20,
        0xf80,
        0x40,
        0x48,
    ] {
        vm.gicd_write(off, 0xffff_ffff);
        assert_eq!(vm.gicd_read(off), 0, "{off:#x}");
    }
    assert_eq!(vm.dist.read(0, ITARGETSR + 40, 1), Ok(0));
    assert!(vm.phys.take().is_empty());
}

#[test]
fn enable_pending_active() {
    let vm = vm();
    let w = ISENABLER + 4; // INTIDs 32..64
    vm.gicd_write(w, 0xffff_ffff);
    assert_eq!(vm.gicd_read(ISENABLER + 4), (1 << 8) | (1 << 9));
    assert_eq!(vm.gicd_read(ICENABLER + 4), (1 << 8) | (1 << 9));
    vm.gicd_write(ICENABLER + 4, 1 << 9);
    assert_eq!(vm.gicd_read(ISENABLER + 4), 1 << 8);
    // Writing 0s changes nothing.
    vm.gicd_write(ICENABLER + 4, 0);
    vm.gicd_write(ISENABLER + 4, 0);
    assert_eq!(vm.gicd_read(ISENABLER + 4), 1 << 8);

    vm.gicd_write(ISPENDR + 4, 1 << 9);
    assert_eq!(vm.gicd_read(ISPENDR + 4), 1 << 9);
    assert_eq!(vm.gicd_read(ICPENDR + 4), 1 << 9);
    vm.gicd_write(ICPENDR + 4, 0xffff_ffff);
    assert_eq!(vm.gicd_read(ISPENDR + 4), 0);

    vm.gicd_write(ISACTIVER + 4, 1 << 8);
    assert_eq!(vm.gicd_read(ISACTIVER + 4), 1 << 8);
    assert_eq!(vm.gicd_read(ICACTIVER + 4), 1 << 8);
    vm.gicd_write(ICACTIVER + 4, 1 << 8);
    assert_eq!(vm.gicd_read(ISACTIVER + 4), 0);

    // A level-sensitive SPI whose line is high reads as pending; ICPENDR does not clear that.
    vm.vgic.set_level(40, true).unwrap();
    assert_eq!(vm.gicd_read(ISPENDR + 4), 1 << 8);
    vm.gicd_write(ICPENDR + 4, 1 << 8);
    assert_eq!(vm.gicd_read(ISPENDR + 4), 1 << 8);
    vm.vgic.set_level(40, false).unwrap();
    assert_eq!(vm.gicd_read(ISPENDR + 4), 0);
    // But a software pend on it is a latch.
    vm.gicd_write(ISPENDR + 4, 1 << 8);
    assert_eq!(vm.gicd_read(ISPENDR + 4), 1 << 8);
    vm.gicd_write(ICPENDR + 4, 1 << 8);
    assert_eq!(vm.gicd_read(ISPENDR + 4), 0);
}

#[test]
fn mapped_spi_enable_reaches_hardware() {
    let vm = vm();
    vm.gicd_write(ISENABLER + 8, 1 << 6);
    vm.gicd_write(ISENABLER + 8, 1 << 6);
    assert_eq!(
        vm.phys.take(),
        [PhysCall::Enable(100)],
        "once per transition"
    );
    vm.gicd_write(ICENABLER + 8, 1 << 6);
    vm.gicd_write(ICENABLER + 8, 1 << 6);
    assert_eq!(vm.phys.take(), [PhysCall::Disable(100)]);
    // Virtual SPIs never reach it.
    vm.gicd_write(ISENABLER + 4, 0xffff_ffff);
    vm.gicd_write(ICENABLER + 4, 0xffff_ffff);
    assert!(vm.phys.take().is_empty());
}

#[test]
fn mapped_spi_clear_pending_deactivates() {
    let vm = vm();
    vm.vgic.inject_phys_spi(100).unwrap();
    assert_eq!(vm.gicd_read(ISPENDR + 8), 1 << 6);
    // Software pend/active do not touch the physical one...
    vm.gicd_write(ISACTIVER + 8, 1 << 6);
    vm.gicd_write(ICPENDR + 8, 1 << 6);
    assert!(
        vm.phys.take().is_empty(),
        "still active: the guest owes a deactivation"
    );
    // ...until no virtual instance is left.
    vm.gicd_write(ICACTIVER + 8, 1 << 6);
    assert_eq!(vm.phys.take(), [PhysCall::Deactivate(100, 0)]);
    vm.gicd_write(ICACTIVER + 8, 1 << 6);
    assert!(vm.phys.take().is_empty());
}

#[test]
fn priorities() {
    let vm = vm();
    // Word write covering 40..44: only 40 and 41 exist; top 5 bits kept.
    vm.gicd_write(IPRIORITYR + 40, 0xffff_ffff);
    assert_eq!(vm.gicd_read(IPRIORITYR + 40), 0x0000_f8f8);
    vm.dist.write(0, IPRIORITYR + 41, 1, 0xa7).unwrap();
    assert_eq!(vm.dist.read(0, IPRIORITYR + 41, 1), Ok(0xa0));
    assert_eq!(vm.gicd_read(IPRIORITYR + 40), 0x0000_a0f8);
    assert_eq!(vm.dist.read(0, IPRIORITYR + 42, 1), Ok(0));
    // Private INTIDs are RAZ/WI here.
    vm.gicd_write(IPRIORITYR, 0xffff_ffff);
    vm.gicd_write(IPRIORITYR + 28, 0xffff_ffff);
    assert_eq!(vm.gicd_read(IPRIORITYR), 0);
    assert_eq!(vm.gicd_read(IPRIORITYR + 28), 0);
    assert_eq!(
        vm.sgi_read(0, 0x400),
        0,
        "vCPU 0's SGI priorities untouched"
    );
    // 16-bit accesses are not allowed.
    assert_eq!(
        vm.dist.read(0, IPRIORITYR + 40, 2),
        Err(MmioError::BadSize { size: 2 })
    );
}

#[test]
fn icfgr() {
    let vm = vm();
    // ICFGR2 covers 32..48: 40 level, 41 edge.
    assert_eq!(vm.gicd_read(ICFGR + 8), 2 << (2 * 9));
    vm.gicd_write(ICFGR + 8, 0xffff_ffff);
    assert_eq!(vm.gicd_read(ICFGR + 8), (2 << 16) | (2 << 18));
    vm.gicd_write(ICFGR + 8, 0);
    assert_eq!(vm.gicd_read(ICFGR + 8), 0);
    // The mapped SPI keeps the physical trigger (level).
    vm.gicd_write(ICFGR + 16, 0xffff_ffff);
    assert_eq!(vm.gicd_read(ICFGR + 16), 0);
    // SGIs/PPIs: RAZ/WI in the distributor.
    vm.gicd_write(ICFGR + 4, 0);
    assert_eq!(vm.gicd_read(ICFGR), 0);
    assert_eq!(vm.gicd_read(ICFGR + 4), 0);
    assert_eq!(vm.sgi_read(0, 0xc00), 0xaaaa_aaaa);
}

#[test]
fn irouter() {
    let vm = Vm::new(3, &[virt(40, true), hw(70, 100, true)]);
    let r40 = IROUTER + 8 * 40;
    let r70 = IROUTER + 8 * 70;
    assert_eq!(vm.dist.read(0, r40, 8), Ok(0));
    // IRM (bit 31) and Aff3 (39:32) are RES0.
    vm.dist.write(0, r40, 8, 0xff_8000_0002).unwrap();
    assert_eq!(vm.dist.read(0, r40, 8), Ok(2));
    assert_eq!(vm.dist.read(0, r40, 4), Ok(2));
    assert_eq!(vm.dist.read(0, r40 + 4, 4), Ok(0));
    // 32-bit halves.
    vm.dist.write(0, r40, 4, 1).unwrap();
    vm.dist.write(0, r40 + 4, 4, 0xff).unwrap();
    assert_eq!(vm.dist.read(0, r40, 8), Ok(1));
    // Aff1/Aff2 are stored, but name no vCPU.
    vm.dist.write(0, r40, 8, 0x01_0100).unwrap();
    assert_eq!(vm.dist.read(0, r40, 8), Ok(0x01_0100));

    // Mapped SPI: routing follows, to the vCPU (the arch layer maps it to its physical CPU).
    vm.dist.write(0, r70, 8, 2).unwrap();
    vm.dist.write(0, r70, 8, 2).unwrap();
    assert_eq!(vm.phys.take(), [PhysCall::Route(100, 2)]);
    // No such vCPU: routed nowhere; the physical routing stays.
    vm.dist.write(0, r70, 8, 7).unwrap();
    assert!(vm.phys.take().is_empty());
    vm.dist.write(0, r70, 8, 1).unwrap();
    assert_eq!(vm.phys.take(), [PhysCall::Route(100, 1)]);

    // Unowned SPIs and the reserved IROUTER<0..31>.
    vm.dist.write(0, IROUTER + 8 * 41, 8, 1).unwrap();
    assert_eq!(vm.dist.read(0, IROUTER + 8 * 41, 8), Ok(0));
    vm.dist.write(0, IROUTER + 8 * 5, 8, 1).unwrap();
    assert_eq!(vm.dist.read(0, IROUTER + 8 * 5, 8), Ok(0));
    assert!(vm.phys.take().is_empty());
    // Misaligned 64-bit access.
    assert_eq!(
        vm.dist.read(0, r40 + 4, 8),
        Err(MmioError::BadOffset { offset: r40 + 4 })
    );
}

#[test]
fn construction_routes_mapped_spis_to_vcpu0() {
    let phys = alloc::sync::Arc::new(crate::vgic::testutil::MockPhys::default());
    let kick = alloc::sync::Arc::new(crate::vgic::testutil::MockKick::default());
    let spis = [hw(33, 99, true), virt(34, true)];
    crate::vgic::Vgic::new(&VgicConfig::new(1, &spis), phys.clone(), kick).unwrap();
    assert_eq!(phys.take(), [PhysCall::Route(99, 0)]);
}

#[test]
fn bad_configs() {
    let phys = alloc::sync::Arc::new(crate::vgic::testutil::MockPhys::default());
    let kick = alloc::sync::Arc::new(crate::vgic::testutil::MockKick::default());
    let new = |vcpus: usize, spis: &[SpiConfig], hw_ppis: u32| {
        let mut cfg = VgicConfig::new(vcpus, spis);
        if hw_ppis != 0 {
            cfg.hw_ppis = hw_ppis;
        }
        crate::vgic::Vgic::new(&cfg, phys.clone(), kick.clone()).map(|_| ())
    };
    assert!(matches!(new(0, &[], 0), Err(VgicError::BadConfig(_))));
    assert!(matches!(new(257, &[], 0), Err(VgicError::BadConfig(_))));
    assert!(new(256, &[], 0).is_ok());
    for spis in [
        &[virt(31, true)][..],
        &[virt(1020, true)],
        &[virt(40, true), virt(40, false)],
        &[hw(40, 20, true)],
        &[hw(40, 100, true), hw(41, 100, true)],
    ] {
        assert!(
            matches!(new(1, spis, 0), Err(VgicError::BadConfig(_))),
            "{spis:?}"
        );
    }
    assert!(matches!(new(1, &[], 1 << 3), Err(VgicError::BadConfig(_))));
    assert!(phys.take().is_empty());
}

#[test]
fn access_sizes() {
    let vm = vm();
    assert_eq!(
        vm.dist.read(0, CTLR, 8),
        Err(MmioError::BadSize { size: 8 })
    );
    assert_eq!(
        vm.dist.write(0, ISENABLER + 4, 2, 0),
        Err(MmioError::BadSize { size: 2 })
    );
    assert_eq!(
        vm.dist.read(0, ISENABLER + 4, 1),
        Err(MmioError::BadSize { size: 1 })
    );
    assert_eq!(
        vm.dist.read(0, TYPER + 2, 4),
        Err(MmioError::BadOffset { offset: 6 })
    );
    // Reserved space above IROUTER takes 64-bit accesses.
    assert_eq!(vm.dist.read(0, 0x8000, 8), Ok(0));
    assert_eq!(vm.dist.write(0, 0xc000, 8, 1), Ok(()));
    assert_eq!(vm.dist.name(), "vgic-dist");
}
