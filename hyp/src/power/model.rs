//! Register-level model of a Qualcomm clock controller's GDSCs and branch clocks (tests only).
//!
//! A GDSC's power follows its request (SW_COLLAPSE clear, or another master's vote) after
//! `latency` reads of any of its status registers (GDSCR, CFG_GDSCR, the `gds_hw_ctrl` register);
//! a branch clock's CLK_OFF follows CLK_ENABLE the same way on CBCR reads. Faults: a GDSC or clock
//! that never turns on, one held on by another master, a GDSC whose PWR_ON bit never shows.
//! Other offsets are plain storage. Every write is logged; [`Model::poke`] and [`Model::peek`]
//! bypass the log and the clock of the model.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::vec::Vec;

use super::Regs;
use super::clock::{CLK_ENABLE, CLK_OFF};
use super::gdsc::{CFG_GDSCR_OFFSET, POWER_DOWN_COMPLETE, POWER_UP_COMPLETE, PWR_ON, SW_COLLAPSE};

std::thread_local! {
    static DELAYS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// A `Timing::delay_us` hook that records each delay on this thread.
pub(crate) fn record_delay(us: u32) {
    DELAYS.with(|d| d.borrow_mut().push(us));
}

/// The delays recorded on this thread since the last call.
pub(crate) fn take_delays() -> Vec<u32> {
    DELAYS.with(|d| core::mem::take(&mut *d.borrow_mut()))
}

/// One simulated GDSC.
#[derive(Debug, Clone)]
pub(crate) struct GdscSim {
    gdscr: u32,
    status_at: Option<u32>,
    latency: u32,
    stuck_off: bool,
    other_vote: bool,
    no_pwr_on: bool,
    on: bool,
    pending: u32,
}

impl GdscSim {
    /// A GDSC at `gdscr`, collapsed (the power-on default), that follows requests at once.
    pub(crate) fn new(gdscr: u32) -> Self {
        Self {
            gdscr,
            status_at: None,
            latency: 0,
            stuck_off: false,
            other_vote: false,
            no_pwr_on: false,
            on: false,
            pending: 0,
        }
    }
    /// Power follows a request after `n` status reads.
    pub(crate) fn latency(mut self, n: u32) -> Self {
        self.latency = n;
        self
    }
    /// Never powers on.
    pub(crate) fn stuck_off(mut self) -> Self {
        self.stuck_off = true;
        self
    }
    /// Another master votes it on (it is on from the start).
    pub(crate) fn other_vote(mut self, held: bool) -> Self {
        self.other_vote = held;
        self
    }
    /// GDSCR's PWR_ON never shows (only CFG_GDSCR and the `gds_hw_ctrl` register report).
    pub(crate) fn no_pwr_on_status(mut self) -> Self {
        self.no_pwr_on = true;
        self
    }
    /// Also reports PWR_ON in bit 31 of this register (Linux `gds_hw_ctrl`).
    pub(crate) fn status_at(mut self, off: u32) -> Self {
        self.status_at = Some(off);
        self
    }

    fn target(&self, gdscr: u32) -> bool {
        !self.stuck_off && (gdscr & SW_COLLAPSE == 0 || self.other_vote)
    }

    fn request(&mut self, gdscr: u32) {
        let t = self.target(gdscr);
        if t == self.on {
            self.pending = 0;
        } else if self.pending == 0 {
            self.pending = self.latency;
            if self.pending == 0 {
                self.on = t;
            }
        }
    }

    fn tick(&mut self, gdscr: u32) {
        if self.pending > 0 {
            self.pending -= 1;
            if self.pending == 0 {
                self.on = self.target(gdscr);
            }
        }
    }
}

/// One simulated branch clock.
#[derive(Debug, Clone)]
pub(crate) struct ClockSim {
    cbcr: u32,
    latency: u32,
    stuck: Option<bool>,
    on: bool,
    pending: u32,
}

impl ClockSim {
    /// A branch clock at `cbcr`, off, that follows CLK_ENABLE at once.
    pub(crate) fn new(cbcr: u32) -> Self {
        Self {
            cbcr,
            latency: 0,
            stuck: None,
            on: false,
            pending: 0,
        }
    }
    /// CLK_OFF follows CLK_ENABLE after `n` CBCR reads.
    pub(crate) fn latency(mut self, n: u32) -> Self {
        self.latency = n;
        self
    }
    /// The clock's status stays at on (`true`) or off (`false`) whatever is written.
    pub(crate) fn stuck(mut self, on: bool) -> Self {
        self.stuck = Some(on);
        self.on = on;
        self
    }

    fn target(&self, cbcr: u32) -> bool {
        self.stuck.unwrap_or(cbcr & CLK_ENABLE != 0)
    }

    fn request(&mut self, cbcr: u32) {
        let t = self.target(cbcr);
        if t == self.on {
            self.pending = 0;
        } else if self.pending == 0 {
            self.pending = self.latency;
            if self.pending == 0 {
                self.on = t;
            }
        }
    }

    fn tick(&mut self, cbcr: u32) {
        if self.pending > 0 {
            self.pending -= 1;
            if self.pending == 0 {
                self.on = self.target(cbcr);
            }
        }
    }
}

#[derive(Default)]
struct Inner {
    regs: BTreeMap<u32, u32>,
    gdscs: Vec<GdscSim>,
    clocks: Vec<ClockSim>,
    writes: Vec<(u32, u32)>,
    reads: BTreeMap<u32, usize>,
}

impl Inner {
    fn raw(&self, off: u32) -> u32 {
        self.regs.get(&off).copied().unwrap_or(0)
    }

    /// The value a read of `off` returns now (without advancing the model).
    fn compose(&self, off: u32) -> u32 {
        let raw = self.raw(off);
        for g in &self.gdscs {
            let settled = g.pending == 0;
            if off == g.gdscr {
                let on = g.on && !g.no_pwr_on;
                return (raw & !PWR_ON) | if on { PWR_ON } else { 0 };
            }
            if off == g.gdscr + CFG_GDSCR_OFFSET {
                let st = match (g.on, settled) {
                    (true, true) => POWER_UP_COMPLETE,
                    (false, true) => POWER_DOWN_COMPLETE,
                    _ => 0,
                };
                return (raw & !(POWER_UP_COMPLETE | POWER_DOWN_COMPLETE)) | st;
            }
            if Some(off) == g.status_at {
                return (raw & !PWR_ON) | if g.on { PWR_ON } else { 0 };
            }
        }
        for c in &self.clocks {
            if off == c.cbcr {
                return (raw & !CLK_OFF) | if c.on { 0 } else { CLK_OFF };
            }
        }
        raw
    }

    fn tick(&mut self, off: u32) {
        let regs = &self.regs;
        for g in &mut self.gdscs {
            if off == g.gdscr || off == g.gdscr + CFG_GDSCR_OFFSET || Some(off) == g.status_at {
                g.tick(regs.get(&g.gdscr).copied().unwrap_or(0));
            }
        }
        for c in &mut self.clocks {
            if off == c.cbcr {
                c.tick(regs.get(&c.cbcr).copied().unwrap_or(0));
            }
        }
    }

    fn store(&mut self, off: u32, v: u32) {
        self.regs.insert(off, v);
        for g in &mut self.gdscs {
            if off == g.gdscr {
                g.request(v);
            }
        }
        for c in &mut self.clocks {
            if off == c.cbcr {
                c.request(v);
            }
        }
    }
}

/// A clock controller's register window.
#[derive(Default)]
pub(crate) struct Model {
    inner: Mutex<Inner>,
}

impl Model {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Adds a GDSC; its GDSCR starts with SW_COLLAPSE set.
    pub(crate) fn add_gdsc(&self, mut sim: GdscSim) {
        let mut inner = self.inner.lock().unwrap();
        inner.regs.insert(sim.gdscr, SW_COLLAPSE);
        sim.on = sim.target(SW_COLLAPSE);
        inner.gdscs.push(sim);
    }

    /// Adds a branch clock; its CBCR starts with CLK_ENABLE clear.
    pub(crate) fn add_clock(&self, sim: ClockSim) {
        self.inner.lock().unwrap().clocks.push(sim);
    }

    /// Sets a register as the hardware would be found, without logging; simulated blocks take
    /// the new request at once.
    pub(crate) fn poke(&self, off: u32, v: u32) {
        let mut inner = self.inner.lock().unwrap();
        inner.store(off, v);
        for g in inner.gdscs.iter_mut().filter(|g| g.gdscr == off) {
            g.pending = 0;
            g.on = g.target(v);
        }
        for c in inner.clocks.iter_mut().filter(|c| c.cbcr == off) {
            c.pending = 0;
            c.on = c.target(v);
        }
    }

    /// What a read of `off` would return, without counting it as a read.
    pub(crate) fn peek(&self, off: u32) -> u32 {
        self.inner.lock().unwrap().compose(off)
    }

    /// Every logged write, in order.
    pub(crate) fn writes(&self) -> Vec<(u32, u32)> {
        self.inner.lock().unwrap().writes.clone()
    }

    /// How many times `off` was read.
    pub(crate) fn status_reads(&self, off: u32) -> usize {
        self.inner
            .lock()
            .unwrap()
            .reads
            .get(&off)
            .copied()
            .unwrap_or(0)
    }
}

impl Regs for Model {
    fn read(&self, off: u32) -> u32 {
        let mut inner = self.inner.lock().unwrap();
        *inner.reads.entry(off).or_default() += 1;
        inner.tick(off);
        inner.compose(off)
    }

    fn write(&self, off: u32, v: u32) {
        let mut inner = self.inner.lock().unwrap();
        inner.writes.push((off, v));
        inner.store(off, v);
    }
}
