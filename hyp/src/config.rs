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
    /// The VMs, in VMID order (VMID = index + 1).
    pub vms: &'static [VmConfig],
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
    /// Kernel command line for `/chosen/bootargs`; `None` keeps the bootloader's.
    pub bootargs: Option<&'static str>,
    /// Offer the hypervisor's test hypercalls to this VM (stage-2 unmap and remap of its own
    /// RAM, see `trap::hyptest`). Off unless the board file asks for it.
    pub test_services: bool,
}

impl VmConfig {
    /// Total guest RAM in bytes.
    pub fn ram_size(&self) -> u64 {
        self.memory.iter().map(|m| m.size).sum()
    }
}
