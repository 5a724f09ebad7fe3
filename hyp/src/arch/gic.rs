//! The physical GICv3, as far as the hypervisor's own interrupts need it: the distributor switched
//! on with affinity routing, each CPU's redistributor woken up, SGIs (CPU kicks) and the EL2 timer
//! PPI enabled, and the system-register CPU interface used for acknowledge, EOI and sending SGIs.
//! For the vGIC it also drives the SPIs passed through to VMs (enable, route, trigger mode,
//! priority) and runs the CPU interface with EOImode = 1: the hypervisor's EOI only drops the
//! running priority, so an interrupt forwarded to a guest with the list register's HW bit stays
//! active until the guest deactivates the virtual one; the hypervisor's own interrupts are
//! deactivated explicitly ([`eoi`] does both).

use tock_registers::interfaces::{Readable, Writeable};
use tock_registers::register_bitfields;
use tock_registers::register_structs;
use tock_registers::registers::{ReadOnly, ReadWrite};

use super::sysreg::{isb, read_sysreg, write_sysreg};

register_bitfields![u32,
    GICD_CTLR [
        EnableGrp0 OFFSET(0) NUMBITS(1) [],
        EnableGrp1 OFFSET(1) NUMBITS(1) [],
        ARE OFFSET(4) NUMBITS(1) [],
        DS OFFSET(6) NUMBITS(1) [],
        RWP OFFSET(31) NUMBITS(1) []
    ],
    GICR_WAKER [
        ProcessorSleep OFFSET(1) NUMBITS(1) [],
        ChildrenAsleep OFFSET(2) NUMBITS(1) []
    ]
];

register_bitfields![u64,
    GICR_TYPER [
        VLPIS OFFSET(1) NUMBITS(1) [],
        Last OFFSET(4) NUMBITS(1) [],
        ProcessorNumber OFFSET(8) NUMBITS(16) [],
        AffinityValue OFFSET(32) NUMBITS(32) []
    ]
];

register_structs! {
    /// Distributor (GICD), the registers we use.
    pub GicdRegs {
        (0x0000 => ctlr: ReadWrite<u32, GICD_CTLR::Register>),
        (0x0004 => typer: ReadOnly<u32>),
        (0x0008 => _reserved0),
        (0x0080 => igroupr: [ReadWrite<u32>; 32]),
        (0x0100 => isenabler: [ReadWrite<u32>; 32]),
        (0x0180 => icenabler: [ReadWrite<u32>; 32]),
        (0x0200 => ispendr: [ReadWrite<u32>; 32]),
        (0x0280 => icpendr: [ReadWrite<u32>; 32]),
        (0x0300 => isactiver: [ReadWrite<u32>; 32]),
        (0x0380 => icactiver: [ReadWrite<u32>; 32]),
        (0x0400 => ipriorityr: [ReadWrite<u32>; 256]),
        (0x0800 => _reserved1),
        (0x0c00 => icfgr: [ReadWrite<u32>; 64]),
        (0x0d00 => igrpmodr: [ReadWrite<u32>; 32]),
        (0x0d80 => _reserved2),
        (0x6000 => irouter: [ReadWrite<u64>; 1020]),
        (0x7fe0 => @END),
    },

    /// Redistributor control frame (RD_base).
    pub GicrRdRegs {
        (0x0000 => ctlr: ReadWrite<u32>),
        (0x0004 => iidr: ReadOnly<u32>),
        (0x0008 => typer: ReadOnly<u64, GICR_TYPER::Register>),
        (0x0010 => statusr: ReadWrite<u32>),
        (0x0014 => waker: ReadWrite<u32, GICR_WAKER::Register>),
        (0x0018 => @END),
    },

    /// Redistributor SGI/PPI frame (SGI_base = RD_base + 64 KiB).
    pub GicrSgiRegs {
        (0x0000 => _reserved0),
        (0x0080 => igroupr0: ReadWrite<u32>),
        (0x0084 => _reserved1),
        (0x0100 => isenabler0: ReadWrite<u32>),
        (0x0104 => _reserved2),
        (0x0180 => icenabler0: ReadWrite<u32>),
        (0x0184 => _reserved3),
        (0x0380 => icactiver0: ReadWrite<u32>),
        (0x0384 => _reserved5),
        (0x0400 => ipriorityr: [ReadWrite<u32>; 8]),
        (0x0420 => _reserved4),
        (0x0d00 => igrpmodr0: ReadWrite<u32>),
        (0x0d04 => @END),
    }
}

