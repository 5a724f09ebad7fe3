//! Interrupts on the target: each VM's virtual GIC (`crate::vgic`) wired to this CPU's list
//! registers and to the physical GIC, and the dispatch of physical interrupts taken at EL2.
//!
//! - A VM's SPIs: the INTx lines of its PCI functions (physical SPIs forwarded with the list
//!   register's HW bit: the guest's deactivation deactivates the physical one), the emulated
//!   SMMU's interrupts and its console's (virtual, raised by the hypervisor). Nothing else exists
//!   for it.
//! - The virtual timer's PPI is forwarded the same way to the vCPU of the CPU it fired on.
//! - A kick is the physical SGI [`gic::SGI_KICK`]: the target CPU leaves its guest (or its WFI),
//!   re-reads its list registers and refills them.

use alloc::sync::Arc;
use alloc::vec::Vec;

use log::warn;
use spin::Once;

use super::{CPUS, VMS, Vm, hyp_timer_intid, power};
use crate::arch::{gic, ich, platform, sysreg};
use crate::dt::Machine;
use crate::smmu::vsmmu::VsmmuIrq;
use crate::vgic::{
    ListRegs, MAINTENANCE_PPI, PhysIrqOps, SpiConfig, SpiKind, VTIMER_PPI, VcpuKick, Vgic,
    VgicConfig,
};

/// This CPU's list registers (each pCPU runs one vCPU, so they are never switched).
pub struct HwLrs(usize);

impl HwLrs {
    pub fn new() -> Self {
        Self(ich::num_lrs())
    }
}

impl ListRegs for HwLrs {
    fn num_lrs(&self) -> usize {
        self.0
    }
    fn read_lr(&self, n: usize) -> u64 {
        ich::read_lr(n)
    }
    fn write_lr(&mut self, n: usize, value: u64) {
        ich::write_lr(n, value)
    }
    fn write_hcr(&mut self, value: u64) {
        ich::write_hcr(value)
    }
    fn read_misr(&self) -> u64 {
        ich::misr()
    }
    fn read_elrsr(&self) -> u64 {
        ich::elrsr()
    }
}

/// The physical GIC as one VM's forwarded interrupts use it: vCPU `i` runs on the CPU with
/// affinity `mpidrs[i]`.
struct GicPhys {
    layout: gic::GicLayout,
    mpidrs: Vec<u64>,
}

impl PhysIrqOps for GicPhys {
    fn enable(&self, pintid: u32) {
        gic::spi_enable(&self.layout, pintid, true);
    }
    fn disable(&self, pintid: u32) {
        gic::spi_enable(&self.layout, pintid, false);
    }
    fn route(&self, pintid: u32, vcpu: usize) {
        gic::spi_route(&self.layout, pintid, self.mpidrs[vcpu]);
    }
    fn deactivate(&self, pintid: u32, vcpu: usize) {
        if pintid < 32 {
            gic::ppi_deactivate(&self.layout, self.mpidrs[vcpu], pintid);
        } else {
            gic::spi_deactivate(&self.layout, pintid);
        }
    }
}

/// Kicks a vCPU's CPU out of its guest or its WFI.
struct Kicker {
    mpidrs: Vec<u64>,
}

impl VcpuKick for Kicker {
    fn kick(&self, vcpu: usize) {
        let target = self.mpidrs[vcpu];
        // This CPU flushes before it re-enters its guest anyway.
        if target != sysreg::mpidr() {
            gic::send_sgi(gic::SGI_KICK, target);
        }
    }
}

