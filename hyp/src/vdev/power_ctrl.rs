//! The emulated power controller a VM sees: a handful of GDSC-style power domains, one per guest
//! DMA master whose power vote the hypervisor follows.
//!
//! On a Qualcomm SoC a master's driver turns its GDSC on before using the device and collapses it
//! afterwards. The guest must not touch the real clock controller (it also holds the SMMU's own
//! domains), so it gets this small controller instead, and the hypervisor learns from its writes
//! when a master may start DMA: every domain has an [`ActivitySink`] that takes a runtime-PM
//! reference on the SMMU in front of the master while the domain is on. The guest device tree
//! describes it (`dt::guest`: `compatible = "hyp,gdsc-controller"`, `#power-domain-cells = <1>`,
//! `hyp,domains = <N>`), and masters name their domain with `power-domains = <&pc i>`.
//!
//! # Registers
//!
//! The layout is fixed (a guest driver is written against it). Only aligned 32-bit accesses;
//! any other size, a misaligned access or an offset with no register is an [`MmioError`], which
//! makes the hypervisor inject an abort.
//!
//! | offset | name | |
//! |---|---|---|
//! | `0x000` | `ID` | RO, [`POWER_CTRL_ID`] (ASCII `"GDSC"`) |
//! | `0x004` | `NUM_DOMAINS` | RO, the number of domains N |
//! | `0x100 + 4 * i`, `i < N` | `GDSCR_i` | bit 0 `SW_COLLAPSE` (RW, resets to 1), bit 31 `PWR_ON` (RO), other bits RAZ/WI |
//!
//! Writes to the read-only registers are ignored (and counted in [`PowerCtrlStats`]).
//!
//! Clearing `SW_COLLAPSE` votes the domain on: the sink's `set_active(true)` powers the SMMU up
//! if needed, then `PWR_ON` reads 1. If that fails, the domain behaves like a GDSC that never
//! turned on: `PWR_ON` stays 0 and `SW_COLLAPSE` reads back 1, so a driver polling for `PWR_ON`
//! times out and does not start DMA through an unpowered SMMU. Setting `SW_COLLAPSE` votes it
//! off (`set_active(false)`, `PWR_ON` reads 0). Writing the value a domain already has does
//! nothing, so the sink sees each transition exactly once.
//!
//! # Concurrency
//!
//! Each domain has its own small lock, held across the sink call: two vCPUs writing the same
//! `GDSCR` concurrently are serialised, so the sink never sees two "on" in a row or an "off"
//! overtaking the "on" it follows. Domains never contend with each other. The sink must not
//! access this device. This is not a hot path (a driver writes a `GDSCR` at probe, suspend and
//! resume).

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use alloc::sync::Arc;
use alloc::vec::Vec;

use spin::Mutex;

use crate::power::activity::ActivitySink;
use crate::trap::{MmioDevice, MmioError};

/// Size of the controller's register window.
pub const POWER_CTRL_MMIO_SIZE: u64 = 0x1000;

/// Value of the `ID` register: ASCII `"GDSC"`, so a driver can check it found the right device.
pub const POWER_CTRL_ID: u32 = 0x4744_5343;

/// Register offsets and bits.
mod reg {
    pub const ID: u64 = 0x000;
    pub const NUM_DOMAINS: u64 = 0x004;
    /// `GDSCR_0`; domain `i`'s register is 4 bytes per domain above it.
    pub const GDSCR_BASE: u64 = 0x100;

    /// Set: the guest wants the domain collapsed (off). Resets to 1.
    pub const SW_COLLAPSE: u32 = 1 << 0;
    /// Status: the domain is on.
    pub const PWR_ON: u32 = 1 << 31;
}

/// Most domains the window holds: `GDSCR_i` registers up to the end of the 4 KiB window.
pub const MAX_DOMAINS: usize = ((POWER_CTRL_MMIO_SIZE - reg::GDSCR_BASE) / 4) as usize;

