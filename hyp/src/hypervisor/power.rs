//! The SMMU's runtime power management on the target: its power domain (a GDSC with clocks, or
//! QEMU's simulated one), the links from the VMs' masters, the autosuspend timer and the counters.
//!
//! - Power-off (`SmmuPowerOps::power_off`): the driver quiesces the SMMU (command queue drained,
//!   pending events routed to their VMs, GBPA abort, CR0 = 0); then the switch goes off. The
//!   simulated switch wipes the SMMU's registers as a power collapse would.
//! - Power-on: the switch goes on, then the driver re-programs everything from its shadow (the
//!   stream table and queues live in hypervisor memory) and invalidates all cached
//!   configuration and TLBs before it enables translation.
//! - Autosuspend: whoever releases a master arms this CPU's EL2 timer for the domain's deadline;
//!   the timer interrupt polls the domain (and re-arms while it is not yet due).

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use log::{info, warn};
use spin::Once;

use super::{SmmuHost, board, route_event};
use crate::arch::{platform, sysreg};
use crate::config::{PowerDomainKind, SmmuPowerConfig};
use crate::power::activity::{ActivitySink, MasterLink};
use crate::power::clock::{BranchClock, ClockDesc, HaltCheck};
use crate::power::gdsc::{Gdsc, GdscDesc, GdscFlags};
use crate::power::rpm::{Domain, PowerOps, Stats, ms_to_ticks};
use crate::power::{Mmio, PowerError, Timing};

/// The SMMU's runtime-PM domain.
pub type SmmuDomain = Domain<SmmuPowerOps>;

/// A master's link to the SMMU's domain; going inactive also arms this CPU's autosuspend timer.
pub struct SmmuLink(MasterLink<SmmuPowerOps>);

impl SmmuLink {
    /// The link of master `name` to `domain`.
    pub fn new(name: &'static str, domain: &'static SmmuDomain) -> Self {
        Self(MasterLink::new(name, domain))
    }
}

impl ActivitySink for SmmuLink {
    fn set_active(&self, active: bool) -> Result<(), PowerError> {
        let r = self.0.set_active(active);
        match &r {
            Ok(()) if !active => schedule_autosuspend(),
            Err(e) => warn!("{}: SMMU power-up failed: {e}", self.0.name()),
            Ok(()) => {}
        }
        r
    }
}

static DOMAIN: Once<SmmuDomain> = Once::new();
/// How long the boot-time probe and reset of the SMMU took, in counter ticks (the baseline the
/// resume cost is compared with).
pub static BOOT_RESET_TICKS: AtomicU64 = AtomicU64::new(0);

/// Busy-waits `us` microseconds on the generic counter.
pub fn delay_us(us: u32) {
    let freq = sysreg::counter_freq();
    let start = sysreg::counter();
    let ticks = u64::from(us) * freq / 1_000_000;
    while sysreg::counter().wrapping_sub(start) < ticks {
        core::hint::spin_loop();
    }
}

/// What switches the SMMU's power.
enum Switch {
    Simulated,
    Gdsc {
        gdsc: Gdsc<Mmio>,
        clocks: Vec<BranchClock<Mmio>>,
    },
}

/// Powering the SMMU on and off.
pub struct SmmuPowerOps {
    host: &'static SmmuHost,
    switch: Switch,
    name: &'static str,
}

impl PowerOps for SmmuPowerOps {
    fn power_on(&self) -> Result<(), PowerError> {
        if let Switch::Gdsc { gdsc, clocks } = &self.switch {
            gdsc.enable()?;
            for c in clocks {
                c.enable()?;
            }
        }
        self.host.driver.resume().map_err(|e| {
            warn!("SMMU power-up: resume: {e}");
            PowerError::Device {
                domain: self.name,
                what: "SMMU resume",
            }
        })
    }

    fn power_off(&self) -> Result<(), PowerError> {
        let quiesced = self.host.driver.suspend(route_event);
        if let Err(e) = &quiesced {
            warn!("SMMU power-down: suspend: {e}");
        }
        match &self.switch {
            Switch::Simulated => self.host.driver.simulate_power_loss(),
            Switch::Gdsc { gdsc, clocks } => {
                for c in clocks.iter().rev() {
                    c.disable()?;
                }
                gdsc.disable()?;
            }
        }
        quiesced.map_err(|_| PowerError::Device {
            domain: self.name,
            what: "SMMU suspend",
        })
    }