/// The SPIs a VM owns, from its devices. `intx` are the physical INTx SPIs of its PCI functions.
pub fn vm_spis(machine: &Machine, intx: &[u32], vsmmu: bool, console: bool) -> Vec<SpiConfig> {
    let mut spis: Vec<SpiConfig> = Vec::new();
    for &p in intx {
        if !spis.iter().any(|s| s.vintid == p) {
            spis.push(SpiConfig {
                vintid: p,
                kind: SpiKind::Hw { pintid: p },
                edge: false,
            });
        }
    }
    let mut virt = |irq: &crate::dt::Irq| {
        let vintid = irq.intid();
        if vintid >= 32 && !spis.iter().any(|s| s.vintid == vintid) {
            spis.push(SpiConfig {
                vintid,
                kind: SpiKind::Virtual,
                edge: irq.trigger & 0xf == 1,
            });
        }
    };
    if vsmmu && let Some(s) = machine.smmus.first() {
        s.irqs.iter().for_each(&mut virt);
    }
    if console && let Some(irq) = machine.uart.as_ref().and_then(|u| u.irq) {
        virt(&irq);
    }
    spis
}

/// Builds a VM's vGIC for its vCPUs on `pcpus` (indices into the machine's CPUs) and configures
/// its forwarded SPIs in the physical distributor (disabled until the guest enables them).
pub fn build_vgic(
    machine: &Machine,
    pcpus: &[usize],
    spis: &[SpiConfig],
) -> Result<Arc<Vgic>, crate::vgic::VgicError> {
    let layout = super::gic_layout(machine);
    let mpidrs: Vec<u64> = pcpus.iter().map(|&p| machine.cpus[p].mpidr).collect();
    for s in spis {
        if let SpiKind::Hw { pintid } = s.kind {
            gic::spi_enable(&layout, pintid, false);
            gic::spi_configure(&layout, pintid, s.edge, 0xa0, mpidrs[0]);
        }
    }
    let phys = Arc::new(GicPhys {
        layout,
        mpidrs: mpidrs.clone(),
    });
    Vgic::new(
        &VgicConfig::new(pcpus.len(), spis),
        phys,
        Arc::new(Kicker { mpidrs }),
    )
}

/// The emulated SMMU's interrupts, as virtual SPIs (the host DT's order on QEMU: eventq, priq,
/// cmdq-sync, gerror).
pub struct VsmmuSpis {
    pub vgic: Arc<Vgic>,
    pub eventq: Option<u32>,
    pub cmd_sync: Option<u32>,
    pub gerror: Option<u32>,
}

impl VsmmuSpis {
    pub fn new(vgic: Arc<Vgic>, machine: &Machine) -> Self {
        let irq = |name: &str, i: usize| {
            machine
                .smmus
                .first()
                .and_then(|s| s.irq(name, i))
                .map(|q| q.intid())
        };
        Self {
            vgic,
            eventq: irq("eventq", 0),
            cmd_sync: irq("cmdq-sync", 2),
            gerror: irq("gerror", 3),
        }
    }

    fn raise(&self, intid: Option<u32>) {
        if let Some(i) = intid
            && let Err(e) = self.vgic.inject_spi(i)
        {
            warn!("vSMMU interrupt {i}: {e}");
        }
    }
}

impl VsmmuIrq for VsmmuSpis {
    fn eventq(&self) {
        self.raise(self.eventq);
    }
    fn gerror(&self) {
        self.raise(self.gerror);
    }
    fn cmd_sync(&self) {
        self.raise(self.cmd_sync);
    }
}

/// The physical SMMU's own interrupts (event queue, global error), taken by the hypervisor.
static SMMU_IRQS: Once<(Option<u32>, Option<u32>)> = Once::new();

/// Takes the physical SMMU's event-queue and global-error interrupts on this CPU: events are
/// then routed to the VMs' emulated SMMUs (and their interrupts raised) as they happen, not
/// only when a guest polls its event queue.
pub fn init_smmu_irqs(machine: &Machine) {
    let Some(s) = machine.smmus.first() else {
        return;
    };
    let layout = super::gic_layout(machine);
    let take = |irq: Option<crate::dt::Irq>| {
        let irq = irq.filter(|q| q.intid() >= 32)?;
        Some(take_spi(&layout, irq, 0x80))
    };
    let eventq = take(s.irq("eventq", 0));
    let gerror = take(s.irq("gerror", 3));
    SMMU_IRQS.call_once(|| (eventq, gerror));
}

