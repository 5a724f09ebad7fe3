//! DMA checks: the guest drives an SMMUv3 and QEMU's `edu` PCI device the way an OS would, and
//! checks that DMA goes where its own stage-1 tables say, faults where they say nothing, and
//! cannot leave the VM when translation is bypassed.
//!
//! Setup: find the SMMU (`arm,smmu-v3`) and the host bridge (`pci-host-ecam-generic`) in the DT,
//! the `edu` on the bus (its stream ID from `iommu-map`; on QEMU `virt` the requester ID, 8 for
//! 00:01.0), give it a BAR0 if it has none, enable memory decoding and bus mastering, reset the
//! SMMU and give the `edu`'s stream an STE with Config = stage-1 translation through one context
//! descriptor (ASID 1, 4 KiB granule, 39-bit IOVAs) whose table maps IOVA 0x1_0000_0000 and the
//! page after it to two pages of this guest's RAM: IOVA != IPA.
//!
//! * `dma-s1`: RAM -> edu -> RAM through those IOVAs moves exactly the right bytes, in both
//!   directions, and raises no event.
//! * `dma-unmap`: with the destination's translation hot in the IOTLB, the guest clears its PTE,
//!   issues `CMD_TLBI_NH_VA` + `CMD_SYNC`; the same DMA then leaves memory untouched and the
//!   event queue holds an `F_TRANSLATION` for the edu's stream ID at that IOVA. Mapped again, the
//!   DMA lands again.
//! * `dma-bypass`: with an STE of Config = bypass, DMA with IOVA = IPA works within the VM.
//! * `dma-bypass-isolation` (not with `selftest.bare`): under a hypervisor, "bypass" only
//!   bypasses the guest's stage 1; the VM's stage 2 still applies, so IOVA = IPA. A DMA write to
//!   0x4020_0000 (the hypervisor's image in host-physical terms; no RAM of this VM at that IPA)
//!   must not land, and a DMA read from there must not return anything. What the guest can
//!   verify: reading 0x4020_0000 back by DMA returns neither the bytes it tried to write nor an
//!   arm64 Image header, and its own RAM (a canary page, its own image header, where an
//!   implementation that wrapped out-of-range addresses into the VM's RAM would write) is
//!   unchanged. What it cannot: whether host memory it cannot name changed (the hypervisor's
//!   end-of-run image integrity check covers its own image), and whether the hypervisor saw a
//!   stage-2 fault (such faults need not reach the guest's event queue). On bare QEMU the bypass
//!   is physical and 0x4020_0000 is this guest's own image, so that part is skipped.
//!
//! Then the hostile-guest checks of `hostile.rs` (nonsense written to the SMMU is contained,
//! reported as hardware would, and the guest's own DMA works afterwards). The stream table
//! therefore also covers [`hostile::foreign_sid`], a StreamID the VM does not own. Then
//! `gic-hostile` (`gic_hostile.rs`, not with `selftest.bare`): nonsense written to the VM's GIC
//! reaches no interrupt but the VM's own, and the GIC is left as it was (it needs no DMA and
//! also runs when the setup failed). Then `smmu-irq` (`smmu_irq.rs`): the SMMU's eventq, gerror
//! and cmdq-sync interrupts reach this vCPU through the GIC; it runs on the state
//! `dma-after-hostile` leaves and turns the SMMU's interrupts off again.
//!
//! Power: when the DT has an emulated power controller (`hyp,gdsc-controller`, `power.rs`), the
//! setup votes its domain 0 (the edu) on and waits for it before any DMA, since the SMMU may
//! start powered off; a domain that does not power up fails the setup, hence every DMA check.
//! With `selftest.power`, `smmu-power-cycle` (`power.rs`) runs last.

use core::ptr::{read_volatile, write_volatile};

use fdt::Fdt;

use crate::console::println;
use crate::dt::DtInfo;
use crate::edu::{self, Edu};
use crate::gic_hostile;
use crate::hostile;
use crate::pci::HostBridge;
use crate::power::{self, PowerCtrl};
use crate::report::{CheckResult, Msg, Report, ensure, fail};
use crate::smmu::{self, Cmd, DmaMem, Event, IoPageTable, Smmu};
use crate::smmu_irq;

