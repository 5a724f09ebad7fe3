//! Boot flow and the vCPU run loop: from the primary CPU's first Rust instruction to the end of the
//! run. This is the glue between the portable pieces (device tree, layout, traps, devices) and the
//! architecture layer.
//!
//! Boot: console and logger from the board's early UART, the device tree, the memory plan, the
//! heap and frame pool, the final EL2 page tables, the GIC and the EL2 timer, the VMs (stage 2,
//! guest DTB, payload), then every other CPU through PSCI CPU_ON. Each pCPU that a VM owns runs one
//! vCPU of it until the VM stops; the others park. When the last VM stops, the run ends with a
//! status that says how (see [`crate::run`]).

use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use buddy_system_allocator::LockedHeap;
use log::{error, info, warn};
use spin::Once;

use crate::arch::exceptions::{ExitReason, GuestRegs, enter_guest};
use crate::arch::tlb::{self as cpu_tlb, ArchWalkerSync, CpuTlb};
use crate::arch::{boot, gic, mmu, platform, sysreg, vcpu as hw};
use crate::config::{BoardConfig, ExitMethod, VmConfig};
use crate::console::{self, Pl011};
use crate::dt::{self, GuestSpec, Machine};
use crate::mm::frames::FramePool;
use crate::mm::layout::{self, Range};
use crate::mm::pgtable::{Attrs, PageTable, Regime};
use crate::mm::stage2::backend::smmuv3::SmmuV3Tlb;
use crate::mm::stage2::{PagePool, SplitPolicy, Stage2, Stage2Config, Stage2Table};
use crate::power::activity::ActivitySink;
use crate::power::tlb_gate::PoweredTlb;
use crate::run::{self, RunTracker, StopReason, VmRunState};
use crate::smmu;
use crate::smmu::v3::cmdq::{CmdQueue, CmdqOptions};
use crate::smmu::v3::driver::{HeapDma, MmioAt, SmmuV3};
use crate::smmu::v3::ste::{S2Config, Ste};
use crate::smmu::vsmmu::{PhysError, PhysSmmu, VSMMU_MMIO_SIZE, VSmmu};
use crate::trap::hyptest::{self, HypTestCall};
use crate::trap::{self, AbortKind, GuestExcState, MmioBus, PsciOutcome, Trap, VPsci};
use crate::vdev::pci_ecam::{BarAllocator, ConfigSpace, EcamWindow, VirtEcam};
use crate::vdev::{ConsoleSink, POWER_CTRL_MMIO_SIZE, PowerDomain, VirtPl011, VirtPowerCtrl};
use crate::vgic::{Distributor, GICD_SIZE, MAINTENANCE_PPI, Redistributors, VTIMER_PPI, Vgic};

mod devices;
mod irq;
mod power;

mod board {
    include!(concat!(env!("OUT_DIR"), "/board_config.rs"));
}

/// The board this image was built for.
pub fn board() -> &'static BoardConfig {
    &board::BOARD
}

#[global_allocator]
static HEAP: LockedHeap<32> = LockedHeap::empty();

/// Heap for the first allocations (DT parsing), before the pool is known.
const BOOT_HEAP_SIZE: usize = 256 * 1024;
#[repr(C, align(4096))]
struct BootHeap([u8; BOOT_HEAP_SIZE]);
static mut BOOT_HEAP: BootHeap = BootHeap([0; BOOT_HEAP_SIZE]);

/// Bytes of the pool given to the heap; the rest holds page-table frames.
const HEAP_SHARE: u64 = 8 << 20;
const STACK_SIZE: usize = 64 * 1024;
/// Largest guest IPA space we build (4 KiB granule without 52-bit extensions).
const MAX_IPA_BITS: u32 = 48;
/// Pages the stage-2 page pool takes from the frame pool at a time.
const TABLE_POOL_BATCH: usize = 32;
/// The guest DTB sits at the start of guest RAM, the payload 2 MiB in (Linux boot convention).
const PAYLOAD_OFFSET: u64 = 2 << 20;

static FRAMES: FramePool = FramePool::new();
/// Lock-free page pool in front of the frame pool: stage-2 map/unmap never take the frame
/// allocator's lock on their fast path.
static TABLE_PAGES: Once<PagePool<&'static FramePool>> = Once::new();
/// Stage-2 geometry and split policy shared by every VM (see [`stage2_config`]).
static STAGE2: Once<Stage2Config> = Once::new();
/// The SMMUv3 the hypervisor owns, if the machine has one.
static SMMU: Once<Option<SmmuHost>> = Once::new();
/// Which VM's emulated SMMU each StreamID belongs to (for routing physical events).
static SID_OWNERS: Once<Vec<(u32, Arc<VSmmu>)>> = Once::new();
static MACHINE: Once<Machine> = Once::new();
static VMS: Once<Vec<Vm>> = Once::new();
static TRACKER: Once<RunTracker> = Once::new();
static CPUS: Once<Vec<PerCpu>> = Once::new();
static IMAGE_SUM: AtomicU64 = AtomicU64::new(0);
static TIMER_FIRED: AtomicBool = AtomicBool::new(false);
static EARLY_UART: Once<Pl011> = Once::new();

/// One VM: its configuration and everything the hypervisor keeps for it.
pub struct Vm {
    pub id: usize,
    pub config: &'static VmConfig,
    pub psci: VPsci,
    pub mmio: MmioBus,
    pub state: VmRunState,
    pub console: Option<Arc<VirtPl011>>,
    /// The VM's stage-2 table, shared by its vCPUs and the SMMU streams of its devices.
    pub stage2: Arc<VmStage2>,
    /// The VM's emulated SMMUv3, when it has DMA masters behind the SMMU.
    pub vsmmu: Option<Arc<VSmmu>>,
    /// The VM's filtered PCI config space, when it has PCI functions.
    pub ecam: Option<Arc<VirtEcam>>,
    /// The VM's emulated power controller, when its board entry gives it one.
    pub power_ctrl: Option<Arc<VirtPowerCtrl>>,
    /// The VM's virtual GIC.
    pub vgic: Arc<Vgic>,
    /// Physical SPIs forwarded to it (its PCI functions' INTx lines).
    pub forwarded_spis: Vec<u32>,
    /// What made its vCPUs leave the guest.
    pub exits: ExitCounters,
    /// VTCR/VTTBR values for this VM.
    pub s2regs: hw::Stage2Regs,
    /// Physical CPU index of each vCPU.
    pub pcpus: Vec<usize>,
    /// IPA of the guest DTB and of the payload entry point.
    pub dtb_ipa: u64,
    pub entry_ipa: u64,
}

/// A VM's guest exits by cause, for the end-of-run report.
#[derive(Default)]
pub struct ExitCounters {
    /// Emulated MMIO accesses (vGIC, vSMMU, config space, console, power controller).
    pub mmio: AtomicU64,
    /// HVC/SMC calls (PSCI, SMCCC, test hypercalls).
    pub calls: AtomicU64,
    /// WFI traps.
    pub wfi: AtomicU64,
    /// Trapped ICC_SGI1R_EL1 writes.
    pub sgi: AtomicU64,
    /// Physical interrupts taken while the guest ran.
    pub irq: AtomicU64,
    /// Aborts injected into the guest.
    pub aborts: AtomicU64,
}

