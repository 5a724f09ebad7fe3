//! Emulated devices, plugged into a VM's [`MmioBus`](crate::trap::MmioBus).

pub mod pci_ecam;
pub mod pl011;
pub mod power_ctrl;

pub use pl011::{ConsoleSink, IrqLine, PL011_MMIO_SIZE, VirtPl011};
pub use power_ctrl::{POWER_CTRL_MMIO_SIZE, PowerDomain, VirtPowerCtrl};
