//! Qualcomm GDSC (globally distributed switch controller): one power domain's switch.
//!
//! Register layout (Linux `drivers/clk/qcom/gdsc.c`): GDSCR at the domain's offset in its clock
//! controller, CFG_GDSCR 4 bytes after it.
//!
//! | GDSCR bits | meaning |
//! |---|---|
//! | 31 `PWR_ON` | status: the domain is powered |
//! | 23:20 / 19:16 / 15:12 | EN_REST / EN_FEW / CLK_DIS wait values (2^n CXO cycles) |
//! | 11 `RETAIN_FF_ENABLE` | keep flip-flop state across collapse |
//! | 2 `SW_OVERRIDE` | cleared: the hardware state machine sequences power |
//! | 1 `HW_CONTROL` | the domain's hardware may collapse it on its own |
//! | 0 `SW_COLLAPSE` | 1 = request off, 0 = request on; for a *votable* GDSC, this master's vote |
//!
//! CFG_GDSCR bit 16 is POWER_UP_COMPLETE and bit 15 POWER_DOWN_COMPLETE; domains flagged
//! [`GdscFlags::POLL_CFG_GDSCR`] are polled there instead of on `PWR_ON`.
//!
//! Not modelled: CLAMP_IO / AON_RESET / SW_RESET sequences (GPU_GX, which the GMU owns), memory
//! retention CBCRs (`cxcs`), and retention power states: the hypervisor only turns domains fully on
//! and fully off.

use core::sync::atomic::{AtomicBool, Ordering};

use super::{PowerError, Regs, Timing, update_bits};

/// GDSCR: the domain is powered (read-only status).
pub const PWR_ON: u32 = 1 << 31;
/// GDSCR: EN_REST_WAIT field shift (4 bits).
pub const EN_REST_WAIT_SHIFT: u32 = 20;
/// GDSCR: EN_FEW_WAIT field shift (4 bits).
pub const EN_FEW_WAIT_SHIFT: u32 = 16;
/// GDSCR: CLK_DIS_WAIT field shift (4 bits).
pub const CLK_DIS_WAIT_SHIFT: u32 = 12;
/// GDSCR: the three wait fields.
pub const WAIT_MASK: u32 =
    (0xf << EN_REST_WAIT_SHIFT) | (0xf << EN_FEW_WAIT_SHIFT) | (0xf << CLK_DIS_WAIT_SHIFT);
/// GDSCR: retain flip-flops across collapse.
pub const RETAIN_FF_ENABLE: u32 = 1 << 11;
/// GDSCR: software override of the power sequencer.
pub const SW_OVERRIDE: u32 = 1 << 2;
/// GDSCR: hardware control of collapse.
pub const HW_CONTROL: u32 = 1 << 1;
/// GDSCR: software collapse request (or this master's "off" vote).
pub const SW_COLLAPSE: u32 = 1 << 0;
/// CFG_GDSCR is this many bytes after GDSCR.
pub const CFG_GDSCR_OFFSET: u32 = 4;
/// CFG_GDSCR: power-up sequence complete.
pub const POWER_UP_COMPLETE: u32 = 1 << 16;
/// CFG_GDSCR: power-down sequence complete.
pub const POWER_DOWN_COMPLETE: u32 = 1 << 15;

/// Default EN_REST_WAIT value (Linux).
pub const DEFAULT_EN_REST_WAIT: u8 = 0x2;
/// Default EN_FEW_WAIT value (Linux).
pub const DEFAULT_EN_FEW_WAIT: u8 = 0x8;
/// Default CLK_DIS_WAIT value (Linux; SDM845 GPU_CX uses 0x8).
pub const DEFAULT_CLK_DIS_WAIT: u8 = 0x2;

/// How long a votable GDSC is left alone after dropping the vote, in µs (Linux `TIMEOUT_US`), so
/// an enable right after a disable does not catch it in an unknown state.
pub const VOTE_OFF_DELAY_US: u32 = 500;

/// Properties of a GDSC (Linux `gdsc.h` flags, plus the SKIP one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GdscFlags(u32);