impl ExitCounters {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The stage-2 table type every VM uses.
pub type VmStage2 = Stage2<&'static PagePool<&'static FramePool>, ArchWalkerSync>;

/// Per physical CPU.
pub struct PerCpu {
    pub mpidr: u64,
    /// (VM index, vCPU index) this pCPU runs, if any.
    pub owner: Option<(usize, usize)>,
    pub online: AtomicBool,
    /// The vGIC maintenance interrupt was taken and left active (its cause goes only with the
    /// next list-register flush; see `irq::handle_irq`).
    pub maintenance_active: AtomicBool,
}

/// The guest console lines go to the hypervisor console.
struct GuestConsoleSink;
impl ConsoleSink for GuestConsoleSink {
    fn write_line(&self, line: &str) {
        console::print_line(format_args!("{line}"));
    }
    fn write_raw(&self, bytes: &[u8]) {
        console::print_raw(bytes);
    }
}
static GUEST_SINK: GuestConsoleSink = GuestConsoleSink;

/// Ends the run: semihosting exit under QEMU, PSCI on hardware.
pub fn finish(status: u32) -> ! {
    match board().exit {
        ExitMethod::Semihosting => platform::semihosting_exit(status),
        ExitMethod::Psci => {
            let conduit = psci_conduit();
            if status == run::EXIT_OK {
                platform::system_off(conduit);
            } else {
                platform::system_reset(conduit);
            }
            loop {
                sysreg::wfe();
            }
        }
    }
}

fn psci_conduit() -> platform::Conduit {
    match MACHINE
        .get()
        .and_then(|m| m.psci.as_ref())
        .map(|p| p.method)
    {
        Some(dt::Conduit::Hvc) => platform::Conduit::Hvc,
        _ => platform::Conduit::Smc,
    }
}

/// A boot-time error the user must fix: say what, end the run with [`run::EXIT_FATAL`].
fn fatal(args: core::fmt::Arguments<'_>) -> ! {
    console::print_line(format_args!("hyp: fatal: {args}"));
    finish(run::EXIT_FATAL)
}

fn init_early_console() {
    if let Some(base) = board().early_console {
        // SAFETY: the board file names the PL011, which the early identity map covers (device
        // memory) and the final map keeps.
        let uart = EARLY_UART.call_once(|| unsafe { Pl011::new(base) });
        console::init(uart);
    }
    console::init_logger(log::LevelFilter::Info);
}

fn image_checksum(l: &boot::ImageLayout) -> u64 {
    // FNV-1a over text and rodata, 8 bytes at a time.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut p = l.start;
    while p < l.rodata_end {
        // SAFETY: text and rodata are mapped and never written after relocation.
        let w = unsafe { (p as *const u64).read_volatile() };
        h = (h ^ w).wrapping_mul(0x100_0000_01b3);
        p += 8;
    }
    h
}

/// Reads the DTB header's total size, refusing anything that is not a DTB.
fn dtb_slice(dtb: u64) -> &'static [u8] {
    // SAFETY: the early map covers 4 MiB from the DTB's 2 MiB block; the header is 40 bytes.
    let header = unsafe { core::slice::from_raw_parts(dtb as *const u8, 8) };
    let magic = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let size = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as u64;
    if magic != 0xd00d_feed {
        fatal(format_args!(
            "bad device tree: no DTB at {dtb:#x} (magic {magic:#010x}, expected 0xd00dfeed)"
        ));
    }
    if !(40..=(2 << 20)).contains(&size) {
        fatal(format_args!(
            "bad device tree: DTB at {dtb:#x} claims {size} bytes (max 2 MiB)"
        ));
    }
    // SAFETY: within the mapped 2 MiB following the header, per the check above.
    unsafe { core::slice::from_raw_parts(dtb as *const u8, size as usize) }
}

#[unsafe(no_mangle)]
extern "C" fn primary_main(dtb: u64, load_base: u64) -> ! {
    // SAFETY: the boot heap is used only here, once, before any allocation.
    unsafe {
        HEAP.lock()
            .init(&raw mut BOOT_HEAP as usize, BOOT_HEAP_SIZE)
    };
    init_early_console();
    let b = board();
    let image = boot::image_layout();
    info!(
        "{} {} starting on board {} (image {:#x}..{:#x}, DTB {dtb:#x})",
        env!("CARGO_PKG_NAME"),
        env!("CARGO_PKG_VERSION"),
        b.name,
        load_base,
        image.end
    );
    IMAGE_SUM.store(image_checksum(&image), Ordering::Relaxed);

    let blob = dtb_slice(dtb);
    let machine = match dt::parse(blob) {
        Ok(m) => MACHINE.call_once(|| m),
        Err(e) => fatal(format_args!("bad device tree: {e}")),
    };
    info!(
        "machine: {} CPUs, RAM {}, GICv3 at {:#x}, {} SMMU(s)",
        machine.cpus.len(),
        machine
            .memory
            .iter()
            .map(|r| alloc::format!("{:#x}+{:#x}", r.base, r.size))
            .collect::<Vec<_>>()
            .join(" "),
        machine.gic.gicd.base,
        machine.smmus.len()
    );

    let ram: Vec<Range> = machine
        .memory
        .iter()
        .map(|r| Range::new(r.base, r.size))
        .collect();
    let reserved: Vec<Range> = machine
        .reserved
        .iter()
        .map(|r| Range::new(r.base, r.size))
        .collect();
    let plan = layout::plan(
        &ram,
        &reserved,
        Range::new(image.start, image.end - image.start),
        Range::new(dtb, blob.len() as u64),
        b.hyp_pool_size,
        b.vms,
    )
    .unwrap_or_else(|e| fatal(format_args!("memory layout: {e}")));
    let pool = plan.pool;
    build_final_map(machine, &image, &ram, pool);
    // SAFETY: the pool's first part becomes heap; it is mapped and unused.
    unsafe {
        HEAP.lock()
            .add_to_heap(pool.base as usize, (pool.base + HEAP_SHARE) as usize)
    };
    info!(
        "hypervisor pool {}: heap {} MiB, frames {} MiB",
        pool,
        HEAP_SHARE >> 20,
        (pool.size - HEAP_SHARE) >> 20
    );

    let gic = gic_layout(machine);
    gic::init_distributor(&gic);
    let my_mpidr = sysreg::mpidr();
    let Some(my_index) = machine.cpus.iter().position(|c| c.mpidr == my_mpidr) else {
        fatal(format_args!("boot CPU MPIDR {my_mpidr:#x} is not in /cpus"))
    };
    init_cpu_interrupts(machine, &gic);
    check_timer(machine);

    STAGE2.call_once(|| stage2_config(machine));
    TABLE_PAGES.call_once(|| PagePool::new(&FRAMES, TABLE_POOL_BATCH));
    let smmu = SMMU.call_once(|| init_smmu(machine)).as_ref();
    if let Some(host) = smmu {
        power::init(host);
    }
    let vms = create_vms(machine, blob);
    if let Err((spi, a, b)) = irq::record_owners(&vms) {
        fatal(format_args!(
            "INTID {spi} would be forwarded to two VMs ({} and {}): give PCI functions that share an INTx line to one VM",
            vms[a].config.name, vms[b].config.name
        ));
    }
    SID_OWNERS.call_once(|| {
        vms.iter()
            .filter_map(|vm| vm.vsmmu.as_ref())
            .flat_map(|v| v.stream_ids().iter().map(move |&sid| (sid, v.clone())))
            .collect()
    });
    if smmu.is_some() {
        irq::init_smmu_irqs(machine);
    }
    irq::init_console_input(machine, &vms);
    let mut owners: Vec<Option<(usize, usize)>> = alloc::vec![None; machine.cpus.len()];
    for (vi, vm) in vms.iter().enumerate() {
        for (v, &p) in vm.pcpus.iter().enumerate() {
            owners[p] = Some((vi, v));
        }
    }
    CPUS.call_once(|| {
        machine
            .cpus
            .iter()
            .zip(owners)
            .map(|(c, owner)| PerCpu {
                mpidr: c.mpidr,
                owner,
                online: AtomicBool::new(false),
                maintenance_active: AtomicBool::new(false),
            })
            .collect()
    });
    TRACKER.call_once(|| RunTracker::new(vms.len()));
    VMS.call_once(|| vms);
    // The SMMU was powered for the reset and the STEs; from here on it stays on only while a
    // master is active.
    power::schedule_autosuspend();
    start_secondaries(machine, my_index);
    run_cpu(my_index)
}

