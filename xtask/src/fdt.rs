//! A minimal flattened-device-tree (DTB) reader and editor, enough to corrupt a DTB on purpose
//! for the `bad-dtb` system test without `dtc`: it can list nodes and properties and shorten a
//! property in place (the removed bytes are cut out of the structure block and the header's
//! offsets and sizes are fixed up, so the result is a well-formed DTB).

use anyhow::{Result, bail, ensure};

const MAGIC: u32 = 0xd00d_feed;
const BEGIN_NODE: u32 = 1;
const END_NODE: u32 = 2;
const PROP: u32 = 3;
const NOP: u32 = 4;
const END: u32 = 9;

// Header field offsets.
const H_TOTALSIZE: usize = 4;
const H_OFF_STRUCT: usize = 8;
const H_OFF_STRINGS: usize = 12;
const H_OFF_RSVMAP: usize = 16;
const H_SIZE_STRINGS: usize = 32;
const H_SIZE_STRUCT: usize = 36;

/// One property as found in the blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prop {
    pub name: String,
    /// Offset of the value in the blob.
    pub value_off: usize,
    pub len: usize,
}

/// One node: its full path and its properties.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub path: String,
    pub props: Vec<Prop>,
}

impl Node {
    pub fn prop(&self, name: &str) -> Option<&Prop> {
        self.props.iter().find(|p| p.name == name)
    }
}

