//! Qualcomm branch clocks: one clock gate in a clock controller, its CBCR register.
//!
//! CBCR bit 0 is CLK_ENABLE (the request); bit 31 is CLK_OFF (status: the clock is not running).
//! After a request the driver waits for the status to follow — the *halt check* (Linux
//! `drivers/clk/qcom/clk-branch.c`). Some branches cannot be checked that way; [`HaltCheck`] says
//! how each is waited for.

use super::{PowerError, Regs, Timing, update_bits};

/// CBCR: enable request.
pub const CLK_ENABLE: u32 = 1 << 0;
/// CBCR: the clock is off (status, read-only).
pub const CLK_OFF: u32 = 1 << 31;
/// The fixed wait of [`HaltCheck::Delay`] and of a voted branch's disable, in µs (Linux).
pub const HALT_DELAY_US: u32 = 10;

/// How a branch's enable and disable are confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HaltCheck {
    /// Poll CLK_OFF clear after enable and set after disable (Linux `BRANCH_HALT`).
    #[default]
    Check,
    /// The enable is a vote shared with other masters: poll CLK_OFF clear after enable; after
    /// disable only wait [`HALT_DELAY_US`], as another voter may keep it running
    /// (`BRANCH_HALT_VOTED`).
    Voted,
    /// The status is not usable: wait [`HALT_DELAY_US`] both ways (`BRANCH_HALT_DELAY`).
    Delay,
    /// Halt checks are disabled for this branch: do not wait at all (`BRANCH_HALT_SKIP`).
    Skip,
}

/// What describes one branch clock; the offset is relative to its clock controller's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockDesc {
    /// Name, for errors and logs (e.g. `"gcc_aggre_noc_pcie_tbu_clk"`).
    pub name: &'static str,
    /// CBCR offset.
    pub cbcr: u32,
    /// How enable and disable are confirmed.
    pub halt: HaltCheck,
}

impl ClockDesc {
    /// A branch at `cbcr` with the normal halt check.
    pub const fn new(name: &'static str, cbcr: u32) -> Self {
        Self {
            name,
            cbcr,
            halt: HaltCheck::Check,
        }
    }

    /// The same with another halt check.
    pub const fn with_halt(mut self, halt: HaltCheck) -> Self {
        self.halt = halt;
        self
    }
}

/// One branch clock over its clock controller's registers.
///
/// Operations on one clock must be serialized by the caller (enable and disable are
/// read-modify-writes of CBCR).
pub struct BranchClock<R: Regs> {
    regs: R,
    desc: ClockDesc,
    timing: Timing,
}

impl<R: Regs> BranchClock<R> {
    /// A branch clock; nothing is touched until [`enable`](Self::enable) or
    /// [`disable`](Self::disable).
    pub const fn new(regs: R, desc: ClockDesc, timing: Timing) -> Self {
        Self { regs, desc, timing }
    }

    /// The description.
    pub const fn desc(&self) -> &ClockDesc {
        &self.desc
    }