impl GdscFlags {
    /// No flags.
    pub const NONE: Self = Self(0);
    /// The GDSCR collapse bit is this master's vote; other masters may keep the domain on, so its
    /// status is not polled on disable.
    pub const VOTABLE: Self = Self(1 << 0);
    /// Hand collapse to the hardware after enable; take it back (and see it on) before disable.
    pub const HW_CTRL: Self = Self(1 << 2);
    /// Poll CFG_GDSCR's POWER_UP/DOWN_COMPLETE instead of GDSCR's PWR_ON.
    pub const POLL_CFG_GDSCR: Self = Self(1 << 5);
    /// Turned on at init and never turned off.
    pub const ALWAYS_ON: Self = Self(1 << 6);
    /// Set RETAIN_FF_ENABLE after enable.
    pub const RETAIN_FF_ENABLE: Self = Self(1 << 7);
    /// Never change the collapse bit: enable and disable succeed without touching the hardware.
    /// The board declares such domains. SDM845's MMNOC TBU GDSCs (HLOS1_VOTE_MMNOC_MMU_TBU_HF0,
    /// HF1, SF) must stay in software-collapse mode (their power-on default): changing the bit
    /// can hang the board (Linux's proposed SKIP_SET_COLLAPSE).
    pub const SKIP_COLLAPSE: Self = Self(1 << 10);

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Flags from raw bits (the values of the constants above).
    pub const fn from_bits(bits: u32) -> Self {
        Self(bits)
    }

    /// Whether every flag in `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Both sets of flags.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

impl core::ops::BitOr for GdscFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

/// What describes one GDSC; offsets are relative to its clock controller's register window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GdscDesc {
    /// Name, for errors and logs (e.g. `"pcie_0_gdsc"`).
    pub name: &'static str,
    /// GDSCR offset.
    pub gdscr: u32,
    /// CFG_GDSCR offset (normally `gdscr + 4`).
    pub cfg_gdscr: u32,
    /// A separate status register (bit 31 = on) for domains whose power is tracked elsewhere
    /// (Linux `gds_hw_ctrl`, e.g. SDM845 GPU_CX at GPUCC 0x1540).
    pub gds_hw_ctrl: Option<u32>,
    /// Properties.
    pub flags: GdscFlags,
    /// EN_REST_WAIT (4 bits).
    pub en_rest_wait: u8,
    /// EN_FEW_WAIT (4 bits).
    pub en_few_wait: u8,
    /// CLK_DIS_WAIT (4 bits).
    pub clk_dis_wait: u8,
}

impl GdscDesc {
    /// A GDSC at `gdscr` with CFG_GDSCR right after it, no flags and the default wait values.
    pub const fn new(name: &'static str, gdscr: u32) -> Self {
        Self {
            name,
            gdscr,
            cfg_gdscr: gdscr + CFG_GDSCR_OFFSET,
            gds_hw_ctrl: None,
            flags: GdscFlags::NONE,
            en_rest_wait: DEFAULT_EN_REST_WAIT,
            en_few_wait: DEFAULT_EN_FEW_WAIT,
            clk_dis_wait: DEFAULT_CLK_DIS_WAIT,
        }
    }

    /// The same with `flags` added.
    pub const fn with_flags(mut self, flags: GdscFlags) -> Self {
        self.flags = self.flags.union(flags);
        self
    }

    /// GDSCR's wait fields as programmed at init.
    pub const fn wait_bits(&self) -> u32 {
        ((self.en_rest_wait as u32 & 0xf) << EN_REST_WAIT_SHIFT)
            | ((self.en_few_wait as u32 & 0xf) << EN_FEW_WAIT_SHIFT)
            | ((self.clk_dis_wait as u32 & 0xf) << CLK_DIS_WAIT_SHIFT)
    }
}

/// One GDSC over its clock controller's registers.
///
/// Operations on one GDSC must be serialized by the caller (they are read-modify-write sequences
/// on GDSCR); different GDSCs on one controller may be driven concurrently.
pub struct Gdsc<R: Regs> {
    regs: R,
    desc: GdscDesc,
    timing: Timing,
    programmed: AtomicBool,
}

/// The awaited state of a status poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    On,
    Off,
}

impl<R: Regs> Gdsc<R> {
    /// A GDSC; nothing is touched until [`init`](Self::init), [`enable`](Self::enable) or
    /// [`disable`](Self::disable).
    pub const fn new(regs: R, desc: GdscDesc, timing: Timing) -> Self {
        Self {
            regs,
            desc,
            timing,
            programmed: AtomicBool::new(false),
        }
    }

    /// The description.
    pub const fn desc(&self) -> &GdscDesc {
        &self.desc
    }

