//! The hypervisor's emulated power controller and the SMMU power check.
//!
//! A VM whose DMA masters use the "vote" activity source sees a power controller in its DT:
//! `power-controller@<ipa>` with `compatible = "hyp,gdsc-controller"`, a 4 KiB `reg`,
//! `#power-domain-cells = <1>` and `hyp,domains = <N>`, one GDSC-style domain per such master
//! (domain 0: the edu, the VM's first PCI DMA master). Registers, 32-bit:
//!
//! * 0x000 `ID` (RO) = 0x4744_5343 ("GDSC"); 0x004 `NUM_DOMAINS` (RO);
//! * 0x100 + 4 * i `GDSCR_i`: bit 0 `SW_COLLAPSE` (RW, reset 1: off), bit 31 `PWR_ON` (RO).
//!   Writing `SW_COLLAPSE` = 0 votes the domain on: the hypervisor powers the SMMU in front of
//!   the master up inside the trap, and `PWR_ON` reads 1 (0 if that failed); `SW_COLLAPSE` = 1
//!   drops the vote, and the hypervisor powers the SMMU off once no master behind it is active
//!   (after an autosuspend delay of 20 ms).
//!
//! The DMA setup (`dma.rs`) votes domain 0 on before any DMA, since the SMMU may start off.
//!
//! `smmu-power-cycle` (bootarg `selftest.power`, after the DMA and hostile checks; N cycles,
//! 100 unless `selftest.power.cycles=N`). `IOVA_DST` maps to page `DST` or page `ALT`, swapped
//! every cycle; each cycle:
//!
//! 1. votes domain 0 on and waits for `PWR_ON`; a fresh pattern goes RAM -> edu -> `IOVA_DST`
//!    and must land in the page the stage-1 table names now, not in the other one (in cycle
//!    k > 1 this proves that step 4 of cycle k-1 took effect after the power-up: no stale
//!    translation survived and the SMMU works again);
//! 2. votes it off and waits (10 s in the first cycle, when the other VM may still be using the
//!    SMMU; 2 s after that) until the hypervisor's counters (test hypercall
//!    `HYP_TEST_POWER_STATS`) show the SMMU powered down;
//! 3. with the SMMU off: both destination pages get a sentinel and the edu writes its buffer
//!    (still the pattern of step 1) to `IOVA_DST`; the edu completes (the transfer is aborted),
//!    and the sentinel must be intact in both pages;
//! 4. still off: `IOVA_DST` is remapped to the other page and invalidated with `CMD_TLBI_NH_VA`
//!    + `CMD_SYNC`; the counter of TLB invalidations skipped while off must have grown.
//!
//! Steps 3 and 4 prove something only if the SMMU stayed off throughout: the counters are read
//! again after step 4, and if any power transition happened since the power-down was seen
//! (another VM's master voted it on), steps 3 and 4 are repeated at the next power-down (at
//! most [`MAX_RETRIES`] times per cycle; the remap is idempotent). "Off" is judged from the
//! counters: before the vote off the SMMU is on (the vote holds it), transitions alternate, so
//! it is off when power-downs grew by more than power-ups since then.
//!
//! Two VMs sharing the SMMU may run this check at the same time: a power-down then needs both
//! votes off, both VMs see it and run steps 3 and 4 together, and each leaves the SMMU off for
//! [`HOLD_OFF_MS`] after a good off phase so that its next vote on does not spoil the other's.
//!
//! After the cycles: domain 0 on again, a last round trip (and, when `IOVA_DST` ended on `ALT`,
//! remapped to `DST` and one more), no SMMU events, then the summary line
//! `selftest: power: N cycles, power-downs +X, power-ups +Y, TLBIs skipped +Z`. The first
//! failure stops the check, naming the cycle. Without a power controller in the DT the check
//! fails (skipped with `selftest.bare`).

use fdt::Fdt;

use crate::arch::{Deadline, wait_until};
use crate::console::println;
use crate::dma::{self, ALT, DST, Dma, IOVA_DST, IOVA_SRC, LEN, PAGE};
use crate::pci::{read32, write32};
use crate::psci::{self, Conduit};
use crate::report::{CheckResult, Msg, Report, ensure, fail};
use crate::smmu::Cmd;

/// The check's name.
pub const CHECK: &str = "smmu-power-cycle";
/// Cycles unless `selftest.power.cycles=` says otherwise.
pub const DEFAULT_CYCLES: u32 = 100;
/// The most `selftest.power.cycles=` may ask for.
pub const MAX_CYCLES: u32 = 100_000;
/// The edu's power domain: the VM's first PCI DMA master.
pub const EDU_DOMAIN: u32 = 0;