fn be32(b: &[u8], off: usize) -> Result<u32> {
    match b.get(off..off + 4) {
        Some(s) => Ok(u32::from_be_bytes(s.try_into().unwrap())),
        None => bail!("DTB truncated at offset {off:#x}"),
    }
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

fn align4(v: usize) -> usize {
    (v + 3) & !3
}

fn cstr(b: &[u8], off: usize) -> Result<&str> {
    let rest = b.get(off..).unwrap_or_default();
    let Some(n) = rest.iter().position(|&c| c == 0) else {
        bail!("unterminated string at offset {off:#x}");
    };
    Ok(std::str::from_utf8(&rest[..n])?)
}

/// A parsed DTB.
pub struct Fdt {
    pub blob: Vec<u8>,
    pub nodes: Vec<Node>,
}

impl Fdt {
    pub fn parse(blob: Vec<u8>) -> Result<Fdt> {
        ensure!(blob.len() >= 40, "DTB shorter than its header");
        ensure!(be32(&blob, 0)? == MAGIC, "not a DTB (bad magic)");
        let total = be32(&blob, H_TOTALSIZE)? as usize;
        ensure!(
            total <= blob.len(),
            "DTB totalsize {total:#x} exceeds the file"
        );
        let off_struct = be32(&blob, H_OFF_STRUCT)? as usize;
        let size_struct = be32(&blob, H_SIZE_STRUCT)? as usize;
        let off_strings = be32(&blob, H_OFF_STRINGS)? as usize;
        let struct_end = off_struct + size_struct;
        ensure!(struct_end <= total, "structure block runs past totalsize");

        let mut nodes: Vec<Node> = Vec::new();
        let mut stack: Vec<usize> = Vec::new(); // indices into `nodes`
        let mut off = off_struct;
        loop {
            ensure!(off < struct_end, "structure block ends without FDT_END");
            let token = be32(&blob, off)?;
            off += 4;
            match token {
                BEGIN_NODE => {
                    let name = cstr(&blob, off)?.to_owned();
                    off = align4(off + name.len() + 1);
                    let path = match stack.last().map(|&p| nodes[p].path.as_str()) {
                        None => "/".to_owned(),
                        Some("/") => format!("/{name}"),
                        Some(parent) => format!("{parent}/{name}"),
                    };
                    nodes.push(Node {
                        path,
                        props: Vec::new(),
                    });
                    stack.push(nodes.len() - 1);
                }
                END_NODE => {
                    ensure!(stack.pop().is_some(), "unbalanced FDT_END_NODE at {off:#x}");
                }
                PROP => {
                    let len = be32(&blob, off)? as usize;
                    let nameoff = be32(&blob, off + 4)? as usize;
                    let name = cstr(&blob, off_strings + nameoff)?.to_owned();
                    let value_off = off + 8;
                    ensure!(
                        value_off + len <= struct_end,
                        "property {name} runs past the block"
                    );
                    let Some(&node) = stack.last() else {
                        bail!("property {name} outside any node");
                    };
                    nodes[node].props.push(Prop {
                        name,
                        value_off,
                        len,
                    });
                    off = align4(value_off + len);
                }
                NOP => {}
                END => break,
                other => bail!("unknown FDT token {other:#x} at offset {:#x}", off - 4),
            }
        }
        ensure!(stack.is_empty(), "FDT_END inside a node");
        Ok(Fdt { blob, nodes })
    }

    pub fn node(&self, path: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.path == path)
    }

    pub fn value(&self, p: &Prop) -> &[u8] {
        &self.blob[p.value_off..p.value_off + p.len]
    }

    /// A `u32` property of the root (e.g. `#address-cells`), if present.
    pub fn root_u32(&self, name: &str) -> Option<u32> {
        let p = self.node("/")?.prop(name)?;
        let v = self.value(p);
        (v.len() == 4).then(|| u32::from_be_bytes(v.try_into().unwrap()))
    }

    /// The first node whose `compatible` list holds one of `compats`.
    pub fn find_compatible(&self, compats: &[&str]) -> Option<&Node> {
        self.nodes.iter().find(|n| {
            n.prop("compatible").is_some_and(|p| {
                self.value(p)
                    .split(|&b| b == 0)
                    .any(|c| compats.iter().any(|want| c == want.as_bytes()))
            })
        })
    }

    /// Shortens property `name` of the node at `path` to `new_len` bytes, cutting the tail out
    /// of the blob and fixing the header. Returns the new blob.
    pub fn truncate_prop(self, path: &str, name: &str, new_len: usize) -> Result<Vec<u8>> {
        let Some(node) = self.node(path) else {
            bail!("no node {path}");
        };
        let Some(prop) = node.prop(name) else {
            bail!("node {path} has no property {name}");
        };
        ensure!(
            new_len < prop.len,
            "{path}/{name} is {} bytes, not longer than {new_len}",
            prop.len
        );
        ensure!(
            new_len.is_multiple_of(4),
            "new length {new_len} is not a multiple of 4"
        );
        let cut_start = prop.value_off + new_len;
        let cut = align4(prop.len) - new_len;
        let len_field = prop.value_off - 8;
        let mut b = self.blob;
        let total = be32(&b, H_TOTALSIZE)? as usize;
        b.truncate(total);
        put32(&mut b, len_field, new_len as u32);
        b.drain(cut_start..cut_start + cut);
        put32(&mut b, H_TOTALSIZE, (total - cut) as u32);
        let size_struct = be32(&b, H_SIZE_STRUCT)?;
        put32(&mut b, H_SIZE_STRUCT, size_struct - cut as u32);
        // Blocks placed after the cut move down.
        for field in [H_OFF_STRUCT, H_OFF_STRINGS, H_OFF_RSVMAP] {
            let v = be32(&b, field)? as usize;
            if v > cut_start {
                put32(&mut b, field, (v - cut) as u32);
            }
        }
        Ok(b)
    }
}

/// Drops the free space after the last block (QEMU's dumps carry about 1 MiB of it, and its
/// `-dtb` loader doubles a file's size again), setting `totalsize` to what is used.
pub fn pack(mut b: Vec<u8>) -> Result<Vec<u8>> {
    ensure!(
        b.len() >= 40 && be32(&b, 0)? == MAGIC,
        "not a DTB (bad magic)"
    );
    let off_rsvmap = be32(&b, H_OFF_RSVMAP)? as usize;
    let mut rsv_end = off_rsvmap;
    loop {
        let (addr, size) = (
            be32(&b, rsv_end)? | be32(&b, rsv_end + 4)?,
            be32(&b, rsv_end + 8)? | be32(&b, rsv_end + 12)?,
        );
        rsv_end += 16;
        if addr == 0 && size == 0 {
            break;
        }
    }
    let struct_end = (be32(&b, H_OFF_STRUCT)? + be32(&b, H_SIZE_STRUCT)?) as usize;
    let strings_end = (be32(&b, H_OFF_STRINGS)? + be32(&b, H_SIZE_STRINGS)?) as usize;
    let used = rsv_end.max(struct_end).max(strings_end);
    let total = be32(&b, H_TOTALSIZE)? as usize;
    ensure!(
        used <= total && total <= b.len(),
        "DTB blocks run past totalsize"
    );
    b.truncate(used);
    put32(&mut b, H_TOTALSIZE, used as u32);
    Ok(b)
}

