//! Checking a DTB before the `fdt` crate sees it.
//!
//! `fdt` 0.1.5 trusts its input: a property length running past the structure block, a name
//! offset outside the strings block, a non-UTF-8 name, unbalanced nodes or more than 63 levels
//! of nesting all end in a panic inside the crate. [`check`] walks every token once and only
//! hands over blobs on which the crate's walkers cannot fail.
//!
//! The crate also mishandles `FDT_NOP` tokens between properties (libfdt's `fdt_nop_property`
//! leaves them behind): some walks stop early and one asserts. NOPs carry no information, so
//! when a blob has any, [`check`] returns a copy with them removed.

use alloc::borrow::Cow;
use alloc::format;
use alloc::vec::Vec;

use super::DtError;
use super::machine::Region;

/// The FDT magic number, `0xd00dfeed`.
pub(crate) const FDT_MAGIC: u32 = 0xd00d_feed;
const HEADER_LEN: usize = 40;
const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;
/// Deepest nesting we accept (the root is depth 1). The crate's `all_nodes` has room for 63;
/// real trees rarely go beyond 6.
pub(crate) const MAX_DEPTH: usize = 32;

/// A blob that passed [`check`]: safe to hand to `fdt::Fdt::new`.
#[derive(Debug)]
pub(crate) struct Blob<'a> {
    /// The blob, or a NOP-free copy of it.
    pub data: Cow<'a, [u8]>,
    /// Entries of the memory-reservation block (`/memreserve/`), in blob order.
    pub reservations: Vec<Region>,
}

impl Blob<'_> {
    /// Opens the checked blob with the `fdt` crate.
    pub fn open(&self) -> Result<fdt::Fdt<'_>, DtError> {
        fdt::Fdt::new(&self.data).map_err(|e| DtError::NotFdt(format!("{e}")))
    }
}

/// The header fields we use, already range-checked.
#[derive(Debug, Clone, Copy)]
struct Header {
    total: usize,
    off_struct: usize,
    size_struct: usize,
    off_strings: usize,
    size_strings: usize,
    off_rsvmap: usize,
}