const COMPATIBLE: &str = "hyp,gdsc-controller";
const ID: usize = 0x000;
const NUM_DOMAINS: usize = 0x004;
const GDSCR: usize = 0x100;
const ID_VALUE: u32 = 0x4744_5343;
const SW_COLLAPSE: u32 = 1 << 0;
const PWR_ON: u32 = 1 << 31;

/// How long `PWR_ON` may take after a vote on (the hypervisor powers up inside the trap).
const POWER_ON_MS: u64 = 1000;
/// How long the SMMU may take to power down after the vote off: in the first cycle the other
/// VM may still be running its DMA checks; afterwards the 20 ms autosuspend delay plus slack.
const FIRST_DOWN_MS: u64 = 10_000;
const DOWN_MS: u64 = 2000;
/// Off phases per cycle that may be spoiled by someone else powering the SMMU up.
pub const MAX_RETRIES: u32 = 20;
/// How long the SMMU is left off after an off phase that passed, before the next vote on: another
/// VM's off phase that began at the same power-down (within [`POLL_US`]) and takes as long (one
/// edu transfer) then ends before this VM's vote can spoil it.
const HOLD_OFF_MS: u64 = 50;
/// Interval between reads of the counters while waiting for a power-down.
const POLL_US: u64 = 50;
/// What the destination pages hold where no DMA may land.
const SENTINEL: u8 = 0xe7;

/// Vendor-specific hypervisor service (SMCCC owner 6, fast, SMC64): x1 = power-downs, x2 =
/// power-ups, x3 = TLB invalidations skipped while off, of the SMMU in front of this VM.
const HYP_TEST_POWER_STATS: u32 = 0xc600_0003;

/// The emulated power controller.
#[derive(Clone, Copy)]
pub struct PowerCtrl {
    base: usize,
    domains: u32,
}

impl PowerCtrl {
    /// The controller the DT describes, if any; checks its ID and domain count.
    pub fn from_dt(fdt: &Fdt<'_>) -> Result<Option<Self>, Msg> {
        let Some(node) = fdt.find_compatible(&[COMPATIBLE]) else {
            return Ok(None);
        };
        let name = node.name;
        let Some(reg) = node.reg().and_then(|mut r| r.next()) else {
            fail!("{name}: no usable reg");
        };
        let base = reg.starting_address as usize;
        let size = reg.size.unwrap_or(0);
        ensure!(
            base.is_multiple_of(4) && size >= GDSCR + 4,
            "{name}: reg {base:#x}+{size:#x} cannot hold the registers"
        );
        if let Some(cells) = node
            .property("#power-domain-cells")
            .and_then(|p| p.as_usize())
        {
            ensure!(cells == 1, "{name}: #power-domain-cells = {cells}, want 1");
        }
        let mut pc = PowerCtrl { base, domains: 0 };
        let id = pc.read(ID);
        ensure!(id == ID_VALUE, "{name}: ID = {id:#x}, want {ID_VALUE:#x}");
        let n = pc.read(NUM_DOMAINS);
        if let Some(dt_n) = node.property("hyp,domains").and_then(|p| p.as_usize()) {
            ensure!(
                dt_n == n as usize,
                "{name}: hyp,domains = {dt_n}, but NUM_DOMAINS = {n}"
            );
        }
        ensure!(
            n > EDU_DOMAIN,
            "{name}: NUM_DOMAINS = {n}: no domain for the edu"
        );
        ensure!(
            GDSCR + 4 * n as usize <= size,
            "{name}: {n} domains do not fit reg size {size:#x}"
        );
        pc.domains = n;
        Ok(Some(pc))
    }

    pub fn base(&self) -> usize {
        self.base
    }

    pub fn domains(&self) -> u32 {
        self.domains
    }

    fn read(&self, off: usize) -> u32 {
        // SAFETY: an aligned 32-bit register of the power controller the DT describes (Device
        // memory in the boot map); reading it has no side effects.
        unsafe { read32(self.base + off) }
    }

    fn gdscr(&self, domain: u32) -> u32 {
        self.read(GDSCR + 4 * domain as usize)
    }

    /// Votes `domain` on or off (without waiting).
    pub fn vote(&self, domain: u32, on: bool) {
        let v = if on { 0 } else { SW_COLLAPSE };
        // SAFETY: a GDSCR of the controller; a vote changes only power, never memory.
        unsafe { write32(self.base + GDSCR + 4 * domain as usize, v) };
    }