/// Corrupts a DTB for the `bad-dtb` test: the GICv3 node's `reg` (distributor + redistributor
/// ranges) is cut to one (address, size) pair, and the blob is [`pack`]ed. Returns the new blob
/// and the node's path.
pub fn cut_gic_reg(blob: Vec<u8>) -> Result<(Vec<u8>, String)> {
    let fdt = Fdt::parse(blob)?;
    let address_cells = fdt.root_u32("#address-cells").unwrap_or(2) as usize;
    let size_cells = fdt.root_u32("#size-cells").unwrap_or(1) as usize;
    let pair = (address_cells + size_cells) * 4;
    let Some(gic) = fdt.find_compatible(&["arm,gic-v3"]) else {
        bail!("the DTB has no arm,gic-v3 node");
    };
    let path = gic.path.clone();
    let blob = fdt.truncate_prop(&path, "reg", pair)?;
    Ok((pack(blob)?, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A tiny DTB writer for tests.
    #[derive(Default)]
    pub struct Builder {
        structs: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Builder {
        fn tok(&mut self, t: u32) {
            self.structs.extend(t.to_be_bytes());
        }
        fn pad(&mut self) {
            while !self.structs.len().is_multiple_of(4) {
                self.structs.push(0);
            }
        }
        pub fn begin(&mut self, name: &str) -> &mut Self {
            self.tok(BEGIN_NODE);
            self.structs.extend(name.as_bytes());
            self.structs.push(0);
            self.pad();
            self
        }
        pub fn end(&mut self) -> &mut Self {
            self.tok(END_NODE);
            self
        }
        pub fn prop(&mut self, name: &str, value: &[u8]) -> &mut Self {
            let nameoff = self.strings.len() as u32;
            self.strings.extend(name.as_bytes());
            self.strings.push(0);
            self.tok(PROP);
            self.tok(value.len() as u32);
            self.tok(nameoff);
            self.structs.extend(value);
            self.pad();
            self
        }
        pub fn cells(&mut self, name: &str, cells: &[u32]) -> &mut Self {
            let v: Vec<u8> = cells.iter().flat_map(|c| c.to_be_bytes()).collect();
            self.prop(name, &v)
        }
        pub fn finish(&mut self) -> Vec<u8> {
            self.tok(END);
            let rsv = 40;
            let off_struct = rsv + 16; // one empty reservation entry
            let off_strings = off_struct + self.structs.len();
            let total = off_strings + self.strings.len() + 64; // slack, like QEMU's dumps
            let mut b = vec![0u8; total];
            for (off, v) in [
                (0, MAGIC),
                (4, total as u32),
                (8, off_struct as u32),
                (12, off_strings as u32),
                (16, rsv as u32),
                (20, 17),
                (24, 16),
                (28, 0),
                (32, self.strings.len() as u32),
                (36, self.structs.len() as u32),
            ] {
                put32(&mut b, off, v);
            }
            b[off_struct..off_strings].copy_from_slice(&self.structs);
            b[off_strings..off_strings + self.strings.len()].copy_from_slice(&self.strings);
            b
        }
    }

    fn sample() -> Vec<u8> {
        Builder::default()
            .begin("")
            .cells("#address-cells", &[2])
            .cells("#size-cells", &[2])
            .begin("intc@8000000")
            .prop("compatible", b"arm,gic-v3\0")
            .cells(
                "reg",
                &[0, 0x0800_0000, 0, 0x1_0000, 0, 0x080a_0000, 0, 0xf6_0000],
            )
            .prop("interrupt-controller", b"")
            .begin("its@8080000")
            .prop("compatible", b"arm,gic-v3-its\0")
            .end()
            .end()
            .begin("pl011@9000000")
            .prop("compatible", b"arm,pl011\0arm,primecell\0")
            .cells("reg", &[0, 0x0900_0000, 0, 0x1000])
            .end()
            .end()
            .finish()
    }

    #[test]
    fn parses_nodes_and_props() {
        let fdt = Fdt::parse(sample()).unwrap();
        let paths: Vec<&str> = fdt.nodes.iter().map(|n| n.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/",
                "/intc@8000000",
                "/intc@8000000/its@8080000",
                "/pl011@9000000"
            ]
        );
        assert_eq!(fdt.root_u32("#address-cells"), Some(2));
        let gic = fdt.find_compatible(&["arm,gic-v3"]).unwrap();
        assert_eq!(gic.path, "/intc@8000000");
        assert_eq!(gic.prop("reg").unwrap().len, 32);
        assert_eq!(
            fdt.find_compatible(&["arm,primecell"]).unwrap().path,
            "/pl011@9000000"
        );
    }

    #[test]
    fn cuts_gic_reg_to_one_pair() {
        let before = sample();
        let (after, path) = cut_gic_reg(before.clone()).unwrap();
        assert_eq!(path, "/intc@8000000");
        // 16 bytes of reg cut, 64 bytes of free space dropped.
        assert_eq!(after.len(), before.len() - 16 - 64);
        let fdt = Fdt::parse(after).unwrap();
        assert_eq!(fdt.nodes.len(), 4);
        let gic = fdt.node("/intc@8000000").unwrap();
        let reg = gic.prop("reg").unwrap();
        assert_eq!(fdt.value(reg), &before_reg_first_pair()[..]);
        // Everything after the cut is intact.
        assert!(gic.prop("interrupt-controller").is_some());
        let uart = fdt.node("/pl011@9000000").unwrap();
        assert_eq!(
            fdt.value(uart.prop("compatible").unwrap()),
            b"arm,pl011\0arm,primecell\0"
        );
        assert_eq!(
            be32(&fdt.blob, H_TOTALSIZE).unwrap() as usize,
            fdt.blob.len()
        );
    }

    fn before_reg_first_pair() -> Vec<u8> {
        [0u32, 0x0800_0000, 0, 0x1_0000]
            .iter()
            .flat_map(|c| c.to_be_bytes())
            .collect()
    }

    #[test]
    fn pack_drops_free_space_only() {
        let before = sample();
        let packed = pack(before.clone()).unwrap();
        assert_eq!(packed.len(), before.len() - 64);
        assert_eq!(be32(&packed, H_TOTALSIZE).unwrap() as usize, packed.len());
        let a = Fdt::parse(before).unwrap();
        let b = Fdt::parse(packed).unwrap();
        assert_eq!(a.nodes, b.nodes);
        assert!(pack(vec![0; 64]).is_err());
    }

    #[test]
    fn rejects_garbage() {
        assert!(Fdt::parse(vec![0; 64]).is_err());
        assert!(Fdt::parse(vec![0xd0, 0x0d]).is_err());
        let mut b = sample();
        let len = b.len();
        put32(&mut b, H_TOTALSIZE, len as u32 + 8);
        assert!(Fdt::parse(b).is_err());
    }

    #[test]
    fn truncate_checks_arguments() {
        let fdt = || Fdt::parse(sample()).unwrap();
        assert!(fdt().truncate_prop("/nope", "reg", 4).is_err());
        assert!(fdt().truncate_prop("/intc@8000000", "nope", 4).is_err());
        assert!(fdt().truncate_prop("/intc@8000000", "reg", 32).is_err());
        assert!(fdt().truncate_prop("/intc@8000000", "reg", 6).is_err());
    }

    #[test]
    fn no_gic_is_an_error() {
        let blob = Builder::default().begin("").end().finish();
        assert!(cut_gic_reg(blob).is_err());
    }

    /// The real QEMU `virt` DTB kept as a `hyp` test fixture, when present.
    #[test]
    fn cuts_qemu_dtb() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../hyp/tests/fixtures/qemu-virt-smp4.dtb");
        let Ok(blob) = std::fs::read(&path) else {
            return;
        };
        let before = Fdt::parse(blob.clone()).unwrap();
        let (after, path) = cut_gic_reg(blob).unwrap();
        assert!(path.starts_with("/intc@"), "{path}");
        assert!(after.len() < 64 << 10, "not packed: {} bytes", after.len());
        let fdt = Fdt::parse(after).unwrap();
        assert_eq!(fdt.nodes.len(), before.nodes.len());
        assert_eq!(fdt.node(&path).unwrap().prop("reg").unwrap().len, 16);
        for (a, b) in before.nodes.iter().zip(&fdt.nodes) {
            assert_eq!(a.path, b.path);
            assert_eq!(a.props.len(), b.props.len());
        }
    }
}