    fn now(&self) -> u64 {
        sysreg::counter()
    }
}

fn halt(name: &str) -> HaltCheck {
    match name {
        "voted" => HaltCheck::Voted,
        "delay" => HaltCheck::Delay,
        "skip" => HaltCheck::Skip,
        _ => HaltCheck::Check,
    }
}

/// Creates the SMMU's domain from the board file (powered: the SMMU was just reset). `None`
/// when the board declares no power domain: the SMMU then stays on.
pub fn init(host: &'static SmmuHost) -> Option<&'static SmmuDomain> {
    let cfg: &SmmuPowerConfig = board().smmu_power.as_ref()?;
    let (switch, name) = match cfg.domain {
        PowerDomainKind::Simulated => (Switch::Simulated, "smmu-simulated"),
        PowerDomainKind::Gdsc(g) => {
            // SAFETY: the clock controller's window is in the EL2 map as device memory
            // (`build_final_map` maps the board's GDSC window) and holds only clock registers.
            let mmio = unsafe { Mmio::new(g.base as usize, g.size) };
            let desc = GdscDesc::new(g.name, g.gdscr).with_flags(GdscFlags::from_bits(g.flags));
            let gdsc = Gdsc::new(mmio, desc, Timing::gdsc(delay_us));
            let clocks = g
                .clocks
                .iter()
                .map(|c| {
                    let desc = ClockDesc::new(c.name, c.cbcr).with_halt(halt(c.halt));
                    BranchClock::new(mmio, desc, Timing::clock(delay_us))
                })
                .collect();
            (Switch::Gdsc { gdsc, clocks }, g.name)
        }
    };
    let ops = SmmuPowerOps { host, switch, name };
    let delay = ms_to_ticks(u64::from(cfg.autosuspend_ms), sysreg::counter_freq());
    info!(
        "SMMU power domain {name}: runtime PM, autosuspend after {} ms",
        cfg.autosuspend_ms
    );
    Some(DOMAIN.call_once(|| Domain::new(ops, delay, true)))
}

/// The SMMU's domain, if it has one.
pub fn domain() -> Option<&'static SmmuDomain> {
    DOMAIN.get()
}

/// Runs `f` with the SMMU pinned on if it is powered (or has no power domain), never powering
/// it up: `None` when it is off (or going off) and `f` did not run. For work that only makes
/// sense on a powered SMMU and has nothing to catch up on later (a sync, draining events).
pub fn if_powered<R>(f: impl FnOnce() -> R) -> Option<R> {
    match domain() {
        None => Some(f()),
        Some(d) => {
            let _pin = d.get_if_active()?;
            Some(f())
        }
    }
}

/// Arms this CPU's EL2 timer for the domain's autosuspend deadline, if it is idle.
pub fn schedule_autosuspend() {
    let Some(d) = domain() else { return };
    if let Some(deadline) = d.next_deadline() {
        let now = sysreg::counter();
        platform::hyp_timer_arm(deadline.saturating_sub(now).max(1));
    }
}

/// The EL2 timer fired: suspend the domain if it is due, else wait for its new deadline.
pub fn timer_tick() {
    let Some(d) = domain() else { return };
    if !d.poll(sysreg::counter()) {
        schedule_autosuspend();
    }
}

/// The counters, for the end of the run and the test hypercall.
pub fn stats() -> Option<Stats> {
    domain().map(Domain::stats)
}

/// Prints the domain's counters (end of run).
pub fn report() {
    let Some(d) = domain() else { return };
    let s = d.stats();
    let freq = sysreg::counter_freq();
    let us = |t: u64| t * 1_000_000 / freq;
    let boot = BOOT_RESET_TICKS.load(Ordering::Relaxed);
    info!(
        "SMMU power: {} power-ups, {} power-downs, {} ms off, {} TLBIs skipped while off, resume mean {} us / max {} us (boot reset {} us), {} power-on errors, {} power-off errors, now {:?}",
        s.power_ups,
        s.power_downs,
        us(s.off_ticks) / 1000,
        s.tlbi_skipped,
        us(s.resume_total / s.power_ups.max(1)),
        us(s.resume_max),
        us(boot),
        s.power_on_errors,
        s.power_off_errors,
        d.state()
    );
}