fn be32(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

fn be64(data: &[u8], at: usize) -> Option<u64> {
    let hi = be32(data, at)?;
    let lo = be32(data, at.checked_add(4)?)?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

fn header_field(dtb: &[u8], index: usize) -> usize {
    // Only called after the length check, so the read cannot fail.
    be32(dtb, index * 4).unwrap_or(0) as usize
}

/// Checks that `off..off+size` lies inside the blob.
fn check_block(name: &str, off: usize, size: usize, total: usize) -> Result<(), DtError> {
    match off.checked_add(size) {
        Some(end) if end <= total => Ok(()),
        _ => Err(DtError::NotFdt(format!(
            "{name} block (offset {off:#x}, size {size:#x}) runs past totalsize {total:#x}"
        ))),
    }
}

fn read_header(dtb: &[u8]) -> Result<Header, DtError> {
    if dtb.len() < HEADER_LEN {
        return Err(DtError::NotFdt(format!(
            "{} bytes is too short for the {HEADER_LEN}-byte header",
            dtb.len()
        )));
    }
    let magic = header_field(dtb, 0) as u32;
    if magic != FDT_MAGIC {
        return Err(DtError::NotFdt(format!(
            "bad magic {magic:#010x} (expected {FDT_MAGIC:#010x})"
        )));
    }
    let total = header_field(dtb, 1);
    if total > dtb.len() || total < HEADER_LEN {
        return Err(DtError::NotFdt(format!(
            "totalsize {total:#x} does not fit the {:#x} bytes given",
            dtb.len()
        )));
    }
    let (version, last_comp) = (header_field(dtb, 5), header_field(dtb, 6));
    if version < 17 || last_comp > 17 {
        return Err(DtError::NotFdt(format!(
            "unsupported version {version} (last compatible {last_comp}); need version 17"
        )));
    }
    let header = Header {
        total,
        off_struct: header_field(dtb, 2),
        off_strings: header_field(dtb, 3),
        off_rsvmap: header_field(dtb, 4),
        size_strings: header_field(dtb, 8),
        size_struct: header_field(dtb, 9),
    };
    check_block("structure", header.off_struct, header.size_struct, total)?;
    check_block("strings", header.off_strings, header.size_strings, total)?;
    check_block("memory reservation", header.off_rsvmap, 16, total)?;
    Ok(header)
}

/// Reads the memory-reservation block up to its all-zero terminator.
fn read_reservations(dtb: &[u8], header: &Header) -> Result<Vec<Region>, DtError> {
    let mut out = Vec::new();
    let mut at = header.off_rsvmap;
    loop {
        let entry = (at + 16 <= header.total).then(|| (be64(dtb, at), be64(dtb, at + 8)));
        let Some((Some(base), Some(size))) = entry else {
            return Err(DtError::Malformed(format!(
                "memory reservation block at {:#x} has no terminating entry",
                header.off_rsvmap
            )));
        };
        if base == 0 && size == 0 {
            return Ok(out);
        }
        out.push(Region { base, size });
        at += 16;
    }
}

/// Walks the structure block token by token.
struct Walker<'a> {
    block: &'a [u8],
    strings: &'a [u8],
    pos: usize,
    /// One entry per open node: whether it already has a child (no properties may follow).
    open: Vec<bool>,
    seen_root: bool,
    nops: bool,
}

impl<'a> Walker<'a> {
    fn err(&self, msg: &str) -> DtError {
        DtError::Malformed(format!("structure block offset {:#x}: {msg}", self.pos))
    }

    fn u32_at(&self, at: usize) -> Result<u32, DtError> {
        be32(self.block, at).ok_or_else(|| self.err("truncated (no FDT_END token)"))
    }

    /// Advances past `len` bytes starting at `from`, rounded up to 4.
    fn skip_to(&mut self, from: usize, len: usize) -> Result<(), DtError> {
        let end = from.checked_add(len).filter(|&e| e <= self.block.len());
        let end = end.ok_or_else(|| self.err("token runs past the end of the structure block"))?;
        self.pos = end.next_multiple_of(4);
        Ok(())
    }

    fn begin_node(&mut self) -> Result<(), DtError> {
        if self.open.is_empty() && self.seen_root {
            return Err(self.err("a second root node"));
        }
        let start = self.pos + 4;
        let rest = self.block.get(start..).unwrap_or_default();
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.err("node name has no NUL"))?;
        let name = &rest[..len];
        if core::str::from_utf8(name).is_err() {
            return Err(self.err("node name is not UTF-8"));
        }
        if self.open.is_empty() && !name.is_empty() {
            return Err(self.err("root node has a non-empty name"));
        }
        if self.open.len() >= MAX_DEPTH {
            return Err(self.err("nodes nested too deeply"));
        }
        if let Some(parent_has_child) = self.open.last_mut() {
            *parent_has_child = true;
        }
        self.open.push(false);
        self.seen_root = true;
        self.skip_to(start, len + 1)
    }

    fn property(&mut self) -> Result<(), DtError> {
        match self.open.last() {
            None => return Err(self.err("property outside any node")),
            Some(true) => return Err(self.err("property after a child node")),
            Some(false) => {}
        }
        let len = self.u32_at(self.pos + 4)? as usize;
        let name_off = self.u32_at(self.pos + 8)? as usize;
        self.check_name(name_off)?;
        self.skip_to(self.pos + 12, len)
    }

    fn check_name(&self, off: usize) -> Result<(), DtError> {
        let rest = self.strings.get(off..).unwrap_or_default();
        let len = rest.iter().position(|&b| b == 0);
        let name = len.map(|l| &rest[..l]).ok_or_else(|| {
            self.err(&format!(
                "property name offset {off:#x} is outside the strings block"
            ))
        })?;
        match core::str::from_utf8(name) {
            Ok(_) => Ok(()),
            Err(_) => Err(self.err("property name is not UTF-8")),
        }
    }

    /// Checks one token; returns `false` at `FDT_END`.
    fn step(&mut self) -> Result<bool, DtError> {
        match self.u32_at(self.pos)? {
            FDT_BEGIN_NODE => self.begin_node()?,
            FDT_PROP => self.property()?,
            FDT_END_NODE => {
                self.open
                    .pop()
                    .ok_or_else(|| self.err("FDT_END_NODE without a node"))?;
                self.pos += 4;
            }
            FDT_NOP => {
                self.nops = true;
                self.pos += 4;
            }
            FDT_END if self.open.is_empty() && self.seen_root => return Ok(false),
            FDT_END => return Err(self.err("FDT_END before the root node is closed")),
            other => return Err(self.err(&format!("unknown token {other:#x}"))),
        }
        Ok(true)
    }
}

