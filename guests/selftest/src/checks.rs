//! The checks. Each returns a [`CheckResult`]; `main.rs` names and records
//! them.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};

use crate::arch::{self, mmio_read32, wait_until};
use crate::boot;
use crate::console::{UART_BASE, UARTFR, println};
use crate::dt::{DtInfo, MAX_DT_CPUS};
use crate::exception::{self, Taken};
use crate::psci::{self, Conduit};
use crate::report::{CheckResult, Msg, Report, ensure, fail};

/// How long to wait for other vCPUs.
const TIMEOUT_MS: u64 = 5000;

// ---------------------------------------------------------------- dtb

/// The DT parses, lists a cpu, a memory node holding the image and a PSCI
/// node using `hvc`.
pub fn dtb(dt: &Result<DtInfo, Msg>) -> CheckResult {
    let dt = match dt {
        Ok(dt) => dt,
        Err(why) => fail!("{why}"),
    };
    ensure!(dt.ncpus >= 1, "no cpu nodes under /cpus");
    let (start, end) = boot::image_range();
    let Some((base, size)) = dt.ram else {
        fail!("no /memory region")
    };
    ensure!(
        base <= start && end <= base.saturating_add(size),
        "image {start:#x}..{end:#x} is not inside /memory {base:#x}+{size:#x}"
    );
    match dt.psci_method {
        Some("hvc") => Ok(()),
        Some(m) => fail!("psci method is {m:?}, want \"hvc\""),
        None => fail!("no psci node with a method"),
    }
}

// ---------------------------------------------------------------- PSCI

/// PSCI_VERSION >= 1.0.
pub fn psci_version() -> CheckResult {
    let v = psci::version();
    ensure!(
        (0x1_0000..0x8000_0000).contains(&v),
        "PSCI_VERSION = {v:#x}, want >= 1.0"
    );
    Ok(())
}

/// SMCCC_VERSION >= 1.0.
pub fn smccc_version() -> CheckResult {
    let v = psci::query(Conduit::Hvc, psci::SMCCC_VERSION, 0) & 0xffff_ffff;
    ensure!(
        (0x1_0000..0x8000_0000).contains(&v),
        "SMCCC_VERSION = {v:#x}, want >= 1.0"
    );
    Ok(())
}

/// Unknown function IDs return NOT_SUPPORTED (-1, sign-extended for SMC64;
/// in w0 for SMC32).
pub fn smccc_unknown() -> CheckResult {
    for fid in [0xc200_0000u32, 0x8600_ff00] {
        let r = psci::query(Conduit::Hvc, fid, 0);
        let ok = if fid & (1 << 30) != 0 {
            r == u64::MAX
        } else {
            r as u32 == u32::MAX
        };
        ensure!(
            ok,
            "function {fid:#x} returned {r:#x}, want NOT_SUPPORTED (-1)"
        );
    }
    Ok(())
}

/// PSCI_FEATURES knows CPU_ON64 and rejects an unassigned PSCI function.
pub fn psci_features() -> CheckResult {
    let r = psci::status(psci::query(
        Conduit::Hvc,
        psci::PSCI_FEATURES,
        psci::CPU_ON64.into(),
    ));
    ensure!(r == 0, "PSCI_FEATURES(CPU_ON64) = {r}, want 0");
    let r = psci::status(psci::query(Conduit::Hvc, psci::PSCI_FEATURES, 0x8400_00ff));
    ensure!(
        r == psci::NOT_SUPPORTED,
        "PSCI_FEATURES(0x840000ff) = {r}, want NOT_SUPPORTED (-1)"
    );
    Ok(())
}

/// `smc #0` reaches the same PSCI implementation as `hvc #0`.
pub fn psci_smc() -> CheckResult {
    let hvc = psci::version();
    let smc = psci::query(Conduit::Smc, psci::PSCI_VERSION, 0) & 0xffff_ffff;
    ensure!(
        smc == hvc,
        "PSCI_VERSION via smc = {smc:#x}, via hvc = {hvc:#x}"
    );
    Ok(())
}

// ---------------------------------------------------------------- smp

/// Context ids passed to CPU_ON: magic | index into the DT cpu list.
const CONTEXT_MAGIC: u64 = 0x5e1f_0000_0000;
/// Number of times secondaries have run.
static RUNS: AtomicU32 = AtomicU32::new(0);
/// MPIDR reported by the secondary started for each DT cpu index.
static SEEN: [AtomicU64; MAX_DT_CPUS] = [const { AtomicU64::new(u64::MAX) }; MAX_DT_CPUS];
/// A secondary got a context id it did not expect (stored in BAD_CONTEXT).
static BAD: AtomicBool = AtomicBool::new(false);
static BAD_CONTEXT: AtomicU64 = AtomicU64::new(0);