/// Configures SPI `irq` as one of the hypervisor's own, at `priority`, routed to this CPU, and
/// enables it. Returns its INTID.
fn take_spi(layout: &gic::GicLayout, irq: crate::dt::Irq, priority: u8) -> u32 {
    let intid = irq.intid();
    gic::spi_enable(layout, intid, false);
    gic::spi_configure(
        layout,
        intid,
        irq.trigger & 0xf == 1,
        priority,
        sysreg::mpidr(),
    );
    gic::spi_enable(layout, intid, true);
    intid
}

/// The console UART's receive interrupt, taken by the hypervisor, and the VM its input goes to.
static CONSOLE_INPUT: Once<(u32, usize)> = Once::new();

/// Console input: the host UART's receive interrupt goes to this CPU, and what is typed goes to
/// the emulated PL011 of the first VM with a console (whose output switches to raw, unprefixed
/// characters once input arrives, so that a shell's prompt and echo show as typed).
pub fn init_console_input(machine: &Machine, vms: &[Vm]) {
    let Some(uart) = super::EARLY_UART.get() else {
        return;
    };
    let Some(irq) = machine
        .uart
        .as_ref()
        .filter(|u| u.base == super::board().early_console.unwrap_or(u64::MAX))
        .and_then(|u| u.irq)
        .filter(|q| q.intid() >= 32)
    else {
        return;
    };
    let Some(focus) = vms.iter().position(|vm| vm.console.is_some()) else {
        return;
    };
    CONSOLE_INPUT.call_once(|| (irq.intid(), focus));
    uart.enable_rx_interrupt();
    take_spi(&super::gic_layout(machine), irq, 0x90);
}

/// Moves what the host UART received into the focus VM's console.
fn console_input() {
    let (Some(uart), Some(&(_, focus))) = (super::EARLY_UART.get(), CONSOLE_INPUT.get()) else {
        return;
    };
    // Clear first: QEMU's PL011 interrupts only when its FIFO goes from empty to non-empty.
    uart.clear_rx_interrupt();
    let mut buf = [0u8; 64];
    loop {
        let mut n = 0;
        while n < buf.len() {
            match uart.read_byte() {
                Some(b) => {
                    buf[n] = b;
                    n += 1;
                }
                None => break,
            }
        }
        if n == 0 {
            return;
        }
        if let Some(dev) = VMS.get().and_then(|v| v[focus].console.as_ref()) {
            dev.set_raw(true);
            dev.push_rx(&buf[..n]);
        }
        if n < buf.len() {
            return;
        }
    }
}

/// A VM console's interrupt output, as a level on its virtual SPI.
pub struct ConsoleIrq {
    pub vgic: Arc<Vgic>,
    pub intid: u32,
}

impl crate::vdev::IrqLine for ConsoleIrq {
    fn set_level(&self, level: bool) {
        if let Err(e) = self.vgic.set_level(self.intid, level) {
            warn!("console interrupt {}: {e}", self.intid);
        }
    }
}

/// Which VM each forwarded physical SPI belongs to (built once every VM exists).
static SPI_OWNERS: Once<Vec<(u32, usize)>> = Once::new();

/// Records the forwarded SPIs of every VM; fatal if two VMs share one.
pub fn record_owners(vms: &[Vm]) -> Result<(), (u32, usize, usize)> {
    let mut owners: Vec<(u32, usize)> = Vec::new();
    for (i, vm) in vms.iter().enumerate() {
        for &p in &vm.forwarded_spis {
            if let Some(&(_, other)) = owners.iter().find(|(q, _)| *q == p) {
                return Err((p, other, i));
            }
            owners.push((p, i));
        }
    }
    SPI_OWNERS.call_once(|| owners);
    Ok(())
}

/// This CPU's entry.
fn this_cpu() -> Option<&'static super::PerCpu> {
    let me = sysreg::mpidr();
    CPUS.get()?.iter().find(|c| c.mpidr == me)
}

/// The VM and vCPU this CPU runs, if any.
fn current_vcpu() -> Option<(&'static Vm, usize)> {
    let (vm, v) = this_cpu()?.owner?;
    Some((&VMS.get()?[vm], v))
}