pub(crate) const PAGE: usize = 4096;
/// The IOVAs of the source and destination pages: far from any IPA of the guest's RAM.
pub(crate) const IOVA_SRC: u64 = 0x1_0000_0000;
pub(crate) const IOVA_DST: u64 = IOVA_SRC + PAGE as u64;
pub(crate) const ASID: u16 = 1;
/// Bytes per transfer that should land.
pub(crate) const LEN: usize = 1024;
/// Bytes per transfer that should fault (QEMU queues one event per 4 bytes).
pub(crate) const FAULT_LEN: usize = 64;
/// Outside the VM: the hypervisor's load address on QEMU `virt`.
pub(crate) const OUTSIDE: u64 = 0x4020_0000;

pub(crate) const SRC: usize = 0;
pub(crate) const DST: usize = 1;
const PROBE: usize = 2;
const CANARY: usize = 3;
/// The page `smmu-power-cycle` maps `IOVA_DST` to every other cycle (the others: `DST`).
pub(crate) const ALT: usize = 4;

static BUFS: DmaMem<[[u8; PAGE]; 5]> = DmaMem::new([[0; PAGE]; 5]);
static IOPT: DmaMem<IoPageTable> = DmaMem::new(IoPageTable::new());

/// Address (VA == IPA) of buffer page `i`.
pub(crate) fn page(i: usize) -> usize {
    BUFS.addr() + i * PAGE
}

pub(crate) fn pattern(seed: u8, off: usize) -> u8 {
    (off as u8).wrapping_mul(0x1d).wrapping_add(seed) ^ (off >> 8) as u8
}

/// Fills buffer page `i` with `f(offset)`.
pub(crate) fn fill(i: usize, f: impl Fn(usize) -> u8) {
    for off in 0..PAGE {
        // SAFETY: inside BUFS, which only these checks use.
        unsafe { write_volatile((page(i) + off) as *mut u8, f(off)) };
    }
}

/// The first offset in `range` of page `i` that differs from `f(offset)`, with the byte found.
pub(crate) fn mismatch(
    i: usize,
    range: core::ops::Range<usize>,
    f: impl Fn(usize) -> u8,
) -> Option<(usize, u8)> {
    range.into_iter().find_map(|off| {
        // SAFETY: inside BUFS.
        let b = unsafe { read_volatile((page(i) + off) as *const u8) };
        (b != f(off)).then_some((off, b))
    })
}

/// Points `IOVA_DST` at buffer page `i` in the edu's stage-1 table; the caller invalidates.
pub(crate) fn map_dst(i: usize) {
    // SAFETY: IOPT was initialised in `setup`, which every user of a `Dma` ran first; the SMMU
    // only reads it.
    unsafe { IoPageTable::set(IOPT.ptr(), IOVA_DST, Some(page(i) as u64)) };
}

/// Clears `IOVA_DST`'s entry in the edu's stage-1 table; the caller invalidates.
pub(crate) fn unmap_dst() {
    // SAFETY: as in `map_dst`.
    unsafe { IoPageTable::set(IOPT.ptr(), IOVA_DST, None) };
}

/// Everything the checks share.
pub(crate) struct Dma {
    pub(crate) smmu: Smmu,
    pub(crate) edu: Edu,
    pub(crate) sid: u32,
    /// The emulated power controller, when the DT has one (domain 0 is the edu's).
    pub(crate) power: Option<PowerCtrl>,
}

/// Runs the DMA checks and records them; then `smmu-power-cycle` with `power_cycles` cycles
/// when that is given (`selftest.power`).
pub fn run(report: &mut Report, dt: Option<&DtInfo>, bare: bool, power_cycles: Option<u32>) {
    let mut dma = match setup(dt) {
        Ok(d) => d,
        Err(why) => {
            for name in ["dma-s1", "dma-unmap", "dma-bypass"]
                .iter()
                .chain(hostile::CHECKS)
            {
                report.record(name, Err(Msg::new(format_args!("setup: {why}"))));
            }
            // Needs no DMA: it runs anyway.
            gic_hostile::run(report, dt, bare);
            let power_check = power_cycles.map(|_| power::CHECK);
            for name in [smmu_irq::CHECK].iter().chain(power_check.as_ref()) {
                report.record(name, Err(Msg::new(format_args!("setup: {why}"))));
            }
            return;
        }
    };
    report.record("dma-s1", dma.s1());
    report.record("dma-unmap", dma.unmap());
    report.record("dma-bypass", dma.bypass());
    if bare {
        report.skip(
            "dma-bypass-isolation",
            "selftest.bare: no hypervisor, bypass is physical",
        );
    } else {
        report.record("dma-bypass-isolation", dma.isolation());
    }
    // After a DT that parsed (setup needs it): the first address past the VM's RAM.
    let ram_end = dt.and_then(|d| d.ram).map_or(0, |(b, s)| (b + s) as u64);
    hostile::run(report, &mut dma, ram_end, bare);
    gic_hostile::run(report, dt, bare);
    smmu_irq::run(report, &mut dma, dt);
    if let Some(cycles) = power_cycles {
        power::run(report, &mut dma, cycles, bare);
    }
}