fn build_final_map(machine: &Machine, image: &boot::ImageLayout, ram: &[Range], pool: Range) {
    // The early map does not cover the pool, so these tables come from the boot heap; the pool
    // is handed to the heap and the frame allocator once they are live.
    let frames_start = pool.base + HEAP_SHARE;
    let table_pages = TablePages;
    let mut t = PageTable::new(&table_pages, Regime::El2, mmu::VA_BITS)
        .unwrap_or_else(|e| fatal(format_args!("EL2 page tables: {e}")));
    let map = |t: &mut PageTable<&TablePages>, base: u64, size: u64, attrs: Attrs, what: &str| {
        if size == 0 {
            return;
        }
        if let Err(e) = t.map(base, base, size, attrs) {
            fatal(format_args!("EL2 page tables: mapping {what}: {e}"));
        }
    };
    map(
        &mut t,
        image.start,
        image.text_end - image.start,
        Attrs::RX,
        "text",
    );
    map(
        &mut t,
        image.text_end,
        image.rodata_end - image.text_end,
        Attrs::RO,
        "rodata",
    );
    map(
        &mut t,
        image.rodata_end,
        image.end - image.rodata_end,
        Attrs::RW,
        "data",
    );
    for r in ram {
        // RAM around the image, read/write, never executable.
        let (lo, hi) = (r.base, r.end());
        if image.start >= lo && image.end <= hi {
            map(
                &mut t,
                lo,
                image.start - lo,
                Attrs::RW,
                "RAM below the image",
            );
            map(
                &mut t,
                image.end,
                hi - image.end,
                Attrs::RW,
                "RAM above the image",
            );
        } else {
            map(&mut t, lo, r.size, Attrs::RW, "RAM");
        }
    }
    let mut devices: Vec<(u64, u64)> = Vec::new();
    devices.push((machine.gic.gicd.base, machine.gic.gicd.size));
    devices.extend(machine.gic.gicr.iter().map(|r| (r.base, r.size)));
    if let Some(u) = &machine.uart {
        devices.push((u.base, u.size.max(0x1000)));
    }
    if let Some(base) = board().early_console {
        devices.push((base, 0x1000));
    }
    devices.extend(machine.smmus.iter().map(|s| (s.base, s.size)));
    if let Some(crate::config::SmmuPowerConfig {
        domain: crate::config::PowerDomainKind::Gdsc(g),
        ..
    }) = board().smmu_power
    {
        // The clock controller holding the SMMU's GDSC and clocks.
        devices.push((g.base, u64::from(g.size)));
    }
    if let Some(p) = &machine.pcie {
        devices.push((p.ecam.base, p.ecam.size));
    }
    devices.sort_unstable();
    devices.dedup();
    for (base, size) in devices {
        let lo = base & !0xfff;
        let hi = (base + size).next_multiple_of(0x1000);
        if t.map(lo, lo, hi - lo, Attrs::DEVICE).is_ok() {
            continue;
        }
        // Two DT nodes share a page: map page by page what is not mapped yet.
        for a in (lo..hi).step_by(0x1000) {
            if t.translate(a).is_none() {
                map(&mut t, a, 0x1000, Attrs::DEVICE, "device registers");
            }
        }
    }
    let regs = mmu::el2_regs(t.root_pa());
    // SAFETY: the new table maps the image (text RX, data RW), all RAM and the devices we use,
    // identically to the early map for everything the hypervisor touches from here on.
    unsafe { mmu::switch_el2_table(regs.ttbr0) };
    ROOT.store(regs.ttbr0, Ordering::Relaxed);
    FRAMES.add(frames_start, pool.end());
}

static ROOT: AtomicU64 = AtomicU64::new(0);

/// Table pages for the final EL2 map, allocated from the heap while only the boot heap exists
/// (the pool is not mapped until these tables are live). They live for the whole run.
struct TablePages;
impl crate::mm::pgtable::TableAlloc for &TablePages {
    fn alloc_pages(&self, pages: usize) -> Option<u64> {
        let layout = core::alloc::Layout::from_size_align(pages * 4096, pages * 4096).ok()?;
        // SAFETY: non-zero layout; the pages are leaked on purpose (live page tables).
        let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
        (!p.is_null()).then_some(p as u64)
    }
    fn table(&self, pa: u64) -> *mut u64 {
        pa as *mut u64
    }
}

fn gic_layout(machine: &Machine) -> gic::GicLayout {
    let first = machine.gic.gicr[0];
    let last = machine.gic.gicr[machine.gic.gicr.len() - 1];
    gic::GicLayout {
        gicd: machine.gic.gicd.base,
        gicr: first.base,
        gicr_size: last.base + last.size - first.base,
    }
}

fn hyp_timer_intid(machine: &Machine) -> u32 {
    machine.timer.map(|t| t.hyp_phys.intid()).unwrap_or(26)
}

fn init_cpu_interrupts(machine: &Machine, gic: &gic::GicLayout) {
    let timer = hyp_timer_intid(machine);
    hw::route_interrupts_to_el2();
    gic::init_cpu(
        gic,
        sysreg::mpidr(),
        (1 << gic::SGI_KICK) | (1 << timer) | (1 << MAINTENANCE_PPI) | (1 << VTIMER_PPI),
    );
}

/// Proves the EL2 timer and the GIC work: arm the timer 1 ms ahead and wait for its interrupt.
fn check_timer(_machine: &Machine) {
    let freq = sysreg::counter_freq();
    let start = sysreg::counter();
    platform::hyp_timer_arm(freq / 1000);
    platform::irq_enable();
    while !TIMER_FIRED.load(Ordering::Acquire) {
        if sysreg::counter() - start > freq {
            platform::irq_disable();
            fatal(format_args!(
                "the EL2 timer interrupt did not arrive within 1 s"
            ));
        }
        core::hint::spin_loop();
    }
    platform::irq_disable();
    let us = (sysreg::counter() - start) * 1_000_000 / freq;
    info!("EL2 timer and GIC OK (1 ms timer interrupt after {us} us)");
}

/// Handles the physical interrupts pending on this CPU (from EL2 or while a guest runs).
pub fn handle_irq() {
    irq::handle_irq();
}

/// Chooses the stage-2 geometry and split policy from what every walker supports: the IPA size is
/// the smaller of the CPU's physical address size and each SMMU's output size (the SMMUs walk the
/// same tables); live block splits are direct only when the CPUs and every SMMU implement
/// break-before-make level 2; otherwise tables the SMMU walks are mapped with pages only (no live
/// split ever) and CPU-only tables use break-before-make (a vCPU that faults in the window retries).
fn stage2_config(machine: &Machine) -> Stage2Config {
    let cpu_bits = mmu::pa_bits(mmu::pa_range_code());
    let cpu_bbm = cpu_tlb::cpu_bbm_level();
    let mut ipa_bits = cpu_bits.min(MAX_IPA_BITS);
    let mut smmu_bbm_ok = true;
    let mut coherent = true;
    for s in &machine.smmus {
        // SAFETY: the SMMU's registers come from the DT and are in the final EL2 map.
        let caps = unsafe { smmu::read_caps(s.kind, s.base) };
        info!(
            "SMMU {} ({:?}): {}-bit output, BBML {}, {}coherent table walks",
            s.path,
            s.kind,
            caps.oas_bits,
            caps.bbml,
            if caps.coherent_walk { "" } else { "non-" }
        );
        ipa_bits = ipa_bits.min(caps.oas_bits);
        smmu_bbm_ok &= caps.bbml >= 2;
        coherent &= caps.coherent_walk;
    }
    // No larger than the VMs' address maps need: every level saved shortens each walk of the
    // CPUs and the SMMU (QEMU virt: 40 bits, for its high PCIe window, instead of 44).
    let hw_bits = ipa_bits;
    ipa_bits = ipa_bits.min(layout::ipa_bits_for(ipa_top(machine)));
    // Every VM shares the same choice until SMMU streams are attached per VM: a VM's stage 2 may
    // be walked by any SMMU that has one of its devices behind it.
    let split = if cpu_bbm >= 2 && smmu_bbm_ok {
        SplitPolicy::Direct
    } else if !machine.smmus.is_empty() {
        SplitPolicy::NoLiveSplits
    } else {
        SplitPolicy::BreakBeforeMake
    };
    info!(
        "stage 2: {ipa_bits}-bit IPA (hardware allows {hw_bits}, CPU {cpu_bits}-bit PA), CPU BBM level {cpu_bbm}, splits {split:?}, {}coherent walks",
        if coherent { "" } else { "non-" }
    );
    Stage2Config {
        ipa_bits,
        split,
        coherent_walk: coherent,
    }
}