const FRAME: u64 = 0x1_0000;
/// Interrupt ID of the SGI used to kick a CPU out of its guest.
pub const SGI_KICK: u32 = 1;
/// Spurious interrupt ID.
pub const SPURIOUS: u32 = 1023;

/// Where the GIC lives.
#[derive(Clone, Copy, Debug)]
pub struct GicLayout {
    pub gicd: u64,
    pub gicr: u64,
    pub gicr_size: u64,
}

fn gicd(l: &GicLayout) -> &'static GicdRegs {
    // SAFETY: the GICD base comes from the DT and is mapped as device memory for the whole run.
    unsafe { &*(l.gicd as *const GicdRegs) }
}

fn wait_until(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = super::sysreg::counter() + super::sysreg::counter_freq();
    while !done() {
        if super::sysreg::counter() > deadline {
            panic!("GIC: timed out waiting for {what}");
        }
    }
}

/// Enables the distributor with affinity routing and group 1.
pub fn init_distributor(l: &GicLayout) {
    let d = gicd(l);
    d.ctlr
        .write(GICD_CTLR::ARE::SET + GICD_CTLR::EnableGrp1::SET);
    wait_until(|| !d.ctlr.is_set(GICD_CTLR::RWP), "GICD_CTLR.RWP");
}

/// The RD_base of the redistributor of the CPU with affinity `mpidr`.
fn redistributor(l: &GicLayout, mpidr: u64) -> u64 {
    let aff = ((mpidr >> 8) & 0xff00_0000) | (mpidr & 0xff_ffff);
    let mut base = l.gicr;
    loop {
        if base >= l.gicr + l.gicr_size {
            panic!("GIC: no redistributor for MPIDR {mpidr:#x}");
        }
        // SAFETY: inside the GICR region from the DT, mapped as device memory.
        let rd = unsafe { &*(base as *const GicrRdRegs) };
        let typer = rd.typer.extract();
        if typer.read(GICR_TYPER::AffinityValue) == aff {
            return base;
        }
        if typer.is_set(GICR_TYPER::Last) {
            panic!("GIC: no redistributor for MPIDR {mpidr:#x}");
        }
        base += if typer.is_set(GICR_TYPER::VLPIS) {
            4 * FRAME
        } else {
            2 * FRAME
        };
    }
}

/// Deactivates private interrupt `intid` (a PPI forwarded to a guest) in the redistributor of
/// the CPU with affinity `mpidr`.
pub fn ppi_deactivate(l: &GicLayout, mpidr: u64, intid: u32) {
    debug_assert!(intid < 32);
    let base = redistributor(l, mpidr);
    // SAFETY: the SGI frame follows the RD frame of the same redistributor.
    let sgi = unsafe { &*((base + FRAME) as *const GicrSgiRegs) };
    sgi.icactiver0.set(1 << intid);
}

/// Finds this CPU's redistributor (by affinity) and wakes it up; enables `ppis_and_sgis`.
pub fn init_cpu(l: &GicLayout, mpidr: u64, ppis_and_sgis: u32) {
    let base = redistributor(l, mpidr);
    // SAFETY: inside the GICR region from the DT, mapped as device memory.
    let rd = unsafe { &*(base as *const GicrRdRegs) };
    rd.waker
        .modify_no_read(rd.waker.extract(), GICR_WAKER::ProcessorSleep::CLEAR);
    wait_until(
        || !rd.waker.is_set(GICR_WAKER::ChildrenAsleep),
        "GICR_WAKER.ChildrenAsleep",
    );

    // SAFETY: the SGI frame follows the RD frame of the same redistributor.
    let sgi = unsafe { &*((base + FRAME) as *const GicrSgiRegs) };
    sgi.icenabler0.set(!ppis_and_sgis);
    sgi.igroupr0.set(u32::MAX);
    sgi.igrpmodr0.set(0);
    for p in sgi.ipriorityr.iter() {
        p.set(0x8080_8080);
    }
    sgi.isenabler0.set(ppis_and_sgis);

    // CPU interface: system registers on, all priorities unmasked, group 1 enabled.
    // SAFETY: enabling the GIC CPU interface at EL2; interrupts stay masked in PSTATE until the
    // caller unmasks them.
    unsafe {
        write_sysreg!("icc_sre_el2", read_sysreg!("icc_sre_el2") | 0b1001);
        isb();
        write_sysreg!("icc_pmr_el1", 0xff);
        write_sysreg!("icc_bpr1_el1", 0);
        // EOImode = 1: EOIR drops priority only; DIR deactivates (see the module docs).
        write_sysreg!("icc_ctlr_el1", 1 << 1);
        write_sysreg!("icc_igrpen1_el1", 1);
    }
    isb();
}