fn setup(dt: Option<&DtInfo>) -> Result<Dma, Msg> {
    let Some(dt) = dt else {
        fail!("no usable DT");
    };
    // SAFETY: the DTB was validated by `dt::parse` at this address; it stays in place and
    // unmodified for the guest's lifetime.
    let fdt = match unsafe { Fdt::from_ptr(dt.addr as *const u8) } {
        Ok(f) => f,
        Err(e) => fail!("cannot parse DTB: {e:?}"),
    };
    // The edu's power domain first: the SMMU in front of it may be off until someone votes.
    let power = PowerCtrl::from_dt(&fdt)?;
    if let Some(pc) = &power {
        if let Err(e) = pc.power_on(power::EDU_DOMAIN) {
            fail!("power controller: {e}");
        }
        println!(
            "selftest: dma: power controller at {:#x}, {} domain(s); domain {} (edu) on",
            pc.base(),
            pc.domains(),
            power::EDU_DOMAIN
        );
    }
    let (smmu_base, smmu_phandle) = smmu::from_dt(&fdt)?;
    let bridge = HostBridge::from_dt(&fdt)?;
    let Some(bdf) = bridge.find(edu::VENDOR, edu::DEVICE) else {
        fail!(
            "no edu (1234:11e8) on buses {}..={}",
            bridge.bus_start,
            bridge.bus_end
        );
    };
    let sid = bridge.stream_id(bdf, smmu_phandle)?;
    let (bar, _) = bridge.setup_bar0(bdf)?;
    let edu = Edu::new(bar)?;
    let streams = (sid.max(hostile::foreign_sid(sid)) + 1).min(smmu::MAX_STREAMS as u32);
    let mut smmu = Smmu::reset(smmu_base, streams)?;

    let t = IOPT.ptr();
    // SAFETY: the table is not in use: no STE points at it yet.
    unsafe {
        IoPageTable::init(t, IOVA_SRC);
        IoPageTable::set(t, IOVA_SRC, Some(page(SRC) as u64));
        IoPageTable::set(t, IOVA_DST, Some(page(DST) as u64));
    }
    // SAFETY: IOPT is an IoPageTable.
    let root = unsafe { IoPageTable::root(t) };
    smmu.set_cd(smmu::cd_s1(root, ASID, smmu.ips()), None)?;
    let cd = smmu.cd_addr();
    smmu.set_ste(sid, smmu::ste_s1(cd))?;
    println!(
        "selftest: dma: edu at {bdf} (SID {sid:#x}), BAR0 {bar:#x}, SMMU at {smmu_base:#x}, \
         IOVA {IOVA_SRC:#x} -> IPA {:#x}",
        page(SRC)
    );
    Ok(Dma {
        smmu,
        edu,
        sid,
        power,
    })
}

impl Dma {
    /// Gives the edu's stream its stage-1 STE again (as `setup` did) and drops the ASID's TLB
    /// entries.
    pub(crate) fn set_s1(&mut self) -> CheckResult {
        let cd = self.smmu.cd_addr();
        self.smmu.set_ste(self.sid, smmu::ste_s1(cd))?;
        self.smmu.submit(&[Cmd::TlbiNhAsid { asid: ASID }])
    }

    /// Drains the event queue, returning how many events there were and the first one.
    pub(crate) fn events(&mut self) -> (usize, Option<Event>) {
        let mut first = None;
        let (n, _) = self.smmu.drain_events(|e| {
            first.get_or_insert(*e);
        });
        (n, first)
    }