/// Rust entry of secondary vCPUs (from `boot.rs`, stack and MMU set up).
#[unsafe(no_mangle)]
extern "C" fn selftest_secondary_main(context: u64) -> ! {
    let index = (context & 0xffff) as usize;
    if context & !0xffff == CONTEXT_MAGIC && index < MAX_DT_CPUS {
        SEEN[index].store(arch::my_mpidr(), SeqCst);
    } else {
        BAD_CONTEXT.store(context, SeqCst);
        BAD.store(true, SeqCst);
    }
    RUNS.fetch_add(1, SeqCst);
    let r = psci::cpu_off();
    println!("selftest: CPU_OFF on {:#x} returned {r}", arch::my_mpidr());
    psci::park()
}

fn wait_off(mpidr: u64) -> CheckResult {
    let mut last = 0;
    let off = wait_until(TIMEOUT_MS, || {
        last = psci::affinity_info(mpidr);
        last == psci::AFF_OFF
    });
    ensure!(
        off,
        "AFFINITY_INFO({mpidr:#x}) = {last} 5 s after CPU_OFF, want OFF (1)"
    );
    Ok(())
}

fn start_and_check(cpus: &[(usize, u64)]) -> CheckResult {
    let before = RUNS.load(SeqCst);
    for &(index, mpidr) in cpus {
        SEEN[index].store(u64::MAX, SeqCst);
        let r = psci::cpu_on(mpidr, CONTEXT_MAGIC | index as u64);
        ensure!(r == 0, "CPU_ON({mpidr:#x}) = {r}, want 0");
    }
    let want = cpus.len() as u32;
    let ran = wait_until(TIMEOUT_MS, || {
        RUNS.load(SeqCst).wrapping_sub(before) >= want
    });
    ensure!(
        ran,
        "only {} of {want} secondaries ran within 5 s",
        RUNS.load(SeqCst).wrapping_sub(before)
    );
    ensure!(
        !BAD.load(SeqCst),
        "a secondary got context id {:#x}",
        BAD_CONTEXT.load(SeqCst)
    );
    for &(index, mpidr) in cpus {
        let seen = SEEN[index].load(SeqCst);
        ensure!(
            seen == mpidr,
            "vCPU started for {mpidr:#x} has MPIDR {seen:#x}"
        );
    }
    for &(_, mpidr) in cpus {
        wait_off(mpidr)?;
    }
    Ok(())
}

/// CPU_ON / CPU_OFF / AFFINITY_INFO on every other vCPU of the DT.
pub fn smp(dt: &DtInfo) -> CheckResult {
    let me = arch::my_mpidr();
    let all = dt.cpu_mpidrs();
    ensure!(
        dt.ncpus <= MAX_DT_CPUS,
        "{} cpus in the DT, this test handles {MAX_DT_CPUS}",
        dt.ncpus
    );
    ensure!(all.contains(&me), "own MPIDR {me:#x} is not in the DT");
    let mut others = [(0, 0); MAX_DT_CPUS];
    let mut n = 0;
    for (index, &mpidr) in all.iter().enumerate().filter(|&(_, &m)| m != me) {
        others[n] = (index, mpidr);
        n += 1;
    }
    let others = &others[..n];

    start_and_check(others)?;

    let r = psci::cpu_on(me, CONTEXT_MAGIC);
    ensure!(
        r == psci::ALREADY_ON,
        "CPU_ON(self {me:#x}) = {r}, want ALREADY_ON (-4)"
    );

    let mut bogus = dt.ncpus as u64;
    while all.contains(&bogus) {
        bogus += 1;
    }
    let r = psci::cpu_on(bogus, CONTEXT_MAGIC);
    ensure!(
        r == psci::INVALID_PARAMETERS,
        "CPU_ON(nonexistent {bogus:#x}) = {r}, want INVALID_PARAMETERS (-2)"
    );

    // A vCPU that did CPU_OFF must start again.
    if let Some(first) = others.first() {
        start_and_check(core::slice::from_ref(first))
            .map_err(|why| Msg::new(format_args!("restart: {why}")))?;
    }
    Ok(())
}

// ---------------------------------------------------------------- memory

const PAGE: usize = 4096;
const BLOCK: usize = 64 * 1024;