    /// The name.
    pub const fn name(&self) -> &'static str {
        self.desc.name
    }

    /// Brings the GDSC under our control and says whether it is on.
    ///
    /// Programs the wait values and clears HW_CONTROL and SW_OVERRIDE (once per `Gdsc`; `enable`
    /// and `disable` do it too if `init` was never called), turns on an ALWAYS_ON domain, and for a
    /// votable domain that is already on, casts our vote so that it stays on while we think it is.
    /// A SKIP_COLLAPSE domain is only read.
    pub fn init(&self) -> Result<bool, PowerError> {
        if self.skip() {
            return Ok(self.check(State::On));
        }
        self.program();
        let mut on = self.check(State::On);
        if self.has(GdscFlags::ALWAYS_ON) && !on {
            self.toggle(State::On)?;
            on = true;
        }
        if on {
            if self.has(GdscFlags::VOTABLE) {
                self.set_collapse(false);
            }
            if self.has(GdscFlags::RETAIN_FF_ENABLE) {
                update_bits(
                    &self.regs,
                    self.desc.gdscr,
                    RETAIN_FF_ENABLE,
                    RETAIN_FF_ENABLE,
                );
            }
        }
        Ok(on)
    }

    /// Powers the domain on (for a votable domain: casts our vote and waits until it is on).
    ///
    /// Clears SW_COLLAPSE, polls PWR_ON (or CFG_GDSCR's POWER_UP_COMPLETE, or the `gds_hw_ctrl`
    /// register), waits 1 µs before clocks may be turned on, then sets RETAIN_FF_ENABLE and hands
    /// collapse to the hardware where flagged.
    ///
    /// A [`SKIP_COLLAPSE`](GdscFlags::SKIP_COLLAPSE) domain returns `Ok` without touching any
    /// register: on SDM845 the MMNOC TBU GDSCs must stay in software-collapse mode, and changing
    /// their collapse bit can hang the board.
    pub fn enable(&self) -> Result<(), PowerError> {
        if self.skip() {
            return Ok(());
        }
        self.program();
        self.toggle(State::On)?;
        // Clocks must not be turned on within 400 ns of the power-up.
        (self.timing.delay_us)(1);
        if self.has(GdscFlags::RETAIN_FF_ENABLE) {
            update_bits(
                &self.regs,
                self.desc.gdscr,
                RETAIN_FF_ENABLE,
                RETAIN_FF_ENABLE,
            );
        }
        if self.has(GdscFlags::HW_CTRL) {
            self.hw_control(true)?;
        }
        Ok(())
    }

    /// Powers the domain off (for a votable domain: drops our vote).
    ///
    /// Takes collapse back from the hardware (and sees the domain on) where HW_CTRL is flagged,
    /// sets SW_COLLAPSE, then polls for off — except on a votable domain, where another master may
    /// keep it on: there the status is not polled and the GDSC is left alone for
    /// [`VOTE_OFF_DELAY_US`] instead.
    ///
    /// An ALWAYS_ON domain stays on and a [`SKIP_COLLAPSE`](GdscFlags::SKIP_COLLAPSE) domain is not
    /// touched (SDM845 MMNOC TBU GDSCs hang the board if their collapse bit changes); both return
    /// `Ok`.
    pub fn disable(&self) -> Result<(), PowerError> {
        if self.skip() || self.has(GdscFlags::ALWAYS_ON) {
            return Ok(());
        }
        self.program();
        if self.has(GdscFlags::HW_CTRL) {
            self.hw_control(false)?;
        }
        self.toggle(State::Off)
    }

    /// Gives collapse control to the domain's hardware (`true`) or takes it back (`false`).
    ///
    /// Taking it back powers the domain up again if the hardware had collapsed it, so that case
    /// waits for the domain to be on. A SKIP_COLLAPSE domain is not touched.
    pub fn hw_control(&self, hw: bool) -> Result<(), PowerError> {
        if self.skip() {
            return Ok(());
        }
        update_bits(
            &self.regs,
            self.desc.gdscr,
            HW_CONTROL,
            if hw { HW_CONTROL } else { 0 },
        );
        // Let the GDSC go through a collapse/restore cycle before anyone reads its status.
        (self.timing.delay_us)(1);
        if !hw {
            self.poll(State::On)?;
        }
        Ok(())
    }

    /// Whether the domain reports on (where this GDSC's flags say to look).
    pub fn is_on(&self) -> bool {
        self.check(State::On)
    }

    fn has(&self, f: GdscFlags) -> bool {
        self.desc.flags.contains(f)
    }

    fn skip(&self) -> bool {
        self.has(GdscFlags::SKIP_COLLAPSE)
    }

    /// Programs the wait values and hands sequencing to the hardware state machine, once.
    fn program(&self) {
        if self.programmed.swap(true, Ordering::AcqRel) {
            return;
        }
        update_bits(
            &self.regs,
            self.desc.gdscr,
            WAIT_MASK | HW_CONTROL | SW_OVERRIDE,
            self.desc.wait_bits(),
        );
    }

    fn set_collapse(&self, collapse: bool) {
        debug_assert!(
            !self.skip(),
            "{}: collapse bit of a SKIP_COLLAPSE GDSC",
            self.desc.name
        );
        update_bits(
            &self.regs,
            self.desc.gdscr,
            SW_COLLAPSE,
            if collapse { SW_COLLAPSE } else { 0 },
        );
    }

    /// Requests `state` and waits for it (Linux `gdsc_toggle_logic`).
    fn toggle(&self, state: State) -> Result<(), PowerError> {
        self.set_collapse(state == State::Off);
        if state == State::Off && self.has(GdscFlags::VOTABLE) {
            // Our vote is gone; the domain may rightly stay on for another master.
            (self.timing.delay_us)(VOTE_OFF_DELAY_US);
            return Ok(());
        }
        if self.desc.gds_hw_ctrl.is_some() {
            (self.timing.delay_us)(1);
        }
        self.poll(state)
    }

    fn status_reg(&self) -> u32 {
        if self.has(GdscFlags::POLL_CFG_GDSCR) {
            self.desc.cfg_gdscr
        } else {
            self.desc.gds_hw_ctrl.unwrap_or(self.desc.gdscr)
        }
    }

    fn reached(&self, v: u32, state: State) -> bool {
        match (self.has(GdscFlags::POLL_CFG_GDSCR), state) {
            (true, State::On) => v & POWER_UP_COMPLETE != 0,
            (true, State::Off) => v & POWER_DOWN_COMPLETE != 0,
            (false, State::On) => v & PWR_ON != 0,
            (false, State::Off) => v & PWR_ON == 0,
        }
    }

    fn check(&self, state: State) -> bool {
        self.reached(self.regs.read(self.status_reg()), state)
    }

    fn poll(&self, state: State) -> Result<(), PowerError> {
        let what = match state {
            State::On => "power on",
            State::Off => "power off",
        };
        self.timing
            .poll(
                &self.regs,
                self.status_reg(),
                |v| self.reached(v, state),
                self.desc.name,
                what,
            )
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::power::model::{self, GdscSim, Model};

    fn timing() -> Timing {
        Timing {
            max_polls: 50,
            delay_us: model::record_delay,
        }
    }

    const GDSCR: u32 = 0x6b004;

    fn model_with(sim: GdscSim) -> Model {
        let m = Model::new();
        m.add_gdsc(sim);
        m
    }

    #[test]
    fn enable_programs_waits_once_and_polls_pwr_on() {
        let m = model_with(GdscSim::new(GDSCR).latency(5));
        let desc = GdscDesc {
            clk_dis_wait: 0x8,
            ..GdscDesc::new("pcie_0", GDSCR)
        };
        let g = Gdsc::new(&m, desc, timing());
        assert!(!g.is_on());
        model::take_delays();
        g.enable().unwrap();
        assert!(g.is_on());
        let v = m.peek(GDSCR);
        assert_eq!(v & SW_COLLAPSE, 0);
        assert_eq!(v & (HW_CONTROL | SW_OVERRIDE), 0);
        assert_eq!((v >> EN_REST_WAIT_SHIFT) & 0xf, 0x2);
        assert_eq!((v >> EN_FEW_WAIT_SHIFT) & 0xf, 0x8);
        assert_eq!((v >> CLK_DIS_WAIT_SHIFT) & 0xf, 0x8);
        assert!(
            m.status_reads(GDSCR) >= 5,
            "PWR_ON was polled until it came"
        );
        // The 1 µs settle before clocks.
        assert!(model::take_delays().ends_with(&[1]));

        g.disable().unwrap();
        assert!(!g.is_on());
        assert_eq!(m.peek(GDSCR) & SW_COLLAPSE, SW_COLLAPSE);

        // The wait fields are written once: a board-side change afterwards is not overwritten.
        m.poke(GDSCR, m.peek(GDSCR) & !WAIT_MASK);
        g.enable().unwrap();
        assert_eq!(m.peek(GDSCR) & WAIT_MASK, 0);
    }

    #[test]
    fn stuck_gdsc_times_out() {
        let m = model_with(GdscSim::new(GDSCR).stuck_off());
        let g = Gdsc::new(&m, GdscDesc::new("stuck", GDSCR), timing());
        model::take_delays();
        assert_eq!(
            g.enable(),
            Err(PowerError::Timeout {
                domain: "stuck",
                what: "power on"
            })
        );
        // Bounded: exactly max_polls status reads after the collapse-bit update, relaxing between.
        let delays = model::take_delays();
        assert_eq!(delays.iter().filter(|&&d| d == 1).count(), 49);
    }

    #[test]
    fn stuck_on_gdsc_times_out_on_disable() {
        let m = model_with(GdscSim::new(GDSCR).latency(1).other_vote(true));
        let g = Gdsc::new(&m, GdscDesc::new("held", GDSCR), timing());
        g.enable().unwrap();
        assert_eq!(
            g.disable(),
            Err(PowerError::Timeout {
                domain: "held",
                what: "power off"
            })
        );
    }

    #[test]
    fn votable_disable_does_not_poll_and_leaves_other_masters_vote() {
        let m = model_with(GdscSim::new(GDSCR).latency(3).other_vote(true));
        let desc = GdscDesc::new("tbu1", GDSCR).with_flags(GdscFlags::VOTABLE);
        let g = Gdsc::new(&m, desc, timing());
        // Another master holds it on; init casts our vote too.
        assert!(g.init().unwrap());
        assert_eq!(m.peek(GDSCR) & SW_COLLAPSE, 0);
        g.enable().unwrap();
        let reads = m.status_reads(GDSCR);
        model::take_delays();
        g.disable().unwrap();
        // Our vote is dropped, the domain stays on, and we waited instead of polling.
        assert_eq!(m.peek(GDSCR) & SW_COLLAPSE, SW_COLLAPSE);
        assert!(g.is_on());
        assert_eq!(model::take_delays(), vec![VOTE_OFF_DELAY_US]);
        // Only the read-modify-write of the collapse bit (and `is_on` above) read GDSCR.
        assert!(m.status_reads(GDSCR) - reads <= 2);
    }

    #[test]
    fn votable_alone_goes_off_eventually() {
        let m = model_with(GdscSim::new(GDSCR).latency(2));
        let desc = GdscDesc::new("tbu2", GDSCR).with_flags(GdscFlags::VOTABLE);
        let g = Gdsc::new(&m, desc, timing());
        assert!(!g.init().unwrap());
        g.enable().unwrap();
        g.disable().unwrap();
        // Not polled by `disable`, but with no other vote the domain does go off.
        assert!((0..3).any(|_| !g.is_on()));
    }

    #[test]
    fn poll_cfg_gdscr_uses_power_up_and_down_complete() {
        // PWR_ON never shows: only CFG_GDSCR reports, so success proves CFG_GDSCR was polled.
        let m = model_with(GdscSim::new(GDSCR).latency(4).no_pwr_on_status());
        let desc = GdscDesc::new("ufs_phy", GDSCR).with_flags(GdscFlags::POLL_CFG_GDSCR);
        let g = Gdsc::new(&m, desc, timing());
        g.enable().unwrap();
        assert!(m.status_reads(GDSCR + CFG_GDSCR_OFFSET) >= 4);
        assert_eq!(
            m.peek(GDSCR + CFG_GDSCR_OFFSET) & POWER_UP_COMPLETE,
            POWER_UP_COMPLETE
        );
        g.disable().unwrap();
        assert_eq!(
            m.peek(GDSCR + CFG_GDSCR_OFFSET) & POWER_DOWN_COMPLETE,
            POWER_DOWN_COMPLETE
        );

        // Without the flag, the same hardware times out on PWR_ON.
        let m = model_with(GdscSim::new(GDSCR).latency(4).no_pwr_on_status());
        let g = Gdsc::new(&m, GdscDesc::new("ufs_phy", GDSCR), timing());
        assert!(matches!(
            g.enable(),
            Err(PowerError::Timeout {
                what: "power on",
                ..
            })
        ));
    }

    #[test]
    fn gds_hw_ctrl_register_is_polled() {
        let m = model_with(
            GdscSim::new(0x106c)
                .latency(3)
                .status_at(0x1540)
                .no_pwr_on_status(),
        );
        let desc = GdscDesc {
            gds_hw_ctrl: Some(0x1540),
            ..GdscDesc::new("gpu_cx", 0x106c)
        }
        .with_flags(GdscFlags::VOTABLE);
        let g = Gdsc::new(&m, desc, timing());
        g.enable().unwrap();
        assert!(m.status_reads(0x1540) >= 3);
        assert!(g.is_on());
    }

    #[test]
    fn hw_ctrl_is_set_after_enable_and_cleared_before_disable() {
        let m = model_with(GdscSim::new(GDSCR).latency(2));
        let desc = GdscDesc::new("hw", GDSCR).with_flags(GdscFlags::HW_CTRL);
        let g = Gdsc::new(&m, desc, timing());
        g.enable().unwrap();
        assert_eq!(m.peek(GDSCR) & HW_CONTROL, HW_CONTROL);
        let n = m.writes().len();
        g.disable().unwrap();
        let w: Vec<u32> = m.writes()[n..].iter().map(|&(_, v)| v).collect();
        // First HW_CONTROL cleared (collapse still 0), then collapse set.
        assert_eq!(w[0] & (HW_CONTROL | SW_COLLAPSE), 0);
        assert_eq!(w[1] & (HW_CONTROL | SW_COLLAPSE), SW_COLLAPSE);
        assert!(!g.is_on());

        // Explicit hand-over and take-back.
        g.enable().unwrap();
        g.hw_control(false).unwrap();
        assert_eq!(m.peek(GDSCR) & HW_CONTROL, 0);
        g.hw_control(true).unwrap();
        assert_eq!(m.peek(GDSCR) & HW_CONTROL, HW_CONTROL);
    }

    #[test]
    fn skip_collapse_never_writes() {
        let m = model_with(GdscSim::new(0x7d040).latency(1));
        // Power-on default: software collapse.
        m.poke(0x7d040, SW_COLLAPSE);
        let desc = GdscDesc::new("mmnoc_tbu_hf0", 0x7d040)
            .with_flags(GdscFlags::VOTABLE | GdscFlags::SKIP_COLLAPSE);
        let g = Gdsc::new(&m, desc, timing());
        assert!(!g.init().unwrap());
        g.enable().unwrap();
        g.hw_control(true).unwrap();
        g.disable().unwrap();
        assert!(m.writes().is_empty());
        assert_eq!(m.peek(0x7d040), SW_COLLAPSE);
    }

    #[test]
    fn always_on_is_turned_on_at_init_and_never_off() {
        let m = model_with(GdscSim::new(GDSCR).latency(2));
        m.poke(GDSCR, SW_COLLAPSE);
        let desc = GdscDesc::new("aon", GDSCR).with_flags(GdscFlags::ALWAYS_ON);
        let g = Gdsc::new(&m, desc, timing());
        assert!(g.init().unwrap());
        g.disable().unwrap();
        assert!(g.is_on());
    }

    #[test]
    fn retain_ff_is_set_after_enable() {
        let m = model_with(GdscSim::new(GDSCR));
        let desc = GdscDesc::new("ff", GDSCR).with_flags(GdscFlags::RETAIN_FF_ENABLE);
        let g = Gdsc::new(&m, desc, timing());
        g.enable().unwrap();
        assert_eq!(m.peek(GDSCR) & RETAIN_FF_ENABLE, RETAIN_FF_ENABLE);
    }

    #[test]
    fn flags_and_desc_helpers() {
        let f = GdscFlags::VOTABLE | GdscFlags::HW_CTRL;
        assert!(f.contains(GdscFlags::VOTABLE) && !f.contains(GdscFlags::SKIP_COLLAPSE));
        assert_eq!(GdscFlags::from_bits(f.bits()), f);
        let d = GdscDesc::new("x", 0x10);
        assert_eq!(d.cfg_gdscr, 0x14);
        assert_eq!(d.wait_bits(), 0x0028_2000);
        let e = PowerError::Timeout {
            domain: "x",
            what: "power on",
        };
        assert_eq!(alloc::format!("{e}"), "x: timed out waiting for power on");
    }
}