    /// Fails if the SMMU reported anything since the last drain.
    pub(crate) fn no_events(&mut self, what: &str) -> CheckResult {
        match self.events() {
            (0, _) => {}
            (n, Some(e)) => fail!("{n} unexpected SMMU event(s) after {what}, first: {e}"),
            (n, None) => fail!("{n} unexpected SMMU event(s) after {what}"),
        }
        let gerror = self.smmu.gerror();
        ensure!(gerror == 0, "SMMU GERROR {gerror:#x} after {what}");
        Ok(())
    }

    /// RAM -> edu -> RAM: copies `LEN` bytes of a fresh pattern from bus address `src` (page
    /// `SRC`) to bus address `dst` (page `DST`) and checks page `DST`.
    pub(crate) fn round_trip(&mut self, seed: u8, src: u64, dst: u64) -> CheckResult {
        self.round_trip_to(seed, src, dst, DST)
    }

    /// [`Dma::round_trip`] for a bus address `dst` that names buffer page `dst_page`.
    pub(crate) fn round_trip_to(
        &mut self,
        seed: u8,
        src: u64,
        dst: u64,
        dst_page: usize,
    ) -> CheckResult {
        self.events();
        fill(SRC, |off| pattern(seed, off));
        fill(dst_page, |_| 0xc5);
        self.edu.bus_to_buf(src, 0, LEN as u64)?;
        self.edu.buf_to_bus(0, dst, LEN as u64)?;
        if let Some((off, got)) = mismatch(dst_page, 0..LEN, |off| pattern(seed, off)) {
            let hint = match self.events() {
                (_, Some(e)) if e.addr() != src && e.addr() != dst => {
                    Msg::new(format_args!("; {e}; edu dma_mask?"))
                }
                (_, Some(e)) => Msg::new(format_args!("; {e}")),
                (_, None) => Msg::new(format_args!("; no SMMU event")),
            };
            fail!(
                "DMA {src:#x}->{dst:#x}: byte {off:#x} = {got:#x}, want {:#x}{hint}",
                pattern(seed, off)
            );
        }
        if let Some((off, got)) = mismatch(dst_page, LEN..PAGE, |_| 0xc5) {
            fail!("DMA wrote past its end: byte {off:#x} of the destination is {got:#x}");
        }
        self.no_events("a DMA that should succeed")
    }

    /// `dma-s1`: DMA through the guest's own stage-1 mapping, IOVA != IPA.
    fn s1(&mut self) -> CheckResult {
        self.round_trip(0x11, IOVA_SRC, IOVA_DST)
    }

    /// `dma-unmap`: unmapped and invalidated, the IOVA faults and the write does not land.
    fn unmap(&mut self) -> CheckResult {
        let t = IOPT.ptr();
        // SAFETY: IOPT was initialised in `setup`; the SMMU only reads it.
        unsafe { IoPageTable::set(t, IOVA_DST, Some(page(DST) as u64)) };
        // Works while mapped, which also leaves the translation in the IOTLB.
        self.round_trip(0x22, IOVA_SRC, IOVA_DST)?;

        // SAFETY: as above.
        unsafe { IoPageTable::set(t, IOVA_DST, None) };
        self.smmu.submit(&[Cmd::TlbiNhVa {
            asid: ASID,
            va: IOVA_DST,
        }])?;
        fill(DST, |_| 0x3c);
        self.events();
        self.edu.buf_to_bus(0, IOVA_DST, FAULT_LEN as u64)?;
        if let Some((off, got)) = mismatch(DST, 0..PAGE, |_| 0x3c) {
            fail!(
                "DMA to the unmapped IOVA {IOVA_DST:#x} landed (byte {off:#x} = {got:#x}): stale IOTLB entry?"
            );
        }
        let sid = self.sid;
        let mut found = 0;
        let mut other = None;
        let (n, _) = self.smmu.drain_events(|e| {
            let hit = e.id() == smmu::F_TRANSLATION
                && e.sid() == sid
                && (IOVA_DST..IOVA_DST + FAULT_LEN as u64).contains(&e.addr())
                && !e.is_read();
            if hit {
                found += 1;
            } else {
                other.get_or_insert(*e);
            }
        });
        if found == 0 {
            match other {
                Some(e) => fail!(
                    "no F_TRANSLATION for SID {sid:#x} at {IOVA_DST:#x}; {n} other event(s), first: {e}"
                ),
                None => fail!("no SMMU event for the DMA to the unmapped IOVA {IOVA_DST:#x}"),
            }
        }
        if let Some(e) = other {
            fail!("unexpected event besides the F_TRANSLATION(s): {e}");
        }

        // Mapped again (no invalidation needed: faults are not cached), it lands again.
        // SAFETY: as above.
        unsafe { IoPageTable::set(t, IOVA_DST, Some(page(DST) as u64)) };
        self.edu.buf_to_bus(0, IOVA_DST, FAULT_LEN as u64)?;
        if let Some((off, got)) = mismatch(DST, 0..FAULT_LEN, |off| pattern(0x22, off)) {
            fail!(
                "after the remap, byte {off:#x} is {got:#x}, want {:#x}",
                pattern(0x22, off)
            );
        }
        self.no_events("the remapped DMA")
    }