fn pattern(addr: usize) -> u64 {
    (addr as u64).rotate_left(17) ^ 0xa5a5_5a5a_c3c3_3c3c
}

/// Writes and reads back every page of RAM above the image (one u64 per
/// page, at a varying offset) and all of one 64 KiB block, skipping the DTB.
pub fn memory(dt: &DtInfo) -> CheckResult {
    let Some((base, size)) = dt.ram else {
        fail!("no /memory region")
    };
    let top = base.saturating_add(size) & !(PAGE - 1);
    let start = boot::image_range().1.next_multiple_of(PAGE);
    let dtb = (
        dt.addr & !(PAGE - 1),
        (dt.addr + dt.size).next_multiple_of(PAGE),
    );
    let usable = |page: usize| page + PAGE <= dtb.0 || page >= dtb.1;
    ensure!(
        start + BLOCK <= top,
        "no RAM above the image: image ends {start:#x}, RAM ends {top:#x}"
    );
    let word = |page: usize| page + ((page / PAGE) % (PAGE / 8)) * 8;

    let pages = || (start..top).step_by(PAGE).filter(|&p| usable(p));
    for page in pages() {
        let p = word(page);
        // SAFETY: `p` is an aligned word of guest RAM above the image and
        // outside the DTB; nothing else in this guest uses that memory.
        unsafe { (p as *mut u64).write_volatile(pattern(p)) };
    }
    let mut count = 0usize;
    for page in pages() {
        let p = word(page);
        // SAFETY: as above.
        let got = unsafe { (p as *const u64).read_volatile() };
        ensure!(
            got == pattern(p),
            "{p:#x}: read {got:#x}, wrote {:#x}",
            pattern(p)
        );
        count += 1;
    }

    let block = (start..=top - BLOCK)
        .step_by(BLOCK)
        .find(|&b| (b..b + BLOCK).step_by(PAGE).all(usable));
    let Some(block) = block else {
        fail!("no 64 KiB block of free RAM")
    };
    for p in (block..block + BLOCK).step_by(8) {
        // SAFETY: as above (the block is free RAM above the image).
        unsafe { (p as *mut u64).write_volatile(!pattern(p)) };
    }
    for p in (block..block + BLOCK).step_by(8) {
        // SAFETY: as above.
        let got = unsafe { (p as *const u64).read_volatile() };
        ensure!(
            got == !pattern(p),
            "{p:#x}: read {got:#x}, wrote {:#x}",
            !pattern(p)
        );
    }
    println!("selftest: memory: {count} pages in {start:#x}..{top:#x} and 64 KiB at {block:#x} ok");
    Ok(())
}

// ---------------------------------------------------------------- fpsimd

/// v0..v31 (64 words) followed by FPCR/FPSR before and after the HVC.
#[repr(C, align(16))]
struct FpState([u64; 68]);

// FPCR: AHP, DN, FZ, RMode = round towards minus infinity.
const FPCR_PATTERN: u64 = (1 << 26) | (1 << 25) | (1 << 24) | (2 << 22);
// FPSR: QC and all cumulative exception flags.
const FPSR_PATTERN: u64 = (1 << 27) | 0x9f;