    /// Votes `domain` on and waits for `PWR_ON`.
    pub fn power_on(&self, domain: u32) -> CheckResult {
        ensure!(
            domain < self.domains,
            "no power domain {domain} ({} domains)",
            self.domains
        );
        self.vote(domain, true);
        let v = self.gdscr(domain);
        ensure!(
            v & SW_COLLAPSE == 0,
            "domain {domain}: vote on did not stick (GDSCR = {v:#x})"
        );
        ensure!(
            wait_until(POWER_ON_MS, || self.gdscr(domain) & PWR_ON != 0),
            "domain {domain}: PWR_ON still 0 {POWER_ON_MS} ms after the vote on (GDSCR = {:#x})",
            self.gdscr(domain)
        );
        Ok(())
    }
}

/// The hypervisor's counters of the SMMU's power domain.
#[derive(Clone, Copy)]
struct Stats {
    downs: u64,
    ups: u64,
    tlbi_skipped: u64,
}

impl Stats {
    fn get() -> Result<Self, Msg> {
        // SAFETY: HYP_TEST_POWER_STATS only returns counters; it changes nothing of this VM.
        let [x0, x1, x2, x3] =
            unsafe { psci::call_regs(Conduit::Hvc, HYP_TEST_POWER_STATS, 0, 0, 0) };
        match psci::status(x0) {
            0 => Ok(Stats {
                downs: x1,
                ups: x2,
                tlbi_skipped: x3,
            }),
            psci::NOT_SUPPORTED => {
                fail!("HYP_TEST_POWER_STATS: NOT_SUPPORTED (no test services or SMMU power domain)")
            }
            r => fail!("HYP_TEST_POWER_STATS returned {r}"),
        }
    }

    /// Whether the SMMU is off, given counters `on` read while it was held on: transitions
    /// alternate, so it is off when more power-downs than power-ups happened since.
    fn off_since(&self, on: &Stats) -> bool {
        self.downs.wrapping_sub(on.downs) > self.ups.wrapping_sub(on.ups)
    }

    /// Whether no power transition happened between `self` and `later`.
    fn steady_until(&self, later: &Stats) -> bool {
        self.downs == later.downs && self.ups == later.ups
    }
}

/// Prints the counters' growth since `start`, after `what`.
fn summary(what: core::fmt::Arguments<'_>, start: &Stats) {
    if let Ok(now) = Stats::get() {
        println!(
            "selftest: power: {what}, power-downs +{}, power-ups +{}, TLBIs skipped +{}",
            now.downs.wrapping_sub(start.downs),
            now.ups.wrapping_sub(start.ups),
            now.tlbi_skipped.wrapping_sub(start.tlbi_skipped)
        );
    }
}

/// The page `IOVA_DST` does not map to when it maps to `page`.
fn other(page: usize) -> usize {
    if page == DST { ALT } else { DST }
}

/// A pattern seed per cycle (consecutive cycles differ).
fn seed(cycle: u32) -> u8 {
    (cycle as u8).wrapping_mul(0x35) ^ 0xa7
}

/// Runs `smmu-power-cycle` and records it.
pub fn run(report: &mut Report, dma: &mut Dma, cycles: u32, bare: bool) {
    match dma.power {
        Some(pc) => report.record(CHECK, power_cycles(dma, pc, cycles)),
        None if bare => report.skip(CHECK, "selftest.bare: no hypervisor power controller"),
        None => report.record(
            CHECK,
            Err(Msg::new(format_args!(
                "selftest.power given, but the DT has no {COMPATIBLE} node"
            ))),
        ),
    }
}

/// The whole check.
fn power_cycles(dma: &mut Dma, pc: PowerCtrl, cycles: u32) -> CheckResult {
    let start = Stats::get()?;
    // A known state: IOVA_DST -> DST through the stage-1 STE, nothing cached, no old events.
    dma::map_dst(DST);
    dma.set_s1()?;
    dma.events();
    let mut cur = DST;
    let mut retries = 0;
    for k in 1..=cycles {
        if let Err(e) = cycle(dma, pc, k, &mut cur, &mut retries) {
            summary(format_args!("stopped in cycle {k} of {cycles}"), &start);
            fail!("cycle {k}: {e}");
        }
    }
    // Working state again: on, and IOVA_DST -> DST, each shown by a round trip.
    let restore = |dma: &mut Dma| -> CheckResult {
        up_and_check(dma, pc, cur, 0x5e)?;
        if cur != DST {
            dma::map_dst(DST);
            dma.smmu.submit(&[Cmd::TlbiNhVa {
                asid: dma::ASID,
                va: IOVA_DST,
            }])?;
            up_and_check(dma, pc, DST, 0x6f)?;
        }
        dma.no_events("the power cycles")
    };
    if let Err(e) = restore(dma) {
        summary(format_args!("{cycles} cycles, then failed"), &start);
        fail!("after the {cycles} cycles: {e}");
    }
    summary(format_args!("{cycles} cycles"), &start);
    if retries > 0 {
        println!(
            "selftest: power: {retries} off phase(s) repeated: the SMMU was powered up meanwhile"
        );
    }
    Ok(())
}