    /// Puts the stream into bypass (and drops the ASID's stale TLB entries).
    fn set_bypass(&mut self) -> CheckResult {
        self.smmu.set_ste(self.sid, smmu::ste_bypass())?;
        self.smmu.submit(&[Cmd::TlbiNhAsid { asid: ASID }])
    }

    /// `dma-bypass`: IOVA = IPA within the VM.
    fn bypass(&mut self) -> CheckResult {
        self.set_bypass()?;
        self.round_trip(0x33, page(SRC) as u64, page(DST) as u64)
    }

    /// `dma-bypass-isolation`: with bypass, DMA to and from an address outside the VM does not
    /// reach memory.
    fn isolation(&mut self) -> CheckResult {
        self.set_bypass()?;
        let (image, _) = crate::boot::image_range();
        let mut header = [0u8; 64];
        for (i, b) in header.iter_mut().enumerate() {
            // SAFETY: the guest's own image, mapped and readable.
            *b = unsafe { read_volatile((image + i) as *const u8) };
        }
        fill(CANARY, |off| pattern(0x5a, off));
        fill(SRC, |off| pattern(0x44, off));
        self.events();
        // SAFETY: inside BUFS.
        let probe = |off: usize| unsafe { read_volatile((page(PROBE) + off) as *const u8) };
        let len = FAULT_LEN as u64;

        // Read first, while whatever is there is intact: outside -> edu -> probe page.
        fill(PROBE, |_| 0xa5);
        self.edu.bus_to_buf(OUTSIDE, 0x800, len)?;
        self.edu.buf_to_bus(0x800, page(PROBE) as u64, len)?;
        ensure!(
            (0x38..0x3c).map(probe).ne(*b"ARM\x64"),
            "a DMA read from {OUTSIDE:#x} (outside the VM) returned an arm64 Image header"
        );
        // Write: the VM's own RAM -> edu (works, as in dma-bypass) -> outside; then read it back
        // from there into the probe page.
        self.edu.bus_to_buf(page(SRC) as u64, 0, len)?;
        self.edu.buf_to_bus(0, OUTSIDE, len)?;
        fill(PROBE, |_| 0xa5);
        self.edu.bus_to_buf(OUTSIDE, 0xc00, len)?;
        self.edu.buf_to_bus(0xc00, page(PROBE) as u64, len)?;
        let (n, _) = self.events();
        ensure!(
            (0..FAULT_LEN).any(|off| probe(off) != pattern(0x44, off)),
            "a DMA write to {OUTSIDE:#x} (outside the VM) landed: it reads back by DMA"
        );
        if let Some((off, got)) = mismatch(CANARY, 0..PAGE, |off| pattern(0x5a, off)) {
            fail!("the canary page changed at {off:#x} ({got:#x}) after DMA outside the VM");
        }
        for (i, &b) in header.iter().enumerate() {
            // SAFETY: as above.
            let now = unsafe { read_volatile((image + i) as *const u8) };
            ensure!(
                now == b,
                "the guest's image changed at {:#x} after DMA outside the VM",
                image + i
            );
        }
        // The VM's own DMA still works afterwards.
        self.round_trip(0x55, page(SRC) as u64, page(DST) as u64)?;
        println!("selftest: dma: {n} SMMU event(s) seen by the guest for the DMA outside the VM");
        Ok(())
    }
}
