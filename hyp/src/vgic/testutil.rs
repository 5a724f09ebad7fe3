//! Test doubles: a recording physical GIC, a recording kick, and a model of one CPU's virtual
//! CPU interface with a minimal guest (acknowledge, EOI) on top.

extern crate std;

use alloc::sync::Arc;
use alloc::vec::Vec;
use std::sync::Mutex;

use crate::trap::MmioDevice;

use super::lr::{ICH_HCR_NPIE, ICH_HCR_UIE, ICH_MISR_EOI, ICH_MISR_NP, ICH_MISR_U};
use super::{
    Distributor, ListRegs, Lr, LrState, PhysIrqOps, Redistributors, SpiConfig, SpiKind, VcpuKick,
    Vgic, VgicConfig,
};

/// A call the vGIC made on the physical side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhysCall {
    Enable(u32),
    Disable(u32),
    Route(u32, usize),
    Deactivate(u32, usize),
}

#[derive(Default)]
pub struct MockPhys {
    pub calls: Mutex<Vec<PhysCall>>,
}

impl MockPhys {
    /// The calls so far, clearing the log.
    pub fn take(&self) -> Vec<PhysCall> {
        core::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl PhysIrqOps for MockPhys {
    fn enable(&self, pintid: u32) {
        self.calls.lock().unwrap().push(PhysCall::Enable(pintid));
    }
    fn disable(&self, pintid: u32) {
        self.calls.lock().unwrap().push(PhysCall::Disable(pintid));
    }
    fn route(&self, pintid: u32, vcpu: usize) {
        self.calls
            .lock()
            .unwrap()
            .push(PhysCall::Route(pintid, vcpu));
    }
    fn deactivate(&self, pintid: u32, vcpu: usize) {
        self.calls
            .lock()
            .unwrap()
            .push(PhysCall::Deactivate(pintid, vcpu));
    }
}

#[derive(Default)]
pub struct MockKick {
    pub kicks: Mutex<Vec<usize>>,
}

impl MockKick {
    pub fn take(&self) -> Vec<usize> {
        core::mem::take(&mut *self.kicks.lock().unwrap())
    }
}

impl VcpuKick for MockKick {
    fn kick(&self, vcpu: usize) {
        self.kicks.lock().unwrap().push(vcpu);
    }
}

/// A VM's vGIC with its mocks and MMIO frames.
pub struct Vm {
    pub vgic: Arc<Vgic>,
    pub phys: Arc<MockPhys>,
    pub kick: Arc<MockKick>,
    pub dist: Distributor,
    pub redist: Redistributors,
}

pub const fn virt(vintid: u32, edge: bool) -> SpiConfig {
    SpiConfig {
        vintid,
        kind: SpiKind::Virtual,
        edge,
    }
}

pub const fn hw(vintid: u32, pintid: u32, edge: bool) -> SpiConfig {
    SpiConfig {
        vintid,
        kind: SpiKind::Hw { pintid },
        edge,
    }
}

impl Vm {
    pub fn new(nvcpus: usize, spis: &[SpiConfig]) -> Self {
        let phys = Arc::new(MockPhys::default());
        let kick = Arc::new(MockKick::default());
        let vgic = Vgic::new(&VgicConfig::new(nvcpus, spis), phys.clone(), kick.clone())
            .expect("valid config");
        phys.take();
        Vm {
            dist: Distributor::new(vgic.clone()),
            redist: Redistributors::new(vgic.clone()),
            vgic,
            phys,
            kick,
        }
    }

    pub fn gicd_read(&self, off: u64) -> u32 {
        self.dist.read(0, off, 4).unwrap() as u32
    }

    pub fn gicd_write(&self, off: u64, value: u32) {
        self.dist.write(0, off, 4, u64::from(value)).unwrap();
    }

    /// Reads a register of `vcpu`'s SGI_base frame.
    pub fn sgi_read(&self, vcpu: usize, off: u64) -> u32 {
        self.redist
            .read(0, vcpu as u64 * 0x2_0000 + 0x1_0000 + off, 4)
            .unwrap() as u32
    }

    pub fn sgi_write(&self, vcpu: usize, off: u64, value: u32) {
        self.redist
            .write(
                0,
                vcpu as u64 * 0x2_0000 + 0x1_0000 + off,
                4,
                u64::from(value),
            )
            .unwrap();
    }

    /// Enables Group 1 in GICD_CTLR.
    pub fn enable_grp1(&self) {
        self.gicd_write(0, 2);
    }

    /// Enables SPI `intid` with priority `prio`, routed to `vcpu`.
    pub fn setup_spi(&self, intid: u32, prio: u8, vcpu: usize) {
        self.set_irouter(intid, vcpu as u64);
        self.dist
            .write(0, 0x400 + u64::from(intid), 1, u64::from(prio))
            .unwrap();
        self.gicd_write(0x100 + u64::from(intid / 32) * 4, 1 << (intid % 32));
    }

    /// Writes GICD_IROUTER<intid> (64-bit).
    pub fn set_irouter(&self, intid: u32, aff: u64) {
        self.dist
            .write(0, 0x6000 + 8 * u64::from(intid), 8, aff)
            .unwrap();
    }

    /// Writes the priority byte of private interrupt `intid` of `vcpu`.
    pub fn set_private_prio(&self, vcpu: usize, intid: u32, prio: u8) {
        self.redist
            .write(
                0,
                vcpu as u64 * 0x2_0000 + 0x1_0400 + u64::from(intid),
                1,
                u64::from(prio),
            )
            .unwrap();
    }

    /// Enables private interrupt `intid` of `vcpu` with priority `prio`.
    pub fn setup_private(&self, vcpu: usize, intid: u32, prio: u8) {
        self.set_private_prio(vcpu, intid, prio);
        self.sgi_write(vcpu, 0x100, 1 << intid);
    }
}

/// One physical CPU's virtual CPU interface (list registers, ICH_HCR_EL2) and a guest on it
/// that acknowledges and deactivates like the architecture says (EOImode = 0, no priority
/// grouping, PMR fully open).
pub struct GuestCpu {
    pub lrs: [u64; 16],
    pub nr: usize,
    pub hcr: u64,
    pub lr_writes: usize,
    /// Physical INTIDs deactivated through HW = 1 list registers.
    pub hw_deactivated: Vec<u32>,
}

impl GuestCpu {
    pub fn new(nr: usize) -> Self {
        GuestCpu {
            lrs: [0; 16],
            nr,
            hcr: 0,
            lr_writes: 0,
            hw_deactivated: Vec::new(),
        }
    }

    fn lr(&self, n: usize) -> Lr {
        Lr::decode(self.lrs[n])
    }

    fn set_state(&mut self, n: usize, state: LrState) {
        let mut lr = self.lr(n);
        lr.state = state;
        self.lrs[n] = lr.encode();
    }

    /// The valid list registers, decoded.
    pub fn valid(&self) -> Vec<Lr> {
        (0..self.nr)
            .map(|n| self.lr(n))
            .filter(|l| l.state != LrState::Invalid)
            .collect()
    }

    /// Running priority: the highest (lowest value) among active list registers.
    fn running(&self) -> u16 {
        self.valid()
            .iter()
            .filter(|l| l.state.active())
            .map(|l| u16::from(l.priority))
            .min()
            .unwrap_or(0x100)
    }

    /// ICV_IAR1_EL1: the highest-priority pending (not active) list register with a priority
    /// above the running priority becomes active. Returns its vINTID.
    pub fn ack(&mut self) -> Option<u32> {
        let running = self.running();
        let n = (0..self.nr)
            .filter(|&n| {
                let l = self.lr(n);
                l.state == LrState::Pending && u16::from(l.priority) < running
            })
            .min_by_key(|&n| (self.lr(n).priority, n))?;
        self.set_state(n, LrState::Active);
        Some(self.lr(n).vintid)
    }

    /// ICV_EOIR1_EL1 (EOImode 0): deactivates the active list register holding `vintid`.
    pub fn eoi(&mut self, vintid: u32) {
        let n = (0..self.nr)
            .find(|&n| self.lr(n).vintid == vintid && self.lr(n).state.active())
            .expect("EOI of an interrupt that is not active in a list register");
        let lr = self.lr(n);
        let next = if lr.state == LrState::PendingActive {
            LrState::Pending
        } else {
            LrState::Invalid
        };
        if let Some(p) = lr.pintid {
            self.hw_deactivated.push(p);
        }
        self.set_state(n, next);
    }

    /// Acknowledges and deactivates everything it can; returns the INTIDs in order taken.
    pub fn drain(&mut self) -> Vec<u32> {
        let mut got = Vec::new();
        while let Some(i) = self.ack() {
            got.push(i);
            self.eoi(i);
        }
        got
    }

    /// ICH_MISR_EL2 as the hardware computes it (the bits this model knows).
    pub fn misr(&self) -> u64 {
        let lrs: Vec<Lr> = (0..self.nr).map(|n| self.lr(n)).collect();
        let mut misr = 0;
        if lrs
            .iter()
            .any(|l| l.state == LrState::Invalid && l.eoi && l.pintid.is_none())
        {
            misr |= ICH_MISR_EOI;
        }
        let valid = lrs.iter().filter(|l| l.state != LrState::Invalid).count();
        if self.hcr & ICH_HCR_UIE != 0 && valid <= 1 {
            misr |= ICH_MISR_U;
        }
        if self.hcr & ICH_HCR_NPIE != 0 && !lrs.iter().any(|l| l.state == LrState::Pending) {
            misr |= ICH_MISR_NP;
        }
        misr
    }
}

impl ListRegs for GuestCpu {
    fn num_lrs(&self) -> usize {
        self.nr
    }
    fn read_lr(&self, n: usize) -> u64 {
        assert!(n < self.nr, "LR {n} not implemented");
        self.lrs[n]
    }
    fn write_lr(&mut self, n: usize, value: u64) {
        assert!(n < self.nr, "LR {n} not implemented");
        self.lr_writes += 1;
        self.lrs[n] = value;
    }
    fn write_hcr(&mut self, value: u64) {
        self.hcr = value;
    }
    fn read_misr(&self) -> u64 {
        self.misr()
    }
    fn read_elrsr(&self) -> u64 {
        (0..self.nr)
            .filter(|&n| {
                let l = self.lr(n);
                l.state == LrState::Invalid && (l.pintid.is_some() || !l.eoi)
            })
            .fold(0, |acc, n| acc | (1 << n))
    }
}