/// The end of the highest IPA any VM may use: its RAM and devices, the emulated devices (at
/// their host addresses) and the PCIe windows its BARs are placed in (IPA = PA).
fn ipa_top(machine: &Machine) -> u64 {
    let mut top = 0u64;
    let mut cover = |base: u64, size: u64| top = top.max(base.saturating_add(size));
    for vm in board().vms {
        vm.memory.iter().for_each(|m| cover(m.ipa, m.size));
        vm.devices.iter().for_each(|d| cover(d.ipa, d.size));
        for ipa in [vm.console_ipa, vm.power_controller_ipa]
            .into_iter()
            .flatten()
        {
            cover(ipa, 0x1000);
        }
    }
    cover(machine.gic.gicd.base, machine.gic.gicd.size);
    machine.gic.gicr.iter().for_each(|r| cover(r.base, r.size));
    machine.smmus.iter().for_each(|s| cover(s.base, s.size));
    if let Some(p) = &machine.pcie {
        cover(p.ecam.base, p.ecam.size);
        p.ranges.iter().for_each(|r| cover(r.cpu_addr, r.size));
    }
    top
}

/// The SMMUv3 the hypervisor drives, with its lock-free command queue.
pub struct SmmuHost {
    pub driver: SmmuV3,
    pub cmdq: Arc<CmdQueue>,
    /// Register base (also where each VM's emulated SMMU appears: IPA = PA).
    pub base: u64,
    pub oas_bits: u32,
    pub ril: bool,
    /// IIDR and AIDR, read once at probe (the SMMU may be powered off later).
    pub iidr: u32,
    pub aidr: u32,
}

/// Probes and resets the first SMMUv3 in the DT: every stream aborts, GBPA aborts (no bypass
/// ever), then the command queue goes lock-free.
fn init_smmu(machine: &Machine) -> Option<SmmuHost> {
    let s = machine.smmus.iter().find(|s| s.kind == dt::SmmuKind::V3)?;
    // SAFETY: the SMMU's registers come from the DT, are in the final EL2 map, and only this
    // driver touches them.
    let mmio = Arc::new(unsafe { MmioAt::new(s.base) });
    let clean: fn(u64, usize) = |pa, len| sysreg::clean_dcache_range(pa, len as u64);
    // SAFETY: the heap is identity-mapped normal memory the SMMU can reach.
    let dma = Arc::new(unsafe { HeapDma::new(Some(clean)) });
    let fail = |what: &str, e: &dyn core::fmt::Display| -> ! {
        fatal(format_args!("SMMU {}: {what}: {e}", s.path))
    };
    let t0 = sysreg::counter();
    let driver = SmmuV3::probe(mmio, dma, Some(16)).unwrap_or_else(|e| fail("probe", &e));
    driver.reset().unwrap_or_else(|e| fail("reset", &e));
    let cmdq = driver
        .install_cmd_queue(CmdqOptions::default())
        .unwrap_or_else(|e| fail("command queue", &e));
    power::BOOT_RESET_TICKS.store(sysreg::counter() - t0, Ordering::Relaxed);
    let caps = *driver.caps();
    info!(
        "SMMUv3 {}: reset, every stream aborts; {}-bit StreamIDs ({}), {} command slots, nested {}",
        s.path,
        caps.sid_bits,
        if caps.two_level {
            "2-level table"
        } else {
            "linear table"
        },
        1u32 << caps.cmdq_log2size,
        caps.nested
    );
    if !caps.nested {
        fatal(format_args!(
            "SMMU {}: no nested (stage 1 + 2) translation",
            s.path
        ));
    }
    let iidr = driver.mmio().read32(crate::smmu::v3::regs::off::IIDR);
    let aidr = driver.mmio().read32(crate::smmu::v3::regs::off::AIDR);
    Some(SmmuHost {
        driver,
        cmdq,
        base: s.base,
        oas_bits: caps.oas_bits,
        ril: caps.ril,
        iidr,
        aidr,
    })
}

