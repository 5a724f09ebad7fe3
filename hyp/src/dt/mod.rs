//! Device-tree handling: discovering the machine from the DTB we were booted with, and deriving
//! the DTB each VM boots with.
//!
//! The hypervisor gets exactly one description of the hardware: the flattened device tree (DTB)
//! whose address the bootloader puts in `x0`. [`parse`] turns it into a [`Machine`], plain data
//! the rest of the hypervisor uses to find RAM, CPUs, the GIC, the console, the SMMU and the PCIe
//! host. [`derive_guest`] rewrites the same blob into a VM's DTB, so fixups the bootloader made
//! (bootargs, board quirks) reach the guest while host-only details (host RAM, initrd, devices
//! the VM does not own) are left out.
//!
//! # Why we do not trust the `fdt` crate with everything
//!
//! Reading uses the `fdt` crate (0.1.5) only as a token walker: nodes, their names, children and
//! raw properties. Everything above that is done here, because the crate is lax or wrong exactly
//! where the hypervisor needs precision:
//!
//! * It panics (`unwrap`, `expect`, slice indexing) on malformed structure blocks, bad string
//!   offsets, short `#address-cells` values and NOP tokens between properties. A hypervisor must
//!   report a bad DTB, not die on it, so the private `blob` module walks and checks the whole
//!   blob before the crate sees it, and removes NOP tokens (which libfdt-based bootloaders may
//!   leave behind) from a private copy.
//! * `interrupts()` only understands 1- or 2-cell specifiers, so GICv3's 3-cell
//!   `<type number flags>` comes back empty. We decode `interrupts` and `interrupts-extended`
//!   ourselves, honouring the interrupt parent's `#interrupt-cells`.
//! * `reg()` gives up when `#address-cells` or `#size-cells` is above 2 and does no `ranges`
//!   translation. We read `reg` with the parent's cell sizes and translate through the `ranges`
//!   of every ancestor bus, so nodes below `/soc@0` (SDM845) get CPU physical addresses.
//! * `find_node` falls back to `/aliases` recursively: an alias whose value names itself
//!   recurses forever. We look paths and aliases up ourselves, one level only.
//!
//! All of this module is portable (`no_std` + `alloc`) and tested on the host against a DTB
//! dumped from QEMU's `virt` machine and against small blobs built with `vm_fdt` in the tests.

mod blob;
mod guest;
mod machine;
mod tree;

#[cfg(test)]
mod testutil;

use alloc::string::String;
use core::fmt;

pub use guest::{GuestSpec, PowerCtrlNode, derive_guest};
pub use machine::{
    Conduit, Cpu, GicV3, IommuMap, Irq, IrqKind, Machine, PciRange, PciSpace, PcieHost, Psci,
    Region, Smmu, SmmuKind, TimerIrqs, Uart, UartKind, parse,
};

/// Everything that can go wrong reading a host DTB or writing a guest one.
///
/// Messages name the node path and, where one is involved, the property, e.g.
/// ``/intc@8000000: property `reg`: expected at least 2 regions (GICD, 1 GICR), found 1``.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DtError {
    /// The blob is not a flattened device tree at all (header checks failed).
    NotFdt(String),
    /// The header is fine but the structure block, strings block or memory-reservation block
    /// is broken.
    Malformed(String),
    /// Something needed is absent from the tree (e.g. the `/cpus` node or a GICv3).
    Missing(String),
    /// A node is present but unusable as a whole.
    Node {
        /// Full path of the node.
        path: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A property of a node is missing or malformed.
    Property {
        /// Full path of the node.
        path: String,
        /// Property name.
        prop: String,
        /// What is wrong with it.
        msg: String,
    },
    /// The [`GuestSpec`] handed to [`derive_guest`] cannot be expressed.
    Spec(String),
    /// `vm_fdt` refused to write the guest tree (invalid name, value too large, ...).
    Write {
        /// Path of the node being written.
        path: String,
        /// The writer's error.
        msg: String,
    },
}

impl DtError {
    pub(crate) fn node(path: &str, msg: impl Into<String>) -> Self {
        Self::Node {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn prop(path: &str, prop: &str, msg: impl Into<String>) -> Self {
        Self::Property {
            path: path.into(),
            prop: prop.into(),
            msg: msg.into(),
        }
    }
}

impl fmt::Display for DtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFdt(msg) => write!(f, "not a device tree: {msg}"),
            Self::Malformed(msg) => write!(f, "malformed device tree: {msg}"),
            Self::Missing(what) => write!(f, "device tree has no {what}"),
            Self::Node { path, msg } => write!(f, "{path}: {msg}"),
            Self::Property { path, prop, msg } => write!(f, "{path}: property `{prop}`: {msg}"),
            Self::Spec(msg) => write!(f, "invalid guest spec: {msg}"),
            Self::Write { path, msg } => write!(f, "writing guest device tree at {path}: {msg}"),
        }
    }
}

impl core::error::Error for DtError {}