/// v0-v31, FPCR and FPSR survive an HVC.
pub fn fpsimd() -> CheckResult {
    let mut input = FpState([0; 68]);
    for (i, w) in input.0.iter_mut().enumerate() {
        let i = i as u64;
        *w = 0xf00d_0000_0000_0000 | (i << 40) | ((i * 0x0101_0101) ^ 0x5a5a_5a5a);
    }
    let mut out = FpState([0; 68]);
    let saved_fpcr: u64;
    // SAFETY: reading FPCR has no side effects.
    unsafe { asm!("mrs {}, fpcr", out(reg) saved_fpcr, options(nomem, nostack, preserves_flags)) };
    let version: u64;
    // SAFETY: loads/stores stay within `input` and `out` (x20/x21, 16-byte
    // aligned, 68 words); PSCI_VERSION has no side effects; every vector
    // register and every register SMCCC may clobber is declared.
    unsafe {
        asm!(
            "msr fpcr, {fpcr}",
            "msr fpsr, {fpsr}",
            "mrs x22, fpcr",
            "str x22, [x21, #512]",
            "mrs x22, fpsr",
            "str x22, [x21, #520]",
            "ldp q0, q1, [x20, #0]",
            "ldp q2, q3, [x20, #32]",
            "ldp q4, q5, [x20, #64]",
            "ldp q6, q7, [x20, #96]",
            "ldp q8, q9, [x20, #128]",
            "ldp q10, q11, [x20, #160]",
            "ldp q12, q13, [x20, #192]",
            "ldp q14, q15, [x20, #224]",
            "ldp q16, q17, [x20, #256]",
            "ldp q18, q19, [x20, #288]",
            "ldp q20, q21, [x20, #320]",
            "ldp q22, q23, [x20, #352]",
            "ldp q24, q25, [x20, #384]",
            "ldp q26, q27, [x20, #416]",
            "ldp q28, q29, [x20, #448]",
            "ldp q30, q31, [x20, #480]",
            "hvc #0",
            "stp q0, q1, [x21, #0]",
            "stp q2, q3, [x21, #32]",
            "stp q4, q5, [x21, #64]",
            "stp q6, q7, [x21, #96]",
            "stp q8, q9, [x21, #128]",
            "stp q10, q11, [x21, #160]",
            "stp q12, q13, [x21, #192]",
            "stp q14, q15, [x21, #224]",
            "stp q16, q17, [x21, #256]",
            "stp q18, q19, [x21, #288]",
            "stp q20, q21, [x21, #320]",
            "stp q22, q23, [x21, #352]",
            "stp q24, q25, [x21, #384]",
            "stp q26, q27, [x21, #416]",
            "stp q28, q29, [x21, #448]",
            "stp q30, q31, [x21, #480]",
            "mrs x22, fpcr",
            "str x22, [x21, #528]",
            "mrs x22, fpsr",
            "str x22, [x21, #536]",
            fpcr = in(reg) FPCR_PATTERN,
            fpsr = in(reg) FPSR_PATTERN,
            in("x20") input.0.as_ptr(),
            in("x21") out.0.as_mut_ptr(),
            out("x22") _,
            inout("x0") u64::from(psci::PSCI_VERSION) => version,
            out("v8") _, out("v9") _, out("v10") _, out("v11") _,
            out("v12") _, out("v13") _, out("v14") _, out("v15") _,
            clobber_abi("C"),
            options(nostack),
        );
    }
    // SAFETY: restores FPCR as it was and clears the cumulative flags.
    unsafe {
        asm!("msr fpcr, {}", "msr fpsr, xzr", in(reg) saved_fpcr, options(nomem, nostack, preserves_flags))
    };

    ensure!(
        version & 0xffff_ffff >= 0x1_0000,
        "PSCI_VERSION in the FP test returned {version:#x}"
    );
    for reg in 0..32 {
        let (lo, hi) = (out.0[2 * reg], out.0[2 * reg + 1]);
        let (want_lo, want_hi) = (input.0[2 * reg], input.0[2 * reg + 1]);
        ensure!(
            (lo, hi) == (want_lo, want_hi),
            "v{reg} = {hi:#018x}{lo:016x} after HVC, want {want_hi:#018x}{want_lo:016x}"
        );
    }
    let [fpcr_before, fpsr_before, fpcr_after, fpsr_after] = [64, 65, 66, 67].map(|i| out.0[i]);
    ensure!(
        fpcr_after == fpcr_before,
        "FPCR = {fpcr_after:#x} after HVC, was {fpcr_before:#x}"
    );
    ensure!(
        fpsr_after == fpsr_before,
        "FPSR = {fpsr_after:#x} after HVC, was {fpsr_before:#x}"
    );
    Ok(())
}

// ---------------------------------------------------------------- MMIO

/// The emulated PL011 answers 32-bit loads: UARTFR.TXFE, UARTPeriphID0.
pub fn mmio_emul() -> CheckResult {
    // SAFETY: reading UARTFR has no side effects.
    let fr = unsafe { mmio_read32(UART_BASE + UARTFR) };
    ensure!(fr & (1 << 7) != 0, "UARTFR = {fr:#x}: TXFE (bit 7) clear");
    // SAFETY: reading UARTPeriphID0 has no side effects.
    let id0 = unsafe { mmio_read32(UART_BASE + 0xfe0) };
    ensure!(id0 == 0x11, "UARTPeriphID0 = {id0:#x}, want 0x11");
    Ok(())
}

// ---------------------------------------------------------------- aborts

/// Addresses the guest does not own (the RAM end is added from the DT).
const ABORT_ADDRS: [u64; 7] = [
    0x0,            // flash
    0x0808_0000,    // the GIC ITS (the distributor is emulated; there is no virtual ITS)
    0x4020_0000,    // the hypervisor's own image (physical)
    0x4800_0000,    // host DTB
    0x5000_0000,    // other VMs' RAM
    0x5800_0000,    // other VMs' RAM
    0x80_0000_0000, // high
];