/// One domain of the controller: a guest DMA master's power vote.
#[derive(Clone)]
pub struct PowerDomain {
    /// For log messages (the master's name from the board file).
    pub name: &'static str,
    /// Told when the guest votes the domain on or off.
    pub sink: Arc<dyn ActivitySink>,
}

impl fmt::Debug for PowerDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PowerDomain")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Why a [`VirtPowerCtrl`] could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerCtrlError {
    /// A controller without domains is useless to a guest (and its DT node would be wrong).
    NoDomains,
    /// More domains than `GDSCR` registers fit in the window.
    TooManyDomains { count: usize },
}

impl fmt::Display for PowerCtrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoDomains => f.write_str("emulated power controller without domains"),
            Self::TooManyDomains { count } => write!(
                f,
                "{count} power domains: the emulated power controller has at most {MAX_DOMAINS}"
            ),
        }
    }
}

/// What the guest did with the controller, for diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PowerCtrlStats {
    /// Domains turned on (successful `set_active(true)`).
    pub votes_on: u64,
    /// Domains turned off, by the guest or by [`VirtPowerCtrl::quiesce`] (`set_active(false)`).
    pub votes_off: u64,
    /// Votes on whose `set_active(true)` failed (the domain stayed off).
    pub failed_power_ups: u64,
    /// Writes to the read-only `ID` and `NUM_DOMAINS` registers.
    pub ignored_writes: u64,
}

struct Domain {
    name: &'static str,
    sink: Arc<dyn ActivitySink>,
    /// Whether the domain is on (the sink was told `true` and not `false` since). The lock also
    /// serialises the sink calls of this domain.
    on: Mutex<bool>,
}

/// The emulated power controller of one VM. Register it on the VM's bus with
/// [`POWER_CTRL_MMIO_SIZE`] bytes at the IPA given to the guest DT's `power-controller` node.
pub struct VirtPowerCtrl {
    domains: Vec<Domain>,
    votes_on: AtomicU64,
    votes_off: AtomicU64,
    failed_power_ups: AtomicU64,
    ignored_writes: AtomicU64,
}

impl VirtPowerCtrl {
    /// A controller with `domains` (domain `i` is `GDSCR_i`, the guest's `power-domains` cell
    /// `i`), all collapsed. No sink is called.
    pub fn new(domains: Vec<PowerDomain>) -> Result<Self, PowerCtrlError> {
        if domains.is_empty() {
            return Err(PowerCtrlError::NoDomains);
        }
        if domains.len() > MAX_DOMAINS {
            return Err(PowerCtrlError::TooManyDomains {
                count: domains.len(),
            });
        }
        let domains = domains
            .into_iter()
            .map(|d| Domain {
                name: d.name,
                sink: d.sink,
                on: Mutex::new(false),
            })
            .collect();
        Ok(Self {
            domains,
            votes_on: AtomicU64::new(0),
            votes_off: AtomicU64::new(0),
            failed_power_ups: AtomicU64::new(0),
            ignored_writes: AtomicU64::new(0),
        })
    }

    /// Number of domains.
    pub fn num_domains(&self) -> usize {
        self.domains.len()
    }

    /// Whether domain `index` is on, `None` if there is no such domain.
    pub fn is_on(&self, index: usize) -> Option<bool> {
        self.domains.get(index).map(|d| *d.on.lock())
    }

    /// The counters so far. Each is read on its own, so a snapshot taken while vCPUs write may
    /// mix before and after one access.
    pub fn stats(&self) -> PowerCtrlStats {
        PowerCtrlStats {
            votes_on: self.votes_on.load(Ordering::Relaxed),
            votes_off: self.votes_off.load(Ordering::Relaxed),
            failed_power_ups: self.failed_power_ups.load(Ordering::Relaxed),
            ignored_writes: self.ignored_writes.load(Ordering::Relaxed),
        }
    }

    /// Turns every domain off, dropping the votes of the ones that are on: for a VM that stopped
    /// (its devices are quiesced, nothing of it may keep an SMMU powered). The guest, if it ever
    /// ran again, would find every `GDSCR` in its reset state.
    pub fn quiesce(&self) {
        for d in &self.domains {
            let mut on = d.on.lock();
            if *on {
                self.power_off(d, &mut on);
            }
        }
    }