/// Votes the edu's domain on, then a round trip through `IOVA_DST`, which must land in page
/// `cur` and leave the other page alone.
fn up_and_check(dma: &mut Dma, pc: PowerCtrl, cur: usize, seed: u8) -> CheckResult {
    pc.power_on(EDU_DOMAIN)?;
    let old = other(cur);
    dma::fill(old, |_| SENTINEL);
    let landed = dma.round_trip_to(seed, IOVA_SRC, IOVA_DST, cur);
    if let Some((off, got)) = dma::mismatch(old, 0..PAGE, |_| SENTINEL) {
        fail!(
            "DMA to {IOVA_DST:#x} hit the other page {:#x} (+{off:#x} = {got:#x}) after \
             power-up: stale IOTLB",
            dma::page(old)
        );
    }
    landed
}

/// One cycle (see the module docs); `cur` is the page `IOVA_DST` maps to, swapped on success.
fn cycle(dma: &mut Dma, pc: PowerCtrl, k: u32, cur: &mut usize, retries: &mut u32) -> CheckResult {
    // 1. On, and DMA goes where the table says.
    up_and_check(dma, pc, *cur, seed(k))?;
    // 2. Off.
    let on = Stats::get()?;
    pc.vote(EDU_DOMAIN, false);
    let ms = if k == 1 { FIRST_DOWN_MS } else { DOWN_MS };
    let next = other(*cur);
    let mut attempts = 0;
    loop {
        let off = wait_off(&on, ms)?;
        // 3. DMA while off.
        dma::fill(DST, |_| SENTINEL);
        dma::fill(ALT, |_| SENTINEL);
        dma.edu.buf_to_bus(0, IOVA_DST, LEN as u64)?;
        let landed = [DST, ALT]
            .into_iter()
            .find_map(|p| dma::mismatch(p, 0..PAGE, |_| SENTINEL).map(|(off, got)| (p, off, got)));
        // 4. Remap and invalidate while off.
        dma::map_dst(next);
        if let Err(e) = dma.smmu.submit(&[Cmd::TlbiNhVa {
            asid: dma::ASID,
            va: IOVA_DST,
        }]) {
            fail!("TLBI while off: {e}");
        }
        let after = Stats::get()?;
        if off.steady_until(&after) {
            if let Some((p, at, got)) = landed {
                fail!(
                    "DMA while the SMMU was off landed: page {:#x} +{at:#x} = {got:#x}",
                    dma::page(p)
                );
            }
            ensure!(
                after.tlbi_skipped > off.tlbi_skipped,
                "TLBI while the SMMU was off was not skipped (count stays {})",
                after.tlbi_skipped
            );
            *cur = next;
            dma.no_events("DMA and a TLBI while the SMMU was off")?;
            Deadline::after_ms(HOLD_OFF_MS).wait();
            return Ok(());
        }
        // Someone powered the SMMU up during steps 3-4: they proved nothing. Again at the next
        // power-down.
        *retries += 1;
        attempts += 1;
        ensure!(
            attempts < MAX_RETRIES,
            "the SMMU was powered up during each of {MAX_RETRIES} off phases (by a vote, DMA or TLBI?)"
        );
    }
}

/// Waits until the counters show the SMMU off, given counters `on` read while it was held on.
fn wait_off(on: &Stats, ms: u64) -> Result<Stats, Msg> {
    let deadline = Deadline::after_ms(ms);
    loop {
        let now = Stats::get()?;
        if now.off_since(on) {
            return Ok(now);
        }
        if deadline.expired() {
            fail!(
                "not powered down {ms} ms after the vote off (downs {}, ups {}: other masters on?)",
                now.downs,
                now.ups
            );
        }
        Deadline::after_us(POLL_US).wait();
    }
}