/// Copies the blob without its `FDT_NOP` tokens. Only called on a blob that passed the walk.
fn strip_nops(dtb: &[u8], header: &Header, rsv_count: usize) -> Vec<u8> {
    let block = &dtb[header.off_struct..header.off_struct + header.size_struct];
    let mut tokens = Vec::with_capacity(block.len());
    let mut start = 0;
    loop {
        let token = be32(block, start).unwrap_or(FDT_END);
        if token == FDT_END {
            tokens.extend_from_slice(&FDT_END.to_be_bytes());
            break;
        }
        // The blob already passed the walk, so lengths and names are in range.
        let next = match token {
            FDT_BEGIN_NODE => {
                let len = block[start + 4..].iter().position(|&b| b == 0).unwrap_or(0);
                (start + 4 + len + 1).next_multiple_of(4)
            }
            FDT_PROP => {
                let len = be32(block, start + 4).unwrap_or(0) as usize;
                (start + 12 + len).next_multiple_of(4)
            }
            _ => start + 4,
        };
        if token != FDT_NOP {
            tokens.extend_from_slice(&block[start..next]);
        }
        start = next;
    }
    let rsv_len = (rsv_count + 1) * 16;
    let rsvmap = &dtb[header.off_rsvmap..header.off_rsvmap + rsv_len];
    let strings = &dtb[header.off_strings..header.off_strings + header.size_strings];
    let off_rsvmap = HEADER_LEN;
    let off_struct = off_rsvmap + rsv_len;
    let off_strings = off_struct + tokens.len();
    let total = off_strings + strings.len();
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&dtb[..HEADER_LEN]);
    for (field, value) in [
        (1, total),
        (2, off_struct),
        (3, off_strings),
        (4, off_rsvmap),
        (8, strings.len()),
    ] {
        out[field * 4..field * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes());
    }
    out[36..40].copy_from_slice(&(tokens.len() as u32).to_be_bytes());
    out.extend_from_slice(rsvmap);
    out.extend_from_slice(&tokens);
    out.extend_from_slice(strings);
    out
}

/// Checks header, memory-reservation block and every structure token of `dtb`.
pub(crate) fn check(dtb: &[u8]) -> Result<Blob<'_>, DtError> {
    let header = read_header(dtb)?;
    let reservations = read_reservations(dtb, &header)?;
    let mut walker = Walker {
        block: &dtb[header.off_struct..header.off_struct + header.size_struct],
        strings: &dtb[header.off_strings..header.off_strings + header.size_strings],
        pos: 0,
        open: Vec::new(),
        seen_root: false,
        nops: false,
    };
    while walker.step()? {}
    let data = if walker.nops {
        Cow::Owned(strip_nops(dtb, &header, reservations.len()))
    } else {
        Cow::Borrowed(dtb)
    };
    Ok(Blob { data, reservations })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dt::testutil::{QEMU_VIRT, simple_dtb};

    #[test]
    fn qemu_fixture_passes() {
        let blob = check(QEMU_VIRT).unwrap();
        assert!(matches!(blob.data, Cow::Borrowed(_)));
        blob.open().unwrap();
    }

    #[test]
    fn bad_magic() {
        let mut dtb = QEMU_VIRT.to_vec();
        dtb[0] = 0x12;
        let err = check(&dtb).unwrap_err().to_string();
        assert_eq!(
            err,
            "not a device tree: bad magic 0x120dfeed (expected 0xd00dfeed)"
        );
    }

    #[test]
    fn too_short_and_truncated() {
        let err = check(&QEMU_VIRT[..10]).unwrap_err().to_string();
        assert!(err.contains("too short"), "{err}");
        let err = check(&QEMU_VIRT[..QEMU_VIRT.len() / 2])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("not a device tree: totalsize"), "{err}");
    }

    #[test]
    fn block_out_of_range() {
        let mut dtb = QEMU_VIRT.to_vec();
        dtb[36..40].copy_from_slice(&0x00ff_ffffu32.to_be_bytes());
        let err = check(&dtb).unwrap_err().to_string();
        assert!(err.contains("structure block"), "{err}");
    }

    /// Corrupts every 4-byte word of a small blob's structure block in turn: each must give an
    /// error or a blob the `fdt` crate can walk completely, never a panic.
    #[test]
    fn corrupted_words_never_panic() {
        let dtb = simple_dtb();
        let off_struct = be32(&dtb, 8).unwrap() as usize;
        for at in (off_struct..dtb.len() - 3).step_by(4) {
            for value in [0u32, 1, 2, 3, 4, 5, 9, 0xffff_ffff, 0x8000] {
                let mut bad = dtb.clone();
                bad[at..at + 4].copy_from_slice(&value.to_be_bytes());
                if let Ok(blob) = check(&bad) {
                    let fdt = blob.open().unwrap();
                    crate::dt::testutil::walk_all(&fdt);
                }
            }
        }
    }

    #[test]
    fn nops_are_stripped() {
        let dtb = crate::dt::testutil::with_nops(&simple_dtb());
        let blob = check(&dtb).unwrap();
        assert!(matches!(blob.data, Cow::Owned(_)));
        let fdt = blob.open().unwrap();
        let root = fdt.find_node("/").unwrap();
        let names: Vec<_> = root.properties().map(|p| p.name).collect();
        assert_eq!(names, ["#address-cells", "#size-cells", "compatible"]);
        assert_eq!(root.children().count(), 2);
        assert_eq!(
            blob.reservations,
            [Region {
                base: 0x4800_0000,
                size: 0x1000
            }]
        );
    }
}