    /// Tells the sink domain `d` is off. Only turning on can fail (see [`ActivitySink`]); an
    /// error here still leaves the domain off as the guest asked, and is logged.
    fn power_off(&self, d: &Domain, on: &mut bool) {
        if let Err(e) = d.sink.set_active(false) {
            log::warn!("power controller: {}: power-down: {e}", d.name);
        }
        *on = false;
        self.votes_off.fetch_add(1, Ordering::Relaxed);
    }

    /// The domain behind `offset` (a `GDSCR_i`), if any.
    fn domain_at(&self, offset: u64) -> Option<&Domain> {
        let index = offset.checked_sub(reg::GDSCR_BASE)? / 4;
        self.domains.get(usize::try_from(index).ok()?)
    }

    /// Checks size and alignment: only aligned 32-bit accesses exist.
    fn check(offset: u64, size: u8) -> Result<(), MmioError> {
        if size != 4 {
            return Err(MmioError::BadSize { size });
        }
        if !offset.is_multiple_of(4) {
            return Err(MmioError::BadOffset { offset });
        }
        Ok(())
    }

    /// Applies a guest write to domain `d`'s `GDSCR`.
    fn write_gdscr(&self, d: &Domain, value: u32) {
        let collapse = value & reg::SW_COLLAPSE != 0;
        let mut on = d.on.lock();
        // `on` is exactly "SW_COLLAPSE reads 0": a failed power-up leaves the domain collapsed.
        if collapse != *on {
            return;
        }
        if collapse {
            self.power_off(d, &mut on);
            return;
        }
        match d.sink.set_active(true) {
            Ok(()) => {
                *on = true;
                self.votes_on.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.failed_power_ups.fetch_add(1, Ordering::Relaxed);
                log::warn!("power controller: {}: power-up failed: {e}", d.name);
            }
        }
    }
}

impl MmioDevice for VirtPowerCtrl {
    fn name(&self) -> &str {
        "power-ctrl"
    }

    fn read(&self, _vcpu: usize, offset: u64, size: u8) -> Result<u64, MmioError> {
        Self::check(offset, size)?;
        let value = match offset {
            reg::ID => POWER_CTRL_ID,
            // At most MAX_DOMAINS, so it fits.
            reg::NUM_DOMAINS => self.domains.len() as u32,
            _ => {
                let d = self
                    .domain_at(offset)
                    .ok_or(MmioError::BadOffset { offset })?;
                if *d.on.lock() {
                    reg::PWR_ON
                } else {
                    reg::SW_COLLAPSE
                }
            }
        };
        Ok(u64::from(value))
    }

