//! What a board says about the power domains in front of an SMMU (or one of its TBUs).
//!
//! The board file's plumbing fills these in (generated Rust, hence the `'static` data); this
//! module only defines the types and what their defaults are.

use super::clock::ClockDesc;
use super::gdsc::{GdscDesc, GdscFlags};

/// The default runtime-PM autosuspend delay, in ms (Linux arm-smmu uses 20 ms).
pub const DEFAULT_AUTOSUSPEND_MS: u32 = 20;

/// A branch clock and the clock controller it lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockConfig {
    /// Physical base of the clock controller's register window.
    pub base: u64,
    /// The clock within it.
    pub clock: ClockDesc,
}

/// One power domain: a GDSC, the clocks turned on with it and how long it may idle before being
/// suspended.
///
/// Power-up order: GDSC, then `clocks` in order; power-down: `clocks` in reverse, then the GDSC.
/// A domain flagged [`GdscFlags::SKIP_COLLAPSE`] is declared here so that nothing ever changes
/// its collapse bit (SDM845 MMNOC TBU GDSCs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerDomainConfig {
    /// Physical base of the clock controller holding the GDSC (e.g. SDM845 GCC 0x100000).
    pub base: u64,
    /// Size of that register window, in bytes.
    pub size: u32,
    /// The GDSC: name, GDSCR/CFG_GDSCR offsets, flags, wait values.
    pub gdsc: GdscDesc,
    /// Clocks turned on after the GDSC and off before it.
    pub clocks: &'static [ClockConfig],
    /// Idle time before runtime PM suspends the domain, in ms.
    pub autosuspend_ms: u32,
}

impl PowerDomainConfig {
    /// A domain with GDSC `name` at `gdscr` in the controller at `base` (`size` bytes), CFG_GDSCR
    /// at `gdscr + 4`, no flags, default wait values, no clocks and the default autosuspend delay.
    pub const fn new(name: &'static str, base: u64, size: u32, gdscr: u32) -> Self {
        Self {
            base,
            size,
            gdsc: GdscDesc::new(name, gdscr),
            clocks: &[],
            autosuspend_ms: DEFAULT_AUTOSUSPEND_MS,
        }
    }

    /// The same with `flags` added to the GDSC.
    pub const fn with_flags(mut self, flags: GdscFlags) -> Self {
        self.gdsc = self.gdsc.with_flags(flags);
        self
    }

    /// The same with these clocks.
    pub const fn with_clocks(mut self, clocks: &'static [ClockConfig]) -> Self {
        self.clocks = clocks;
        self
    }

    /// The domain's name (its GDSC's).
    pub const fn name(&self) -> &'static str {
        self.gdsc.name
    }

    /// Whether the hypervisor may ever change this domain's collapse bit.
    pub const fn may_toggle(&self) -> bool {
        !self.gdsc.flags.contains(GdscFlags::SKIP_COLLAPSE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::power::clock::HaltCheck;

    /// SDM845: the PCIe TBU vote and its clock, and an MMNOC TBU vote that must never move.
    const PCIE_TBU_CLOCKS: &[ClockConfig] = &[ClockConfig {
        base: 0x10_0000,
        clock: ClockDesc::new("gcc_aggre_noc_pcie_tbu_clk", 0x9000c).with_halt(HaltCheck::Skip),
    }];
    const PCIE_TBU: PowerDomainConfig = PowerDomainConfig::new(
        "hlos1_vote_aggre_noc_mmu_pcie_tbu_gdsc",
        0x10_0000,
        0x1f_0000,
        0x7d03c,
    )
    .with_flags(GdscFlags::VOTABLE)
    .with_clocks(PCIE_TBU_CLOCKS);
    const MMNOC_HF0: PowerDomainConfig = PowerDomainConfig::new(
        "hlos1_vote_mmnoc_mmu_tbu_hf0_gdsc",
        0x10_0000,
        0x1f_0000,
        0x7d040,
    )
    .with_flags(GdscFlags::VOTABLE.union(GdscFlags::SKIP_COLLAPSE));

    #[test]
    fn defaults_and_builders() {
        assert_eq!(PCIE_TBU.autosuspend_ms, 20);
        assert_eq!(PCIE_TBU.gdsc.cfg_gdscr, 0x7d040);
        assert_eq!(PCIE_TBU.name(), "hlos1_vote_aggre_noc_mmu_pcie_tbu_gdsc");
        assert_eq!(PCIE_TBU.clocks.len(), 1);
        assert!(PCIE_TBU.may_toggle());
        assert!(!MMNOC_HF0.may_toggle());
        assert!(MMNOC_HF0.gdsc.flags.contains(GdscFlags::VOTABLE));
    }
}