    /// The name.
    pub const fn name(&self) -> &'static str {
        self.desc.name
    }

    /// Sets CLK_ENABLE and waits until the clock runs (as its [`HaltCheck`] says).
    pub fn enable(&self) -> Result<(), PowerError> {
        update_bits(&self.regs, self.desc.cbcr, CLK_ENABLE, CLK_ENABLE);
        self.wait(true)
    }

    /// Clears CLK_ENABLE and waits until the clock stops (as its [`HaltCheck`] says).
    pub fn disable(&self) -> Result<(), PowerError> {
        update_bits(&self.regs, self.desc.cbcr, CLK_ENABLE, 0);
        self.wait(false)
    }

    /// Whether CBCR reports the clock running.
    pub fn is_on(&self) -> bool {
        self.regs.read(self.desc.cbcr) & CLK_OFF == 0
    }

    fn wait(&self, on: bool) -> Result<(), PowerError> {
        match (self.desc.halt, on) {
            (HaltCheck::Skip, _) => Ok(()),
            (HaltCheck::Delay, _) | (HaltCheck::Voted, false) => {
                (self.timing.delay_us)(HALT_DELAY_US);
                Ok(())
            }
            (HaltCheck::Check | HaltCheck::Voted, _) => {
                let what = if on { "clock on" } else { "clock off" };
                self.timing
                    .poll(
                        &self.regs,
                        self.desc.cbcr,
                        |v| (v & CLK_OFF == 0) == on,
                        self.desc.name,
                        what,
                    )
                    .map(|_| ())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::power::model::{self, ClockSim, Model};

    const CBCR: u32 = 0x9000c;

    fn timing() -> Timing {
        Timing {
            max_polls: 20,
            delay_us: model::record_delay,
        }
    }

    fn setup(sim: ClockSim, halt: HaltCheck) -> (Model, ClockDesc) {
        let m = Model::new();
        m.add_clock(sim);
        (m, ClockDesc::new("gcc_test_clk", CBCR).with_halt(halt))
    }

    #[test]
    fn enable_polls_clk_off_clear_and_disable_polls_it_set() {
        let (m, d) = setup(ClockSim::new(CBCR).latency(4), HaltCheck::Check);
        let c = BranchClock::new(&m, d, timing());
        assert!(!c.is_on());
        c.enable().unwrap();
        assert_eq!(m.peek(CBCR) & (CLK_ENABLE | CLK_OFF), CLK_ENABLE);
        assert!(m.status_reads(CBCR) >= 4);
        c.disable().unwrap();
        assert_eq!(m.peek(CBCR) & (CLK_ENABLE | CLK_OFF), CLK_OFF);
        // Only CLK_ENABLE changed (CLK_OFF is read-only: writing back what was read is harmless).
        let other = !(CLK_ENABLE | CLK_OFF);
        assert!(
            m.writes()
                .iter()
                .all(|&(off, v)| off == CBCR && v & other == 0)
        );
    }

    #[test]
    fn stuck_clock_times_out_both_ways() {
        let (m, d) = setup(ClockSim::new(CBCR).stuck(false), HaltCheck::Check);
        let c = BranchClock::new(&m, d, timing());
        model::take_delays();
        assert_eq!(
            c.enable(),
            Err(PowerError::Timeout {
                domain: "gcc_test_clk",
                what: "clock on"
            })
        );
        assert_eq!(
            model::take_delays().len(),
            19,
            "bounded: 20 polls, relaxing between"
        );

        let (m, d) = setup(ClockSim::new(CBCR).stuck(true), HaltCheck::Check);
        let c = BranchClock::new(&m, d, timing());
        c.enable().unwrap();
        assert_eq!(
            c.disable(),
            Err(PowerError::Timeout {
                domain: "gcc_test_clk",
                what: "clock off"
            })
        );
    }

    #[test]
    fn voted_branch_polls_enable_only() {
        let (m, d) = setup(ClockSim::new(CBCR).stuck(true), HaltCheck::Voted);
        let c = BranchClock::new(&m, d, timing());
        c.enable().unwrap();
        model::take_delays();
        // Another voter keeps it running; our disable still succeeds after the fixed wait.
        c.disable().unwrap();
        assert_eq!(model::take_delays(), vec![HALT_DELAY_US]);
        assert!(c.is_on());

        let (m, d) = setup(ClockSim::new(CBCR).stuck(false), HaltCheck::Voted);
        let c = BranchClock::new(&m, d, timing());
        assert!(matches!(
            c.enable(),
            Err(PowerError::Timeout {
                what: "clock on",
                ..
            })
        ));
    }

    #[test]
    fn halt_check_skip_and_delay_never_poll() {
        for (halt, delays) in [(HaltCheck::Skip, vec![]), (HaltCheck::Delay, vec![10, 10])] {
            let (m, d) = setup(ClockSim::new(CBCR).stuck(false), halt);
            let c = BranchClock::new(&m, d, timing());
            model::take_delays();
            c.enable().unwrap();
            c.disable().unwrap();
            assert_eq!(model::take_delays(), delays);
            // Only the read-modify-writes read CBCR.
            assert_eq!(m.status_reads(CBCR), 2);
            assert_eq!(m.peek(CBCR) & CLK_ENABLE, 0);
        }
    }
}