    fn write(&self, _vcpu: usize, offset: u64, size: u8, value: u64) -> Result<(), MmioError> {
        Self::check(offset, size)?;
        match offset {
            reg::ID | reg::NUM_DOMAINS => {
                self.ignored_writes.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                let d = self
                    .domain_at(offset)
                    .ok_or(MmioError::BadOffset { offset })?;
                self.write_gdscr(d, value as u32);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::power::PowerError;
    use alloc::vec;
    use std::sync::Mutex as StdMutex;
    use std::sync::atomic::AtomicBool;

    /// Records every `set_active` call; fails power-ups while `fail` is set.
    #[derive(Default)]
    struct Recorder {
        calls: StdMutex<Vec<bool>>,
        fail: AtomicBool,
    }

    impl Recorder {
        fn take(&self) -> Vec<bool> {
            core::mem::take(&mut *self.calls.lock().unwrap())
        }
    }

    impl ActivitySink for Recorder {
        fn set_active(&self, active: bool) -> Result<(), PowerError> {
            self.calls.lock().unwrap().push(active);
            if active && self.fail.load(Ordering::Relaxed) {
                return Err(PowerError::Timeout {
                    domain: "smmu",
                    what: "power on",
                });
            }
            Ok(())
        }
    }

    fn ctrl(n: usize) -> (VirtPowerCtrl, Vec<Arc<Recorder>>) {
        let sinks: Vec<_> = (0..n).map(|_| Arc::new(Recorder::default())).collect();
        let domains = sinks
            .iter()
            .map(|s| PowerDomain {
                name: "master",
                sink: s.clone(),
            })
            .collect();
        (VirtPowerCtrl::new(domains).unwrap(), sinks)
    }

    fn gdscr(i: u64) -> u64 {
        0x100 + 4 * i
    }

    fn rd(c: &VirtPowerCtrl, off: u64) -> u32 {
        c.read(0, off, 4).unwrap() as u32
    }

    fn wr(c: &VirtPowerCtrl, off: u64, v: u32) {
        c.write(0, off, 4, u64::from(v)).unwrap();
    }

    const COLLAPSED: u32 = 1;
    const ON: u32 = 1 << 31;

    #[test]
    fn id_and_reset_state() {
        let (c, sinks) = ctrl(3);
        assert_eq!(rd(&c, 0), 0x4744_5343);
        assert_eq!(rd(&c, 0).to_le_bytes(), *b"CSDG");
        assert_eq!(rd(&c, 4), 3);
        for i in 0..3 {
            assert_eq!(rd(&c, gdscr(i)), COLLAPSED);
            assert_eq!(c.is_on(i as usize), Some(false));
        }
        assert_eq!(c.is_on(3), None);
        assert_eq!(c.num_domains(), 3);
        assert_eq!(c.name(), "power-ctrl");
        // Building it calls no sink.
        assert!(sinks.iter().all(|s| s.take().is_empty()));
        assert_eq!(c.stats(), PowerCtrlStats::default());
    }

    #[test]
    fn vote_on_and_off() {
        let (c, sinks) = ctrl(2);
        wr(&c, gdscr(1), 0);
        assert_eq!(rd(&c, gdscr(1)), ON);
        assert_eq!(rd(&c, gdscr(0)), COLLAPSED);
        assert_eq!(sinks[1].take(), [true]);
        assert!(sinks[0].take().is_empty());
        // The same value again, with RAZ/WI bits set: nothing happens, nothing reads back.
        wr(&c, gdscr(1), 0x7fff_fffe);
        wr(&c, gdscr(1), 0);
        assert_eq!(rd(&c, gdscr(1)), ON);
        assert!(sinks[1].take().is_empty());
        // Collapse; again; PWR_ON written by the guest is ignored.
        wr(&c, gdscr(1), 1);
        wr(&c, gdscr(1), 0x8000_0001);
        assert_eq!(rd(&c, gdscr(1)), COLLAPSED);
        assert_eq!(sinks[1].take(), [false]);
        // Writing a collapsed domain collapsed does nothing.
        wr(&c, gdscr(0), 0xffff_ffff);
        assert!(sinks[0].take().is_empty());
        assert_eq!(
            c.stats(),
            PowerCtrlStats {
                votes_on: 1,
                votes_off: 1,
                ..PowerCtrlStats::default()
            }
        );
    }

    #[test]
    fn failed_power_up_looks_stuck() {
        let (c, sinks) = ctrl(1);
        sinks[0].fail.store(true, Ordering::Relaxed);
        wr(&c, gdscr(0), 0);
        // Never turned on: SW_COLLAPSE reads back 1, PWR_ON 0.
        assert_eq!(rd(&c, gdscr(0)), COLLAPSED);
        assert_eq!(c.is_on(0), Some(false));
        assert_eq!(sinks[0].take(), [true]);
        // Collapsing it is not a transition: no "off" for an "on" that failed.
        wr(&c, gdscr(0), 1);
        assert!(sinks[0].take().is_empty());
        // A retry is a new attempt, and once the SMMU powers up it works.
        wr(&c, gdscr(0), 0);
        sinks[0].fail.store(false, Ordering::Relaxed);
        wr(&c, gdscr(0), 0);
        assert_eq!(rd(&c, gdscr(0)), ON);
        assert_eq!(sinks[0].take(), [true, true]);
        assert_eq!(
            c.stats(),
            PowerCtrlStats {
                votes_on: 1,
                failed_power_ups: 2,
                ..PowerCtrlStats::default()
            }
        );
    }

    #[test]
    fn bad_accesses_and_read_only_registers() {
        let (c, sinks) = ctrl(2);
        for size in [1, 2, 8] {
            assert_eq!(c.read(0, 0, size), Err(MmioError::BadSize { size }));
            assert_eq!(
                c.write(0, gdscr(0), size, 0),
                Err(MmioError::BadSize { size })
            );
        }
        // Misaligned, between registers, past the last domain, past the window.
        for offset in [2, 0x101, 0x8, 0xfc, gdscr(2), 0xffc, 0x1000] {
            assert_eq!(c.read(0, offset, 4), Err(MmioError::BadOffset { offset }));
            assert_eq!(
                c.write(0, offset, 4, 0),
                Err(MmioError::BadOffset { offset })
            );
        }
        // None of that reached a domain.
        assert!(sinks.iter().all(|s| s.take().is_empty()));
        wr(&c, 0, 0);
        wr(&c, 4, 9);
        assert_eq!((rd(&c, 0), rd(&c, 4)), (POWER_CTRL_ID, 2));
        assert_eq!(c.stats().ignored_writes, 2);
    }

    #[test]
    fn quiesce_drops_votes() {
        let (c, sinks) = ctrl(3);
        wr(&c, gdscr(0), 0);
        wr(&c, gdscr(2), 0);
        sinks[1].fail.store(true, Ordering::Relaxed);
        wr(&c, gdscr(1), 0);
        for s in &sinks {
            s.take();
        }
        c.quiesce();
        assert_eq!(sinks[0].take(), [false]);
        assert!(sinks[1].take().is_empty());
        assert_eq!(sinks[2].take(), [false]);
        for i in 0..3 {
            assert_eq!(rd(&c, gdscr(i)), COLLAPSED);
        }
        // Twice is harmless.
        c.quiesce();
        assert!(sinks.iter().all(|s| s.take().is_empty()));
        assert_eq!(
            c.stats(),
            PowerCtrlStats {
                votes_on: 2,
                votes_off: 2,
                failed_power_ups: 1,
                ignored_writes: 0
            }
        );
    }

    #[test]
    fn construction_limits() {
        assert_eq!(
            VirtPowerCtrl::new(Vec::new()).err(),
            Some(PowerCtrlError::NoDomains)
        );
        let sink: Arc<dyn ActivitySink> = Arc::new(Recorder::default());
        let d = PowerDomain { name: "x", sink };
        assert_eq!(MAX_DOMAINS, 960);
        let c = VirtPowerCtrl::new(vec![d.clone(); MAX_DOMAINS]).unwrap();
        // The last domain's register is the window's last word.
        assert_eq!(rd(&c, 0xffc), COLLAPSED);
        assert_eq!(
            VirtPowerCtrl::new(vec![d; MAX_DOMAINS + 1]).err(),
            Some(PowerCtrlError::TooManyDomains { count: 961 })
        );
        assert!(
            PowerCtrlError::TooManyDomains { count: 961 }
                .to_string()
                .contains("at most 960")
        );
    }

    #[test]
    fn concurrent_votes_reach_the_sink_once_each() {
        let (c, sinks) = ctrl(1);
        let c = Arc::new(c);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for n in 0..500u32 {
                        c.write(t, 0x100, 4, u64::from((n + t as u32) & 1)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Whatever the interleaving, the sink saw strict alternation starting with "on", and
        // the final state matches the last call.
        let calls = sinks[0].take();
        assert!(calls.iter().enumerate().all(|(i, &a)| a == (i % 2 == 0)));
        assert_eq!(c.is_on(0), Some(calls.last() == Some(&true)));
        let s = c.stats();
        assert_eq!(s.votes_on + s.votes_off, calls.len() as u64);
    }
}
