//! Board configuration as compiled into the image.
//!
//! `cargo xtask build` reads `boards/<board>/board.toml`, validates it (field names in every error),
//! and writes a Rust file that builds a [`BoardConfig`] out of these types; `build.rs` includes it.
//! The device tree describes the machine; this describes what the DT cannot say: how the machine is
//! partitioned into VMs, and board facts the DT lacks. Everything here is `'static` data so the
//! image carries it without any parsing at boot.

/// How the hypervisor ends a run once every VM has stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitMethod {
    /// Arm semihosting `SYS_EXIT` (QEMU `-semihosting`): the exit status reaches the host.
    Semihosting,
    /// PSCI `SYSTEM_OFF` on success, `SYSTEM_RESET` on failure (real hardware).
    Psci,
}

/// The whole board: hardware facts the DT does not carry, plus the VMs.
#[derive(Debug)]
pub struct BoardConfig {
    /// Board name, as the folder under `boards/`.
    pub name: &'static str,
    /// How the run ends.
    pub exit: ExitMethod,
    /// Base of a PL011 to print on before (and without) the device tree, so that even a bad DTB
    /// can be reported. `None` on boards without a PL011 (SDM845: GENI UART, later).
    pub early_console: Option<u64>,
    /// Bytes of RAM the hypervisor reserves for itself (heap and page-table frames), placed right
    /// after its own image.
    pub hyp_pool_size: u64,
    /// The SMMU's power domain: `None` keeps the SMMU powered all the time (no runtime PM).
    pub smmu_power: Option<SmmuPowerConfig>,
    /// The VMs, in VMID order (VMID = index + 1).
    pub vms: &'static [VmConfig],
}

/// Runtime power management of the SMMU: how its domain is switched and how long it may idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmmuPowerConfig {
    /// What switches the power.
    pub domain: PowerDomainKind,
    /// Idle time after the last active master before the SMMU is powered off, in ms.
    pub autosuspend_ms: u32,
}

/// What switches an SMMU's power.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerDomainKind {
    /// No power switch (QEMU): "off" disables the SMMU and wipes its registers, as a real power
    /// collapse would, so that power-up must re-program it completely.
    Simulated,
    /// A Qualcomm GDSC and the branch clocks turned on with it.
    Gdsc(GdscConfig),
}

/// A Qualcomm GDSC in a clock controller (facts: `power::gdsc`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GdscConfig {
    /// The GDSC's name, for messages (e.g. `"hlos1_vote_aggre_noc_mmu_pcie_tbu_gdsc"`).
    pub name: &'static str,
    /// Physical base of the clock controller's register window.
    pub base: u64,
    /// Size of that window in bytes.
    pub size: u32,
    /// GDSCR offset in the window (CFG_GDSCR follows at + 4).
    pub gdscr: u32,
    /// `power::gdsc::GdscFlags` bits.
    pub flags: u32,
    /// Branch clocks in the same window, turned on after the GDSC and off before it.
    pub clocks: &'static [BranchClockConfig],
}

/// A branch clock (CBCR) in a GDSC's clock controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BranchClockConfig {
    /// The clock's name, for messages.
    pub name: &'static str,
    /// CBCR offset in the clock controller's window.
    pub cbcr: u32,
    /// How enable/disable are confirmed: `"check"`, `"voted"`, `"delay"` or `"skip"`
    /// (`power::clock::HaltCheck`).
    pub halt: &'static str,
}

/// A region of guest RAM: `size` bytes at guest-physical `ipa`, backed by host-physical `pa`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRegion {
    pub ipa: u64,
    pub pa: u64,
    pub size: u64,
}

/// A passthrough MMIO window (device registers) mapped into the VM at `ipa`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioRange {
    pub ipa: u64,
    pub pa: u64,
    pub size: u64,
}

/// A PCI function by bus/device/function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciFunction {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl PciFunction {
    /// The requester ID, which is also the SMMU stream ID on QEMU `virt`.
    pub const fn bdf(&self) -> u16 {
        ((self.bus as u16) << 8) | ((self.device as u16) << 3) | self.function as u16
    }
}

/// One VM.
#[derive(Debug)]
pub struct VmConfig {
    pub name: &'static str,
    /// Physical CPUs owned by this VM, as indices into the DT's `/cpus` list. vCPU `i` runs on
    /// `cpus[i]` and nowhere else.
    pub cpus: &'static [u32],
    /// Guest RAM. The first region holds the guest DTB (at its start) and the payload (2 MiB in).
    pub memory: &'static [MemRegion],
    /// Passthrough MMIO windows.
    pub devices: &'static [MmioRange],
    /// IPA of the emulated PL011 console this VM sees (its DT node is kept at that address).
    pub console_ipa: Option<u64>,
    /// PCI functions assigned to the VM.
    pub pci: &'static [PciFunction],
    /// SMMU stream IDs the VM's devices use.
    pub stream_ids: &'static [u32],
    /// Name of the payload (e.g. "selftest"), for messages.
    pub payload_name: &'static str,
    /// The payload image (raw arm64 Image), copied into guest RAM at boot.
    pub payload: &'static [u8],
    /// An initramfs for the payload (Linux), copied into guest RAM and named in `/chosen`
    /// (`linux,initrd-start`/`-end`); empty for none.
    pub initrd: &'static [u8],
    /// Kernel command line for `/chosen/bootargs`; `None` keeps the bootloader's.
    pub bootargs: Option<&'static str>,
    /// Offer the hypervisor's test hypercalls to this VM (stage-2 unmap and remap of its own
    /// RAM, see `trap::hyptest`). Off unless the board file asks for it.
    pub test_services: bool,
    /// IPA of the emulated power controller (`vdev::power_ctrl`) the VM votes through.
    pub power_controller_ipa: Option<u64>,
    /// PCI functions (of `pci`) whose activity is the guest's power vote: domain `i` of the
    /// power controller is `power_votes[i]`. Every other function is active while it has Bus
    /// Master Enable set and is in D0.
    pub power_votes: &'static [PciFunction],
}

impl VmConfig {
    /// Total guest RAM in bytes.
    pub fn ram_size(&self) -> u64 {
        self.memory.iter().map(|m| m.size).sum()
    }
}