/// The outcome of one probing access.
pub(crate) struct Probe {
    /// The exception it took, if any.
    pub(crate) taken: Option<Taken>,
    /// Address of the access instruction.
    pub(crate) pc: u64,
}

/// The access took a synchronous external abort at `addr`, reported at the
/// access instruction.
pub(crate) fn expect_sea(probe: Probe, addr: u64) -> CheckResult {
    let Some(t) = probe.taken else {
        fail!("no abort")
    };
    let ec = (t.esr >> 26) & 0x3f;
    let dfsc = t.esr & 0x3f;
    ensure!(
        ec == 0x25,
        "ESR {:#x}: EC {ec:#x}, want 0x25 (data abort, same EL)",
        t.esr
    );
    ensure!(
        dfsc == 0x10,
        "ESR {:#x}: DFSC {dfsc:#x}, want 0x10 (synchronous external abort)",
        t.esr
    );
    ensure!(t.far == addr, "FAR {:#x}, want {addr:#x}", t.far);
    ensure!(
        t.elr == probe.pc,
        "ELR {:#x}, want {:#x} (the access)",
        t.elr,
        probe.pc
    );
    Ok(())
}

/// A 32-bit load from `addr`; also returns the value loaded (if not
/// aborted).
pub(crate) fn probe_read(addr: u64) -> (Probe, u32) {
    let (mut value, mut pc) = (0, 0);
    let taken = exception::expect_abort(|| {
        // SAFETY: `addr` is not memory Rust uses. If it is (wrongly) mapped,
        // the load reads a device register or memory no one here uses;
        // otherwise the armed handler steps over this single instruction.
        unsafe {
            asm!(
                "adr {pc}, 2f",
                "2: ldr {v:w}, [{a}]",
                a = in(reg) addr,
                v = out(reg) value,
                pc = out(reg) pc,
                options(nostack, preserves_flags),
            )
        };
    });
    (Probe { taken, pc }, value)
}

/// A 32-bit store of `value` to `addr`.
pub(crate) fn probe_write(addr: u64, value: u32) -> Probe {
    let mut pc = 0;
    let taken = exception::expect_abort(|| {
        // SAFETY: as for `probe_read`; if the location is (wrongly) mapped,
        // the store writes back the value just read from it.
        unsafe {
            asm!(
                "adr {pc}, 2f",
                "2: str {v:w}, [{a}]",
                a = in(reg) addr,
                v = in(reg) value,
                pc = out(reg) pc,
                options(nostack, preserves_flags),
            )
        };
    });
    Probe { taken, pc }
}

/// An `ldp` of two X registers, which the hypervisor cannot emulate (no
/// valid syndrome).
fn probe_ldp(addr: u64) -> Probe {
    let mut pc = 0;
    let taken = exception::expect_abort(|| {
        // SAFETY: `addr` is the PL011; the load is reported as an abort (or,
        // on bare hardware, reads two device words without side effects).
        unsafe {
            asm!(
                "adr {pc}, 2f",
                "2: ldp {x}, {y}, [{a}]",
                a = in(reg) addr,
                x = out(reg) _,
                y = out(reg) _,
                pc = out(reg) pc,
                options(nostack, preserves_flags),
            )
        };
    });
    Probe { taken, pc }
}

/// Loads and stores at addresses the guest does not own must take a
/// synchronous external abort with FAR = the address; so must an access to
/// emulated MMIO that has no valid syndrome.
pub fn aborts(report: &mut Report, dt: Option<&DtInfo>) {
    let ram_end = dt
        .and_then(|dt| dt.ram)
        .map(|(base, size)| (base + size) as u64)
        .filter(|end| !ABORT_ADDRS.contains(end));
    for addr in ABORT_ADDRS.into_iter().chain(ram_end) {
        let (probe, value) = probe_read(addr);
        let read_aborted = probe.taken.is_some();
        report.record(
            format_args!("abort-read {addr:#x}"),
            expect_sea(probe, addr),
        );
        // If the read was not aborted, write back what it returned.
        let value = if read_aborted { 0 } else { value };
        report.record(
            format_args!("abort-write {addr:#x}"),
            expect_sea(probe_write(addr, value), addr),
        );
    }
    let uart = UART_BASE as u64;
    report.record(
        format_args!("abort-ldp {uart:#x}"),
        expect_sea(probe_ldp(uart), uart),
    );
}
