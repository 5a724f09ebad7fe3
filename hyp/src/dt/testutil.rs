//! Test helpers: the QEMU fixture and a small builder for hand-made DTBs.

use alloc::string::String;
use alloc::vec::Vec;

use vm_fdt::{FdtReserveEntry, FdtWriter, FdtWriterNode};

/// `-M virt,virtualization=on,gic-version=3,iommu=smmuv3 -cpu max -smp 4 -m 1G`, QEMU 10.0.2.
pub(crate) const QEMU_VIRT: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/qemu-virt-smp4.dtb"
));

/// Builds a DTB with nested closures. The root starts with `#address-cells = 2` and
/// `#size-cells = 2`; add further root properties before the first child.
pub(crate) struct Builder {
    writer: FdtWriter,
    root: Option<FdtWriterNode>,
}

impl Builder {
    pub fn new() -> Self {
        Self::with_reservations(&[])
    }

    pub fn with_reservations(rsv: &[(u64, u64)]) -> Self {
        let entries: Vec<_> = rsv
            .iter()
            .map(|&(a, s)| FdtReserveEntry::new(a, s).unwrap())
            .collect();
        let mut writer = FdtWriter::new_with_mem_reserv(&entries).unwrap();
        let root = writer.begin_node("").unwrap();
        let mut b = Self {
            writer,
            root: Some(root),
        };
        b.u32("#address-cells", 2).u32("#size-cells", 2);
        b
    }

    pub fn node(&mut self, name: &str, f: impl FnOnce(&mut Self)) -> &mut Self {
        let node = self.writer.begin_node(name).unwrap();
        f(self);
        self.writer.end_node(node).unwrap();
        self
    }

    pub fn u32(&mut self, name: &str, value: u32) -> &mut Self {
        self.writer.property_u32(name, value).unwrap();
        self
    }

    pub fn cells(&mut self, name: &str, cells: &[u32]) -> &mut Self {
        self.writer.property_array_u32(name, cells).unwrap();
        self
    }

    pub fn string(&mut self, name: &str, value: &str) -> &mut Self {
        self.writer.property_string(name, value).unwrap();
        self
    }

    pub fn strings(&mut self, name: &str, values: &[&str]) -> &mut Self {
        let values = values.iter().map(|s| String::from(*s)).collect();
        self.writer.property_string_list(name, values).unwrap();
        self
    }

    pub fn empty(&mut self, name: &str) -> &mut Self {
        self.writer.property_null(name).unwrap();
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        let root = self.root.take().unwrap();
        self.writer.end_node(root).unwrap();
        self.writer.finish().unwrap()
    }
}

/// A small valid DTB: one memory reservation, `/chosen` and one memory node.
pub(crate) fn simple_dtb() -> Vec<u8> {
    let mut b = Builder::with_reservations(&[(0x4800_0000, 0x1000)]);
    b.string("compatible", "test");
    b.node("chosen", |b| {
        b.string("bootargs", "console=ttyAMA0");
    });
    b.node("memory@40000000", |b| {
        b.string("device_type", "memory")
            .cells("reg", &[0, 0x4000_0000, 0, 0x1000_0000]);
    });
    b.finish()
}

fn be32(data: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(data[at..at + 4].try_into().unwrap())
}

/// Inserts an `FDT_NOP` after every token of a valid blob's structure block (as libfdt's
/// `fdt_nop_property` would leave behind). Assumes `vm_fdt`'s layout: structure, then strings.
pub(crate) fn with_nops(dtb: &[u8]) -> Vec<u8> {
    let (off_struct, size_struct) = (be32(dtb, 8) as usize, be32(dtb, 36) as usize);
    let block = &dtb[off_struct..off_struct + size_struct];
    let mut tokens = Vec::new();
    let mut at = 0;
    while at < block.len() {
        let next = match be32(block, at) {
            1 => (at + 4 + block[at + 4..].iter().position(|&b| b == 0).unwrap() + 1)
                .next_multiple_of(4),
            3 => (at + 12 + be32(block, at + 4) as usize).next_multiple_of(4),
            _ => at + 4,
        };
        tokens.extend_from_slice(&block[at..next]);
        if be32(block, at) != 9 {
            tokens.extend_from_slice(&4u32.to_be_bytes());
        }
        at = next;
    }
    let grow = tokens.len() - size_struct;
    let mut out = dtb[..off_struct].to_vec();
    out.extend_from_slice(&tokens);
    out.extend_from_slice(&dtb[off_struct + size_struct..]);
    let set =
        |out: &mut Vec<u8>, at: usize, v: u32| out[at..at + 4].copy_from_slice(&v.to_be_bytes());
    set(&mut out, 4, be32(dtb, 4) + grow as u32);
    set(&mut out, 12, be32(dtb, 12) + grow as u32);
    set(&mut out, 36, tokens.len() as u32);
    out
}

/// Exercises every walker of the `fdt` crate that `dt` relies on.
pub(crate) fn walk_all(fdt: &fdt::Fdt<'_>) {
    for node in fdt.all_nodes() {
        for prop in node.properties() {
            core::hint::black_box((prop.name, prop.value));
        }
        for child in node.children() {
            core::hint::black_box(child.name);
        }
    }
    core::hint::black_box(fdt.memory_reservations().count());
}