/// The physical SMMU as a VM's emulated SMMU uses it. With a power domain, nothing here powers
/// the SMMU up: while it is off, STEs are written to the stream table only (the power-up's
/// CFGI_ALL picks them up) and forwarded invalidations are skipped (it starts with empty TLBs).
struct PhysSmmuPort(&'static SmmuHost);

impl PhysSmmuPort {
    fn ste_error(sid: u32, e: &dyn core::fmt::Display) -> PhysError {
        warn!("SMMU: STE {sid:#x}: {e}");
        PhysError::Other("STE write failed")
    }
}

impl PhysSmmu for PhysSmmuPort {
    fn write_ste(&self, sid: u32, ste: Ste) -> Result<(), PhysError> {
        let Some(domain) = power::domain() else {
            return self
                .0
                .driver
                .write_ste(sid, ste)
                .map_err(|e| Self::ste_error(sid, &e));
        };
        if let Some(_pin) = domain.get_if_active() {
            return self
                .0
                .driver
                .write_ste(sid, ste)
                .map_err(|e| Self::ste_error(sid, &e));
        }
        // Off: write the table only. If the SMMU came back meanwhile (its CFGI_ALL may have
        // read the old entry), invalidate the entry now; if not, the next power-up, ordered
        // after this check, reads the new one.
        self.0
            .driver
            .write_ste_offline(sid, ste)
            .map_err(|e| Self::ste_error(sid, &e))?;
        if let Some(_pin) = domain.get_if_active() {
            let cfgi = crate::smmu::v3::cmd::Command::CfgiSte { sid, leaf: true }.encode();
            self.0.cmdq.issue(&[cfgi], true).map_err(|e| {
                warn!("SMMU: CFGI_STE {sid:#x}: {e:?}");
                PhysError::Timeout
            })?;
        }
        Ok(())
    }

    fn submit(&self, cmds: &[[u64; 2]]) -> Result<(), PhysError> {
        let _pin = match power::domain() {
            Some(d) => match d.tlb_begin() {
                Some(pin) => Some(pin),
                None => return Ok(()),
            },
            None => None,
        };
        self.0.cmdq.issue(cmds, false).map_err(|e| {
            warn!("SMMU: command queue: {e:?}");
            PhysError::Other("command queue")
        })
    }

    fn sync(&self) -> Result<(), PhysError> {
        // Off: every command issued before it went off has completed (suspend drained them).
        power::if_powered(|| {
            self.0.cmdq.issue(&[], true).map_err(|e| {
                warn!("SMMU: CMD_SYNC: {e:?}");
                PhysError::Timeout
            })
        })
        .unwrap_or(Ok(()))
    }

    fn idr(&self) -> [u32; 6] {
        self.0.driver.caps().idr
    }

    fn iidr(&self) -> u32 {
        self.0.iidr
    }

    fn aidr(&self) -> u32 {
        self.0.aidr
    }
}

/// A VM's emulated SMMU on its MMIO bus. When the guest reads its event queue's PROD, physical
/// events are first routed to the emulated SMMUs of the VMs that own their streams (there are no
/// interrupts yet, so a guest polling its event queue is what drives this; no other register
/// access pays for it).
struct VSmmuPort(Arc<VSmmu>);

impl crate::trap::MmioDevice for VSmmuPort {
    fn name(&self) -> &str {
        "vsmmuv3"
    }

    fn read(&self, vcpu: usize, offset: u64, size: u8) -> Result<u64, crate::trap::MmioError> {
        if offset == crate::smmu::v3::regs::off::EVENTQ_PROD {
            route_smmu_events();
        }
        self.0.read(vcpu, offset, size)
    }

    fn write(
        &self,
        vcpu: usize,
        offset: u64,
        size: u8,
        value: u64,
    ) -> Result<(), crate::trap::MmioError> {
        self.0.write(vcpu, offset, size, value)
    }
}

static UNROUTED_EVENTS: AtomicU64 = AtomicU64::new(0);

/// Drains the physical event queue: events of a VM's stream go to its emulated SMMU; the rest
/// are logged (the first few, then only counted).
fn route_smmu_events() {
    let Some(host) = SMMU.get().and_then(Option::as_ref) else {
        return;
    };
    // A powered-off SMMU has no events: suspend drained them.
    power::if_powered(|| host.driver.drain_events(route_event));
}

/// The physical SMMU reported a global error: recover (the driver acknowledges it and skips a
/// failed command) and log it.
fn smmu_gerror() {
    let Some(host) = SMMU.get().and_then(Option::as_ref) else {
        return;
    };
    if let Some(Some(g)) = power::if_powered(|| host.driver.gerror()) {
        warn!("SMMU global error {g:#x}");
    }
}

/// Sends one physical event to the VM that owns its stream, or logs it.
fn route_event(ev: crate::smmu::v3::event::Event) {
    let owner = SID_OWNERS
        .get()
        .and_then(|o| o.iter().find(|(sid, _)| *sid == ev.sid));
    match owner {
        Some((_, v)) if !ev.s2 => {
            v.inject_event(ev);
        }
        _ => {
            let n = UNROUTED_EVENTS.fetch_add(1, Ordering::Relaxed);
            if n < 8 {
                info!("SMMU event not delivered to a guest (stage 2 or unowned stream): {ev:x?}");
            }
        }
    }
}

fn create_vms(machine: &Machine, host_dtb: &[u8]) -> Vec<Vm> {
    let mut used = alloc::vec![false; machine.cpus.len()];
    // One allocator for every VM's BARs, so they never overlap.
    let mem32 = machine
        .pcie
        .as_ref()
        .and_then(|p| p.ranges.iter().find(|r| r.space == dt::PciSpace::Mem32))
        .map(|r| (r.cpu_addr, r.size));
    let mut bars = mem32.map(|(base, size)| BarAllocator::new(base, size));
    board()
        .vms
        .iter()
        .enumerate()
        .map(|(id, config)| create_vm(machine, host_dtb, id, config, &mut used, &mut bars))
        .collect()
}

fn create_vm(
    machine: &Machine,
    host_dtb: &[u8],
    id: usize,
    config: &'static VmConfig,
    used: &mut [bool],
    bars: &mut Option<BarAllocator>,
) -> Vm {
    let name = config.name;
    let mut pcpus = Vec::new();
    for &c in config.cpus {
        let c = c as usize;
        if c >= machine.cpus.len() {
            fatal(format_args!(
                "VM {name:?} wants CPU {c}, but the device tree lists only {} CPUs",
                machine.cpus.len()
            ));
        }
        if core::mem::replace(&mut used[c], true) {
            fatal(format_args!(
                "VM {name:?} wants CPU {c}, which another VM owns"
            ));
        }
        pcpus.push(c);
    }
    let cfg = *STAGE2.get().expect("stage-2 configuration");
    let pages = TABLE_PAGES.get().expect("table pages");
    let table = Stage2Table::new(cfg, pages, ArchWalkerSync)
        .unwrap_or_else(|e| fatal(format_args!("VM {name:?}: stage 2: {e}")));
    for m in config.memory {
        table
            .map(m.ipa, m.pa, m.size, Attrs::RWX)
            .unwrap_or_else(|e| fatal(format_args!("VM {name:?}: mapping RAM: {e}")));
    }
    for d in config.devices {
        table
            .map(d.ipa, d.pa, d.size, Attrs::DEVICE)
            .unwrap_or_else(|e| fatal(format_args!("VM {name:?}: mapping device: {e}")));
    }
    let vmid = (id + 1) as u16;
    let s2regs = hw::Stage2Regs {
        vtcr: hw::vtcr(table.ipa_bits(), table.start_level()),
        vttbr: table.root_pa() | ((vmid as u64) << 48),
    };
    let smmu_s2 = SMMU.get().and_then(Option::as_ref).map(|h| {
        S2Config::for_table(
            table.root_pa(),
            table.ipa_bits(),
            table.start_level(),
            h.oas_bits,
        )
    });
    let mut stage2 = Stage2::new(
        table,
        vmid,
        alloc::vec![Arc::new(CpuTlb::new(s2regs.vttbr)) as _],
    );
    let dma = !config.stream_ids.is_empty() || !config.pci.is_empty();
    let smmu = SMMU.get().and_then(Option::as_ref).filter(|_| dma);
    if dma && smmu.is_none() {
        fatal(format_args!(
            "VM {name:?} has DMA masters but the machine has no SMMUv3 to confine them"
        ));
    }
    if let Some(h) = smmu {
        // The SMMU walks this same table for the VM's streams: it must see every invalidation
        // (while it is powered: one that is off starts with empty TLBs).
        let tlb = SmmuV3Tlb::new(h.cmdq.clone(), vmid, h.ril, true);
        match power::domain() {
            Some(d) => stage2.add_agent(Arc::new(PoweredTlb::new(tlb, d))),
            None => stage2.add_agent(Arc::new(tlb)),
        }
    }
    let stage2 = Arc::new(stage2);

    // The VM's interrupts: its PCI functions' INTx lines (forwarded), its emulated SMMU's and
    // console's (virtual).
    let mut intx: Vec<u32> = Vec::new();
    if let Some(host) = machine.pcie.as_ref().filter(|_| !config.pci.is_empty()) {
        // SAFETY: the ECAM window comes from the DT and is in the final EL2 map.
        let phys = unsafe { devices::PhysEcam::new(host.ecam.base, host.ecam.size) };
        for f in config.pci {
            let pin = (phys.read(f.bdf(), 0x3d, 1) & 0xff) as u8;
            if (1..=4).contains(&pin)
                && let Some(irq) = host.intx.lookup(f.bdf(), pin)
            {
                intx.push(irq.intid());
            }
        }
    }
    let spis = irq::vm_spis(machine, &intx, dma, config.console_ipa.is_some());
    let vgic = irq::build_vgic(machine, &pcpus, &spis)
        .unwrap_or_else(|e| fatal(format_args!("VM {name:?}: virtual GIC: {e}")));
    let mut mmio = MmioBus::new();
    mmio.register(
        machine.gic.gicd.base,
        GICD_SIZE,
        Arc::new(Distributor::new(vgic.clone())),
    )
    .unwrap_or_else(|e| fatal(format_args!("VM {name:?}: virtual GIC distributor: {e}")));
    let redists = Redistributors::new(vgic.clone());
    let Some(gicr) = machine.gic.gicr.first() else {
        fatal(format_args!(
            "VM {name:?}: the GIC has no redistributor region"
        ))
    };
    if redists.size() > gicr.size {
        fatal(format_args!(
            "VM {name:?}: {} redistributors do not fit the GIC's region",
            pcpus.len()
        ));
    }
    mmio.register(gicr.base, redists.size(), Arc::new(redists))
        .unwrap_or_else(|e| fatal(format_args!("VM {name:?}: virtual redistributors: {e}")));
    let console = config.console_ipa.map(|ipa| {
        let dev = Arc::new(VirtPl011::new(name, &GUEST_SINK));
        if let Some(irq) = machine.uart.as_ref().and_then(|u| u.irq) {
            dev.set_irq(Arc::new(irq::ConsoleIrq {
                vgic: vgic.clone(),
                intid: irq.intid(),
            }));
        }
        mmio.register(ipa, 0x1000, dev.clone())
            .unwrap_or_else(|e| fatal(format_args!("VM {name:?}: console: {e}")));
        dev
    });

    let vsmmu = smmu.map(|h| {
        let s2 = smmu_s2.unwrap_or_else(|| fatal(format_args!("VM {name:?}: no SMMU stage 2")));
        let v = Arc::new(VSmmu::new(
            vmid,
            s2,
            config.stream_ids,
            Arc::new(devices::Stage2Memory(stage2.clone())),
            Arc::new(PhysSmmuPort(h)),
            Arc::new(irq::VsmmuSpis::new(vgic.clone(), machine)),
        ));
        mmio.register(h.base, VSMMU_MMIO_SIZE, Arc::new(VSmmuPort(v.clone())))
            .unwrap_or_else(|e| fatal(format_args!("VM {name:?}: emulated SMMU: {e}")));
        v
    });
    // Activity sources: an active master holds the SMMU's power domain. Votes go through the
    // emulated power controller; every other PCI function is active with Bus Master on in D0.
    let sink = |what: &str, f: &crate::config::PciFunction| -> Arc<dyn ActivitySink> {
        let label: &'static str = alloc::format!(
            "{name}/{:02x}:{:02x}.{} ({what})",
            f.bus,
            f.device,
            f.function
        )
        .leak();
        match power::domain() {
            Some(d) => Arc::new(power::SmmuLink::new(label, d)),
            None => Arc::new(AlwaysPowered),
        }
    };
    let power_ctrl = config.power_controller_ipa.map(|ipa| {
        let domains = config
            .power_votes
            .iter()
            .map(|f| PowerDomain {
                name: "edu",
                sink: sink("vote", f),
            })
            .collect();
        let ctrl = Arc::new(
            VirtPowerCtrl::new(domains)
                .unwrap_or_else(|e| fatal(format_args!("VM {name:?}: power controller: {e}"))),
        );
        mmio.register(ipa, POWER_CTRL_MMIO_SIZE, ctrl.clone())
            .unwrap_or_else(|e| fatal(format_args!("VM {name:?}: power controller: {e}")));
        (ipa, ctrl)
    });
    let mut ecam_dev = None;
    if !config.pci.is_empty() {
        let Some(host) = machine.pcie.as_ref() else {
            fatal(format_args!(
                "VM {name:?} has PCI functions but the machine has no PCIe host"
            ))
        };
        let window = EcamWindow {
            bus_start: host.bus_start,
            bus_end: host.bus_end,
        };
        // SAFETY: the ECAM window comes from the DT and is in the final EL2 map.
        let phys = Arc::new(unsafe { devices::PhysEcam::new(host.ecam.base, host.ecam.size) });
        let mut ecam = VirtEcam::new(
            phys,
            config.pci,
            window,
            Arc::new(devices::Stage2Bars(stage2.clone())),
        )
        .unwrap_or_else(|e| fatal(format_args!("VM {name:?}: PCI: {e}")));
        let Some(alloc) = bars.as_mut() else {
            fatal(format_args!(
                "VM {name:?}: the PCIe host has no 32-bit memory window for BARs"
            ))
        };
        let placed = ecam
            .assign_bars_from(alloc)
            .unwrap_or_else(|e| fatal(format_args!("VM {name:?}: PCI BARs: {e}")));
        for bar in &placed {
            info!("VM {name:?}: PCI BAR {bar:x?}");
        }
        for f in config
            .pci
            .iter()
            .filter(|f| !config.power_votes.contains(f))
        {
            ecam.set_activity(f.bdf(), sink("bus master", f))
                .unwrap_or_else(|e| fatal(format_args!("VM {name:?}: PCI activity: {e}")));
        }
        let ecam = Arc::new(ecam);
        mmio.register(host.ecam.base, window.size(), ecam.clone())
            .unwrap_or_else(|e| fatal(format_args!("VM {name:?}: PCI config space: {e}")));
        ecam_dev = Some(ecam);
    }

    let ram = config.memory[0];
    let initrd = (!config.initrd.is_empty()).then(|| {
        let at = initrd_offset(config.payload);
        let end = at + config.initrd.len() as u64;
        if end > ram.size {
            fatal(format_args!(
                "VM {name:?}: initrd ({} bytes at RAM + {at:#x}) does not fit in {:#x} bytes of RAM",
                config.initrd.len(),
                ram.size
            ));
        }
        (at, end)
    });
    let spec = GuestSpec {
        vcpus: pcpus.len(),
        memory: config
            .memory
            .iter()
            .map(|m| dt::Region::new(m.ipa, m.size))
            .collect(),
        reserved: Vec::new(),
        devices: config
            .devices
            .iter()
            .map(|d| dt::Region::new(d.ipa, d.size))
            .collect(),
        console: config.console_ipa,
        bootargs: config.bootargs.map(String::from),
        keep_pci: !config.pci.is_empty(),
        psci_method: "hvc",
        initrd: initrd.map(|(at, end)| (ram.ipa + at, ram.ipa + end)),
        pci_probe_only: !config.pci.is_empty(),
        power_controller: power_ctrl.as_ref().map(|(ipa, c)| dt::PowerCtrlNode {
            ipa: *ipa,
            domains: c.num_domains() as u32,
        }),
    };
    let guest_dtb = dt::derive_guest(host_dtb, &spec)
        .unwrap_or_else(|e| fatal(format_args!("VM {name:?}: guest device tree: {e}")));
    if guest_dtb.len() as u64 > PAYLOAD_OFFSET {
        fatal(format_args!(
            "VM {name:?}: guest DTB is {} bytes, over 2 MiB",
            guest_dtb.len()
        ));
    }
    if PAYLOAD_OFFSET + config.payload.len() as u64 > ram.size {
        fatal(format_args!(
            "VM {name:?}: payload {:?} ({} bytes) does not fit in {:#x} bytes of RAM",
            config.payload_name,
            config.payload.len(),
            ram.size
        ));
    }
    // Guest RAM is identity mapped at EL2 (all RAM is); copy, then clean to the point of coherency
    // because the guest starts with its MMU and caches off.
    // SAFETY: the VM's RAM was checked by the layout plan to be RAM owned by this VM alone.
    unsafe {
        core::ptr::copy_nonoverlapping(guest_dtb.as_ptr(), ram.pa as *mut u8, guest_dtb.len());
        core::ptr::copy_nonoverlapping(
            config.payload.as_ptr(),
            (ram.pa + PAYLOAD_OFFSET) as *mut u8,
            config.payload.len(),
        );
    }
    if let Some((at, _)) = initrd {
        // SAFETY: as above; `initrd_offset` keeps it clear of the payload and the check above of
        // the end of the region.
        unsafe {
            core::ptr::copy_nonoverlapping(
                config.initrd.as_ptr(),
                (ram.pa + at) as *mut u8,
                config.initrd.len(),
            )
        };
        sysreg::clean_dcache_range(ram.pa + at, config.initrd.len() as u64);
    }
    sysreg::clean_dcache_range(ram.pa, guest_dtb.len() as u64);
    sysreg::clean_dcache_range(ram.pa + PAYLOAD_OFFSET, config.payload.len() as u64);
    sysreg::invalidate_icache_all();
    info!(
        "VM {name:?} (VMID {vmid}): {} vCPU(s) on CPU(s) {:?}, RAM {:#x}+{:#x} at PA {:#x}, payload {:?} ({} KiB), stage 2 with {} table pages",
        pcpus.len(),
        config.cpus,
        ram.ipa,
        config.ram_size(),
        ram.pa,
        config.payload_name,
        config.payload.len() / 1024,
        stage2.table.table_pages()
    );
    Vm {
        id,
        config,
        psci: VPsci::new(pcpus.len()),
        mmio,
        state: VmRunState::new(),
        console,
        stage2,
        vsmmu,
        ecam: ecam_dev,
        power_ctrl: power_ctrl.map(|(_, c)| c),
        vgic,
        forwarded_spis: intx,
        exits: ExitCounters::default(),
        s2regs,
        pcpus,
        dtb_ipa: ram.ipa,
        entry_ipa: ram.ipa + PAYLOAD_OFFSET,
    }
}