/// Acknowledges the highest-priority pending interrupt; [`SPURIOUS`] if none.
pub fn ack() -> u32 {
    (read_sysreg!("icc_iar1_el1") & 0xff_ffff) as u32
}

/// Ends (and deactivates) an acknowledged interrupt of the hypervisor's own.
pub fn eoi(intid: u32) {
    // SAFETY: EOI and deactivation of an interrupt this CPU acknowledged.
    unsafe {
        write_sysreg!("icc_eoir1_el1", intid as u64);
        isb();
        write_sysreg!("icc_dir_el1", intid as u64);
    }
    isb();
}

/// Drops the running priority of an acknowledged interrupt that was forwarded to a guest with
/// the list register's HW bit: it stays active until the guest deactivates the virtual one.
pub fn eoi_forwarded(intid: u32) {
    // SAFETY: priority drop of an interrupt this CPU acknowledged.
    unsafe { write_sysreg!("icc_eoir1_el1", intid as u64) };
    isb();
}

/// Deactivates a forwarded interrupt the guest will never deactivate itself (its VM stopped, or
/// the list register holding it was dropped).
pub fn deactivate(intid: u32) {
    // SAFETY: deactivating an interrupt this hypervisor forwarded.
    unsafe { write_sysreg!("icc_dir_el1", intid as u64) };
    isb();
}

/// An SPI's register index and bit.
fn spi_bit(intid: u32) -> (usize, u32) {
    debug_assert!((32..1020).contains(&intid), "not an SPI: {intid}");
    ((intid / 32) as usize, 1 << (intid % 32))
}

/// Enables or disables SPI `intid` at the distributor.
pub fn spi_enable(l: &GicLayout, intid: u32, on: bool) {
    let d = gicd(l);
    let (i, bit) = spi_bit(intid);
    if on {
        d.isenabler[i].set(bit);
    } else {
        d.icenabler[i].set(bit);
        wait_until(|| !d.ctlr.is_set(GICD_CTLR::RWP), "GICD_CTLR.RWP");
    }
}

/// Configures SPI `intid` as a non-secure group-1 interrupt, edge- or level-triggered, at
/// `priority`, routed to the CPU with affinity `mpidr` (disable it first when it is live).
pub fn spi_configure(l: &GicLayout, intid: u32, edge: bool, priority: u8, mpidr: u64) {
    let d = gicd(l);
    let (i, bit) = spi_bit(intid);
    d.igroupr[i].set(d.igroupr[i].get() | bit);
    d.igrpmodr[i].set(d.igrpmodr[i].get() & !bit);
    let cfg = &d.icfgr[(intid / 16) as usize];
    let shift = (intid % 16) * 2 + 1;
    cfg.set((cfg.get() & !(1 << shift)) | (u32::from(edge) << shift));
    let pri = &d.ipriorityr[(intid / 4) as usize];
    let shift = (intid % 4) * 8;
    pri.set((pri.get() & !(0xff << shift)) | (u32::from(priority) << shift));
    spi_route(l, intid, mpidr);
}

/// Routes SPI `intid` to the CPU with affinity `mpidr`.
pub fn spi_route(l: &GicLayout, intid: u32, mpidr: u64) {
    let aff = (mpidr & 0xff_ffff) | ((mpidr >> 32 & 0xff) << 32);
    gicd(l).irouter[intid as usize].set(aff);
}

/// Deactivates SPI `intid` in the distributor (a forwarded SPI the guest will not deactivate).
pub fn spi_deactivate(l: &GicLayout, intid: u32) {
    let (i, bit) = spi_bit(intid);
    gicd(l).icactiver[i].set(bit);
}

/// Sends SGI `intid` to the CPU with affinity `mpidr`.
pub fn send_sgi(intid: u32, mpidr: u64) {
    let aff0 = mpidr & 0xff;
    let aff1 = (mpidr >> 8) & 0xff;
    let aff2 = (mpidr >> 16) & 0xff;
    let aff3 = (mpidr >> 32) & 0xff;
    // Target list covers Aff0 0..15 (the RS field selects higher ranges of 16).
    let rs = aff0 / 16;
    let value = (aff3 << 48)
        | (aff2 << 32)
        | ((intid as u64 & 0xf) << 24)
        | (rs << 44)
        | (aff1 << 16)
        | (1 << (aff0 % 16));
    // SAFETY: generating an SGI only raises an interrupt on the target CPU.
    unsafe {
        super::sysreg::dsb_ish();
        write_sysreg!("icc_sgi1r_el1", value);
    }
    isb();
}
