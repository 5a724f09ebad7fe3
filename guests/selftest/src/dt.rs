//! What the guest learns from its device tree.

use fdt::Fdt;

use crate::arch::MPIDR_AFF_MASK;
use crate::report::{Msg, fail};

/// CPU nodes recorded (the DT may list more; the smp check then fails).
pub const MAX_DT_CPUS: usize = 16;

/// The parsed device tree.
pub struct DtInfo {
    /// Where the DTB lies and its total size.
    pub addr: usize,
    pub size: usize,
    /// MPIDR affinity (`reg`) of the first [`MAX_DT_CPUS`] cpu nodes.
    pub cpus: [u64; MAX_DT_CPUS],
    /// Number of cpu nodes.
    pub ncpus: usize,
    /// The `/memory` region holding the image (else the first region), as
    /// `(base, size)`.
    pub ram: Option<(usize, usize)>,
    /// `/chosen/bootargs`, or "" when absent.
    pub bootargs: &'static str,
    /// `method` of the PSCI node, if there is one.
    pub psci_method: Option<&'static str>,
}

impl DtInfo {
    /// The recorded cpu MPIDRs.
    pub fn cpu_mpidrs(&self) -> &[u64] {
        &self.cpus[..self.ncpus.min(MAX_DT_CPUS)]
    }
}

/// Parses the DTB at `addr` (x0 at boot).
pub fn parse(addr: usize, image: (usize, usize)) -> Result<DtInfo, Msg> {
    if addr == 0 || !addr.is_multiple_of(8) {
        fail!("bad DTB address {addr:#x}");
    }
    // SAFETY: the hypervisor passes the DTB address in x0 at boot; the DTB
    // lies in guest RAM (mapped), and nothing writes to it afterwards (the
    // memory check skips it), so it may be borrowed for 'static.
    let fdt = match unsafe { Fdt::from_ptr(addr as *const u8) } {
        Ok(f) => f,
        Err(e) => fail!("cannot parse DTB at {addr:#x}: {e:?}"),
    };

    let mut cpus = [0; MAX_DT_CPUS];
    let mut ncpus = 0;
    if let Some(node) = fdt.find_node("/cpus") {
        for cpu in node
            .children()
            .filter(|n| n.name.split('@').next() == Some("cpu"))
        {
            let Some(reg) = cpu.property("reg").and_then(|p| p.as_usize()) else {
                fail!("cpu node {} has no usable reg", cpu.name);
            };
            if ncpus < MAX_DT_CPUS {
                cpus[ncpus] = reg as u64 & MPIDR_AFF_MASK;
            }
            ncpus += 1;
        }
    }

    let (img_start, img_end) = image;
    let mut ram = None;
    for node in fdt
        .all_nodes()
        .filter(|n| n.name.split('@').next() == Some("memory"))
    {
        for region in node.reg().into_iter().flatten() {
            let base = region.starting_address as usize;
            let size = region.size.unwrap_or(0);
            let holds_image = base <= img_start && img_end <= base.saturating_add(size);
            if holds_image || ram.is_none() {
                ram = Some((base, size));
            }
            if holds_image {
                break;
            }
        }
    }

    let bootargs = fdt
        .find_node("/chosen")
        .and_then(|n| n.property("bootargs"))
        .and_then(|p| p.as_str())
        .unwrap_or("");
    let psci_method = fdt
        .find_node("/psci")
        .or_else(|| fdt.find_compatible(&["arm,psci-1.0", "arm,psci-0.2", "arm,psci"]))
        .and_then(|n| n.property("method"))
        .and_then(|p| p.as_str());

    Ok(DtInfo {
        addr,
        size: fdt.total_size(),
        cpus,
        ncpus,
        ram,
        bootargs,
        psci_method,
    })
}