/// Where the initrd goes, from the start of the VM's first RAM region: after the payload's
/// whole memory image (an arm64 Image header's `image_size` at byte 16 covers its .bss too),
/// 2 MiB aligned.
fn initrd_offset(payload: &[u8]) -> u64 {
    let image_size = payload
        .get(16..24)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .unwrap_or(0);
    let span = image_size.max(payload.len() as u64);
    (PAYLOAD_OFFSET + span).next_multiple_of(2 << 20)
}

fn start_secondaries(machine: &Machine, me: usize) {
    let Some(psci) = machine.psci.as_ref() else {
        if machine.cpus.len() > 1 {
            warn!("no PSCI in the device tree: running on the boot CPU only");
        }
        return;
    };
    let conduit = match psci.method {
        dt::Conduit::Smc => platform::Conduit::Smc,
        dt::Conduit::Hvc => platform::Conduit::Hvc,
    };
    let regs = mmu::el2_regs(ROOT.load(Ordering::Relaxed));
    let cpus = CPUS.get().expect("CPUs");
    for (i, cpu) in cpus.iter().enumerate() {
        if i == me {
            cpu.online.store(true, Ordering::Release);
            continue;
        }
        let stack = Box::leak(alloc::vec![0u8; STACK_SIZE].into_boxed_slice());
        let boot_args = Box::leak(Box::new(boot::SecondaryBoot {
            mair: regs.mair,
            tcr: regs.tcr,
            ttbr0: regs.ttbr0,
            sctlr: regs.sctlr,
            stack_top: stack.as_ptr() as u64 + STACK_SIZE as u64,
            cpu_index: i as u64,
        }));
        let ptr = boot_args as *const boot::SecondaryBoot as u64;
        sysreg::clean_dcache_range(ptr, core::mem::size_of::<boot::SecondaryBoot>() as u64);
        if let Err(e) = platform::cpu_on(conduit, cpu.mpidr, boot::secondary_entry_pa(), ptr) {
            fatal(format_args!(
                "PSCI CPU_ON for CPU {i} (MPIDR {:#x}) failed: {e:?}",
                cpu.mpidr
            ));
        }
        let freq = sysreg::counter_freq();
        let start = sysreg::counter();
        while !cpu.online.load(Ordering::Acquire) {
            if sysreg::counter() - start > freq {
                fatal(format_args!(
                    "CPU {i} (MPIDR {:#x}) did not come up within 1 s",
                    cpu.mpidr
                ));
            }
            core::hint::spin_loop();
        }
    }
    info!("all {} CPUs online", cpus.len());
}