/// Right after a list-register flush on `cpu` (this CPU): deactivates the maintenance interrupt
/// taken since the last one. Its cause (ICH_MISR) lasts until the flush rewrites the list
/// registers and ICH_HCR_EL2, and the PPI is level-sensitive: deactivated any earlier, it would be
/// taken again at once, forever, and starve every lower-priority interrupt of this CPU (the
/// hypervisor's SMMU events among them). One relaxed load per guest entry when nothing is due.
pub fn maintenance_done(cpu: &super::PerCpu) {
    if cpu
        .maintenance_active
        .load(core::sync::atomic::Ordering::Relaxed)
        && cpu
            .maintenance_active
            .swap(false, core::sync::atomic::Ordering::Relaxed)
    {
        gic::deactivate(MAINTENANCE_PPI);
    }
}

/// Handles the physical interrupts pending on this CPU (taken from a guest or at EL2).
pub fn handle_irq() {
    loop {
        let intid = gic::ack();
        if intid >= gic::SPURIOUS {
            return;
        }
        match intid {
            gic::SGI_KICK => gic::eoi(intid),
            // Priority drop only; deactivated after the next flush (`maintenance_done`).
            MAINTENANCE_PPI => {
                gic::eoi_forwarded(intid);
                match this_cpu() {
                    Some(cpu) => cpu
                        .maintenance_active
                        .store(true, core::sync::atomic::Ordering::Relaxed),
                    None => gic::deactivate(intid),
                }
            }
            _ if Some(intid) == super::MACHINE.get().map(hyp_timer_intid) => {
                platform::hyp_timer_stop();
                gic::eoi(intid);
                super::TIMER_FIRED.store(true, core::sync::atomic::Ordering::Release);
                power::timer_tick();
            }
            _ if CONSOLE_INPUT.get().is_some_and(|&(i, _)| i == intid) => {
                gic::eoi(intid);
                console_input();
            }
            _ if SMMU_IRQS.get().is_some_and(|&(e, _)| e == Some(intid)) => {
                gic::eoi(intid);
                super::route_smmu_events();
            }
            _ if SMMU_IRQS.get().is_some_and(|&(_, g)| g == Some(intid)) => {
                gic::eoi(intid);
                super::smmu_gerror();
            }
            VTIMER_PPI => {
                gic::eoi_forwarded(intid);
                let delivered = current_vcpu()
                    .map(|(vm, v)| vm.vgic.inject_phys_ppi(v, intid).is_ok())
                    .unwrap_or(false);
                if !delivered {
                    gic::deactivate(intid);
                }
            }
            32..=1019 => {
                gic::eoi_forwarded(intid);
                let owner = SPI_OWNERS
                    .get()
                    .and_then(|o| o.iter().find(|(p, _)| *p == intid))
                    .and_then(|&(_, vm)| VMS.get().map(|v| &v[vm]));
                match owner.map(|vm| vm.vgic.inject_phys_spi(intid)) {
                    Some(Ok(())) => {}
                    other => {
                        warn!("SPI {intid} has no VM to take it ({other:?})");
                        gic::deactivate(intid);
                    }
                }
            }
            other => {
                warn!("unexpected interrupt {other}");
                gic::eoi(other);
            }
        }
    }
}

/// A guest WFI: sleeps until vCPU `v` has an interrupt to take (or its VM stops). Interrupts
/// stay masked across the check and the WFI, which still wakes on a pending one, so a kick
/// between the two is never lost; they are unmasked only to take what woke us.
pub fn wait_for_interrupt(vm: &Vm, v: usize) {
    while vm.state.stopped().is_none() && !vm.vgic.has_pending(v) {
        platform::wfi();
        platform::irq_enable();
        sysreg::isb();
        platform::irq_disable();
    }
}

/// Sets up this CPU's virtual CPU interface for a vCPU that (re)starts.
pub fn reset_vcpu_interface() {
    ich::reset(ich::num_lrs());
}