#[unsafe(no_mangle)]
extern "C" fn secondary_main(boot_args: &boot::SecondaryBoot) -> ! {
    let i = boot_args.cpu_index as usize;
    let machine = MACHINE.get().expect("machine");
    init_cpu_interrupts(machine, &gic_layout(machine));
    CPUS.get().expect("CPUs")[i]
        .online
        .store(true, Ordering::Release);
    run_cpu(i)
}

fn run_cpu(index: usize) -> ! {
    let cpu = &CPUS.get().expect("CPUs")[index];
    if let Some((vm, v)) = cpu.owner {
        run_vcpu(&VMS.get().expect("VMs")[vm], v);
    }
    park()
}

/// A pCPU with nothing to run: sleeps, but still takes its interrupts (an autosuspend timer it
/// armed for the SMMU).
fn park() -> ! {
    platform::irq_enable();
    loop {
        platform::wfi();
    }
}

/// Runs vCPU `v` of `vm` on this pCPU until the VM stops.
fn run_vcpu(vm: &Vm, v: usize) {
    let regs: &mut GuestRegs = Box::leak(Box::default());
    // SAFETY: the stage 2 was fully built before any CPU started; `regs` is leaked, so it lives
    // as long as the vCPU.
    unsafe {
        hw::configure(&vm.s2regs, v);
        hw::set_current_regs(regs);
    }
    let (mut entry, mut x0) = (vm.entry_ipa, vm.dtb_ipa);
    if v != 0 {
        match wait_for_cpu_on(vm, v) {
            Some(e) => (entry, x0) = e,
            None => return,
        }
    }
    loop {
        hw::reset_el1();
        irq::reset_vcpu_interface();
        *regs = GuestRegs::default();
        regs.x[0] = x0;
        regs.elr = entry;
        regs.spsr = hw::SPSR_EL1H_MASKED;
        if !run_until_off(vm, v, regs) {
            return;
        }
        match wait_for_cpu_on(vm, v) {
            Some(e) => (entry, x0) = e,
            None => return,
        }
    }
}

/// Waits (WFE) until another vCPU turns this one on; `None` if the VM stops first.
fn wait_for_cpu_on(vm: &Vm, v: usize) -> Option<(u64, u64)> {
    loop {
        if vm.state.stopped().is_some() {
            return None;
        }
        if let Some(e) = vm.psci.take_pending_entry(v) {
            return Some(e);
        }
        // Interrupts open while waiting: the autosuspend timer this CPU may have armed.
        platform::irq_enable();
        sysreg::wfe();
        platform::irq_disable();
    }
}

/// Runs the guest until CPU_OFF (true) or until the VM stops (false).
fn run_until_off(vm: &Vm, v: usize, regs: &mut GuestRegs) -> bool {
    let lrs = &mut irq::HwLrs::new();
    let cpu = &CPUS.get().expect("CPUs")[vm.pcpus[v]];
    loop {
        if vm.state.stopped().is_some() {
            return false;
        }
        vm.vgic.flush(v, lrs);
        irq::maintenance_done(cpu);
        // SAFETY: configured for this VM in `run_vcpu`; TPIDR_EL2 points at `regs`.
        let reason = unsafe { enter_guest(regs) };
        vm.vgic.sync(v, lrs);
        match reason {
            ExitReason::Sync => match handle_sync(vm, v, regs) {
                Flow::Continue => {}
                Flow::CpuOff => return true,
            },
            ExitReason::Irq => {
                ExitCounters::bump(&vm.exits.irq);
                handle_irq();
            }
            ExitReason::Fiq | ExitReason::SError | ExitReason::AArch32 => {
                stop_vm(
                    vm,
                    StopReason::Crashed,
                    format_args!("{reason:?} exception from vCPU {v}"),
                );
            }
        }
    }
}

enum Flow {
    Continue,
    CpuOff,
}

fn handle_sync(vm: &Vm, v: usize, regs: &mut GuestRegs) -> Flow {
    let (esr, far, hpfar) = hw::trap_syndrome();
    match trap::decode(esr, far, hpfar) {
        Trap::Hvc { .. } => {
            ExitCounters::bump(&vm.exits.calls);
            return psci_call(vm, v, regs);
        }
        Trap::Smc { .. } => {
            ExitCounters::bump(&vm.exits.calls);
            regs.elr += trap::instruction_len(esr);
            return psci_call(vm, v, regs);
        }
        Trap::DataAbort(abort) => {
            // Emulated devices first: they are the common case on this path, and their IPAs are
            // never in the stage 2, so the spurious-fault check below would only cost a walk.
            let emulated = vm.mmio.find(abort.ipa).is_some();
            let why = match abort.access {
                Some(access) if emulated => {
                    let value = access.reg_index().map_or(0, |r| regs.x[r]);
                    ExitCounters::bump(&vm.exits.mmio);
                    match vm.mmio.dispatch(v, abort.ipa, &access, value) {
                        Ok(loaded) => {
                            if let (Some(val), Some(r)) = (loaded, access.reg_index()) {
                                regs.x[r] = val;
                            }
                            regs.elr += trap::instruction_len(esr);
                            return Flow::Continue;
                        }
                        Err(e) => alloc::format!("{e}"),
                    }
                }
                None if emulated => "access the hypervisor cannot emulate (no syndrome)".into(),
                _ if retry_fault(vm, abort.ipa, abort.dfsc) => return Flow::Continue,
                _ => "the VM does not own this address".into(),
            };
            inject_abort(
                vm,
                v,
                regs,
                AbortKind::Data,
                abort.far,
                format_args!(
                    "{} of IPA {:#x}: {why}",
                    if abort.write { "write" } else { "read" },
                    abort.ipa
                ),
            );
        }
        Trap::InstructionAbort { ipa, fsc } if retry_fault(vm, ipa, fsc) => {}
        Trap::InstructionAbort { ipa, .. } => {
            inject_abort(
                vm,
                v,
                regs,
                AbortKind::Instruction,
                far,
                format_args!("instruction fetch from IPA {ipa:#x}"),
            );
        }
        Trap::Wfx { wfe } => {
            regs.elr += trap::instruction_len(esr);
            ExitCounters::bump(&vm.exits.wfi);
            if !wfe {
                irq::wait_for_interrupt(vm, v);
            }
        }
        // ICC_SGI1R_EL1 (op0 3, op1 0, CRn 12, CRm 11, op2 5): the guest sends SGIs. Group-0
        // and alternate-group SGIs (op2 7, 6) do not exist for a guest with group 1 only.
        Trap::SysReg {
            op0: 3,
            op1: 0,
            crn: 12,
            crm: 11,
            op2: op2 @ 5..=7,
            rt,
            read: false,
        } => {
            ExitCounters::bump(&vm.exits.sgi);
            if op2 == 5 {
                let value = if rt == 31 { 0 } else { regs.x[rt as usize] };
                vm.vgic.write_sgi1r(v, value);
            }
            regs.elr += trap::instruction_len(esr);
        }
        other => {
            stop_vm(
                vm,
                StopReason::Crashed,
                format_args!(
                    "vCPU {v}: unhandled exception {other:?} at pc {:#x}",
                    regs.elr
                ),
            );
        }
    }
    Flow::Continue
}

/// Stage-2 faults that resolve themselves: the IPA is mapped again by the time we look (the
/// window of a break-before-make split, or a fault on an entry another vCPU just installed), or
/// a TLB conflict abort after a direct block split. The guest simply retries the access.
fn retry_fault(vm: &Vm, ipa: u64, fsc: u8) -> bool {
    const TLB_CONFLICT: u8 = 0x30;
    if fsc == TLB_CONFLICT {
        cpu_tlb::local_flush_current_vmid();
        return true;
    }
    vm.stage2.table.translate(ipa).is_some()
}

fn inject_abort(
    vm: &Vm,
    v: usize,
    regs: &mut GuestRegs,
    kind: AbortKind,
    far: u64,
    why: core::fmt::Arguments<'_>,
) {
    ExitCounters::bump(&vm.exits.aborts);
    info!(
        "injected abort into VM {:?} vCPU {v} at pc {:#x}: {why}",
        vm.config.name, regs.elr
    );
    let state = GuestExcState {
        elr_el2: regs.elr,
        spsr_el2: regs.spsr,
        vbar_el1: hw::guest_vbar(),
        sctlr_el1: hw::guest_sctlr(),
    };
    let inj = trap::inject_sync_abort(&state, kind, far);
    hw::apply_injection(&inj);
    regs.elr = inj.elr_el2;
    regs.spsr = inj.spsr_el2;
}

fn psci_call(vm: &Vm, v: usize, regs: &mut GuestRegs) -> Flow {
    let fid = regs.x[0] as u32;
    if let Some(call) = hyptest::decode(fid, regs.x[1], regs.x[2]) {
        regs.x[0] = test_call(vm, call, regs);
        return Flow::Continue;
    }
    match vm
        .psci
        .handle_call(v, fid, [regs.x[1], regs.x[2], regs.x[3]])
    {
        PsciOutcome::Return(x0) => regs.x[0] = x0,
        PsciOutcome::CpuOnStarted { target, ret } => {
            regs.x[0] = ret;
            sysreg::sev();
            let _ = target;
        }
        PsciOutcome::CpuOff => return Flow::CpuOff,
        PsciOutcome::SystemOff => stop_vm(vm, StopReason::PoweredOff, format_args!("SYSTEM_OFF")),
        PsciOutcome::SystemReset => {
            stop_vm(vm, StopReason::ResetRequested, format_args!("SYSTEM_RESET"))
        }
    }
    Flow::Continue
}

/// The test hypercalls: unmap part of the VM's RAM from its live stage 2 (with TLB maintenance on
/// every agent), map it back to the same backing memory, or read the SMMU power counters (into
/// x1..x3).
fn test_call(vm: &Vm, call: HypTestCall, regs: &mut GuestRegs) -> u64 {
    if !vm.config.test_services {
        return hyptest::NOT_SUPPORTED;
    }
    let (ipa, size, unmap) = match call {
        HypTestCall::Unmap { ipa, size } => (ipa, size, true),
        HypTestCall::Map { ipa, size } => (ipa, size, false),
        HypTestCall::PowerStats => {
            let Some(s) = power::stats().filter(|_| vm.vsmmu.is_some()) else {
                return hyptest::NOT_SUPPORTED;
            };
            regs.x[1] = s.power_downs;
            regs.x[2] = s.power_ups;
            regs.x[3] = s.tlbi_skipped;
            return 0;
        }
    };
    let Some(pa) = hyptest::backing(vm.config.memory, ipa, size) else {
        return hyptest::INVALID_PARAMETERS;
    };
    let result = if unmap {
        vm.stage2
            .unmap_sync(ipa, size)
            .map(|_| ())
            .map_err(|e| alloc::format!("{e}"))
    } else {
        vm.stage2
            .table
            .map(ipa, pa, size, Attrs::RWX)
            .map_err(|e| alloc::format!("{e}"))
    };
    match result {
        Ok(()) => {
            info!("VM {:?}: test hypercall {call:x?} done", vm.config.name);
            0
        }
        Err(e) => {
            info!(
                "VM {:?}: test hypercall {call:x?} refused: {e}",
                vm.config.name
            );
            hyptest::INVALID_PARAMETERS
        }
    }
}

/// A master's activity when the SMMU has no power domain: nothing to switch.
struct AlwaysPowered;

impl ActivitySink for AlwaysPowered {
    fn set_active(&self, _active: bool) -> Result<(), crate::power::PowerError> {
        Ok(())
    }
}

/// Stops a VM (once), kicks its other vCPUs out of the guest, and ends the run after the last VM.
/// Its devices stop too: bus mastering off, power votes dropped (so the SMMU may power down).
fn stop_vm(vm: &Vm, reason: StopReason, detail: core::fmt::Arguments<'_>) {
    if !vm.state.stop(reason) {
        return;
    }
    if let Some(e) = &vm.ecam {
        e.quiesce();
    }
    if let Some(p) = &vm.power_ctrl {
        p.quiesce();
    }
    vm.vgic.release_phys();
    power::schedule_autosuspend();
    if let Some(c) = &vm.console {
        c.flush();
    }
    let name = vm.config.name;
    match reason {
        StopReason::PoweredOff => info!("{name}: powered off"),
        StopReason::ResetRequested => info!("{name}: reset requested ({detail})"),
        StopReason::Crashed => error!("{name}: crashed: {detail}"),
    }
    let cpus = CPUS.get().expect("CPUs");
    let me = sysreg::mpidr();
    for &p in &vm.pcpus {
        if cpus[p].mpidr != me {
            gic::send_sgi(gic::SGI_KICK, cpus[p].mpidr);
        }
    }
    sysreg::sev();
    if let Some(status) = TRACKER.get().expect("tracker").vm_stopped(reason) {
        end_run(status);
    }
}

fn end_run(mut status: u32) -> ! {
    let image = boot::image_layout();
    if image_checksum(&image) == IMAGE_SUM.load(Ordering::Relaxed) {
        info!("image integrity OK");
    } else {
        error!("the hypervisor's code or read-only data changed during the run");
        status = status.max(run::EXIT_HYP_PANIC);
    }
    for vm in VMS.get().into_iter().flatten() {
        let e = &vm.exits;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        info!(
            "{}: guest exits: {} MMIO, {} HVC/SMC, {} WFI, {} SGI writes, {} interrupts, {} aborts injected",
            vm.config.name,
            n(&e.mmio),
            n(&e.calls),
            n(&e.wfi),
            n(&e.sgi),
            n(&e.irq),
            n(&e.aborts)
        );
        if let Some(v) = &vm.vsmmu {
            let st = v.stats();
            info!(
                "{}: vSMMU traps: {} CMDQ_PROD writes, {} CMDQ_CONS reads, {} other reads, {} other writes; {} commands ({} forwarded, {} rejected), {} STEs installed, {} events injected",
                vm.config.name,
                st.prod_writes,
                st.cons_reads,
                st.other_reads,
                st.other_writes,
                st.commands,
                st.commands_forwarded,
                st.commands_rejected,
                st.stes_installed,
                st.events_injected
            );
        }
    }
    if let Some(h) = SMMU.get().and_then(Option::as_ref) {
        info!("SMMU command queue: {:?}", h.cmdq.stats());
    }
    power::report();
    info!("all VMs stopped, exit status {status}");
    finish(status)
}

#[unsafe(no_mangle)]
extern "C" fn not_el2_main(dtb: u64, _load_base: u64) -> ! {
    // SAFETY: the boot heap is used only here, once.
    unsafe {
        HEAP.lock()
            .init(&raw mut BOOT_HEAP as usize, BOOT_HEAP_SIZE)
    };
    init_early_console();
    let _ = dtb;
    fatal(format_args!(
        "entered at EL1, not EL2: EL2 is not available (the firmware kept it, or QEMU runs \
         without virtualization=on); this hypervisor needs EL2 and stops here"
    ))
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    platform::irq_disable();
    match info.location() {
        Some(l) => console::emergency_line(format_args!(
            "hyp: PANIC at {}:{}: {}",
            l.file(),
            l.line(),
            info.message()
        )),
        None => console::emergency_line(format_args!("hyp: PANIC: {}", info.message())),
    }
    finish(run::EXIT_HYP_PANIC)
}
