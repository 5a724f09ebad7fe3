//! An index over a checked blob: every node with its full path, parent and children, plus the
//! property readers the rest of `dt` builds on.
//!
//! All readers work on raw property bytes (big-endian cells) and return a [`DtError`] naming
//! the node and property when a value has the wrong shape. The `fdt` crate is only used to walk
//! tokens (see the module docs of [`crate::dt`] for why).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use fdt::Fdt;
use fdt::node::FdtNode;

use super::DtError;
use super::machine::{Irq, IrqKind, Region};

/// Default `#address-cells` when a node has none (Devicetree Specification 2.3.5).
const DEFAULT_ADDRESS_CELLS: usize = 2;
/// Default `#size-cells` when a node has none.
const DEFAULT_SIZE_CELLS: usize = 1;
/// Highest SPI number in the GIC binding (INTID 1019).
const MAX_SPI: u32 = 987;
/// Highest PPI number in the GIC binding (INTID 31).
const MAX_PPI: u32 = 15;

/// One node of the tree.
#[derive(Debug, Clone)]
pub(crate) struct Node<'a> {
    /// Full path, `/` for the root.
    pub path: String,
    /// Name with unit address; empty for the root.
    pub name: &'a str,
    /// Index of the parent in [`Tree::nodes`]; `None` for the root.
    pub parent: Option<usize>,
    /// Indices of the children, in blob order.
    pub children: Vec<usize>,
    /// Raw properties in blob order (read once: the crate re-parses on every lookup).
    pub props: Vec<(&'a str, &'a [u8])>,
}

/// All nodes of a blob in depth-first (blob) order; index 0 is the root.
#[derive(Debug)]
pub(crate) struct Tree<'a> {
    pub nodes: Vec<Node<'a>>,
    /// `(phandle, node)` for every node with a well-formed phandle, in blob order.
    phandles: Vec<(u32, usize)>,
}

/// Splits a string-list property (`"a\0b\0"`) into its strings.
fn split_strings(value: &[u8]) -> Option<Vec<&str>> {
    let body = value.strip_suffix(&[0])?;
    let text = core::str::from_utf8(body).ok()?;
    Some(text.split('\0').collect())
}

/// Reads `cells` (at most 2) big-endian cells as one number.
fn cells_to_u64(bytes: &[u8]) -> u64 {
    bytes.chunks_exact(4).fold(0, |acc, c| {
        (acc << 32) | u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
    })
}

/// Splits a property value into 32-bit cells, or `None` if its length is not a multiple of 4.
pub(crate) fn to_cells(value: &[u8]) -> Option<Vec<u32>> {
    if !value.len().is_multiple_of(4) {
        return None;
    }
    Some(
        value
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

impl<'a> Tree<'a> {
    /// Indexes every node of `fdt`. The blob must have passed [`super::blob::check`].
    pub fn new(fdt: &Fdt<'a>) -> Result<Self, DtError> {
        let root = fdt
            .find_node("/")
            .ok_or_else(|| DtError::Malformed("no root node".into()))?;
        let mut tree = Tree {
            nodes: Vec::new(),
            phandles: Vec::new(),
        };
        tree.add(root, String::from("/"), "", None);
        tree.phandles = (0..tree.nodes.len())
            .filter_map(|i| Some((tree.phandle(i).ok()??, i)))
            .collect();
        Ok(tree)
    }

    fn add(&mut self, raw: FdtNode<'_, 'a>, path: String, name: &'a str, parent: Option<usize>) {
        let index = self.nodes.len();
        let props = raw.properties().map(|p| (p.name, p.value)).collect();
        self.nodes.push(Node {
            path,
            name,
            parent,
            children: Vec::new(),
            props,
        });
        for child in raw.children() {
            let base = &self.nodes[index].path;
            let sep = if base.ends_with('/') { "" } else { "/" };
            let child_path = format!("{base}{sep}{}", child.name);
            let child_index = self.nodes.len();
            self.nodes[index].children.push(child_index);
            self.add(child, child_path, child.name, Some(index));
        }
    }

    /// Full path of node `i`.
    pub fn path(&self, i: usize) -> &str {
        &self.nodes[i].path
    }

    /// Name of node `i` (with unit address), empty for the root.
    pub fn name(&self, i: usize) -> &'a str {
        self.nodes[i].name
    }

    /// Children of node `i`.
    pub fn children(&self, i: usize) -> &[usize] {
        &self.nodes[i].children
    }

    /// Raw properties of node `i`, in blob order.
    pub fn properties(&self, i: usize) -> impl Iterator<Item = (&'a str, &'a [u8])> + '_ {
        self.nodes[i].props.iter().copied()
    }

    /// Raw value of property `name` of node `i`.
    pub fn prop(&self, i: usize, name: &str) -> Option<&'a [u8]> {
        self.nodes[i]
            .props
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, v)| v)
    }

    fn prop_err(&self, i: usize, prop: &str, msg: impl Into<String>) -> DtError {
        DtError::prop(self.path(i), prop, msg)
    }

    /// A one-cell property, `None` when absent.
    pub fn u32_prop(&self, i: usize, name: &str) -> Result<Option<u32>, DtError> {
        let Some(value) = self.prop(i, name) else {
            return Ok(None);
        };
        match to_cells(value).as_deref() {
            Some([v]) => Ok(Some(*v)),
            _ => Err(self.prop_err(
                i,
                name,
                format!("expected 1 cell, found {} bytes", value.len()),
            )),
        }
    }

    /// A property made of whole cells, `None` when absent.
    pub fn cells_prop(&self, i: usize, name: &str) -> Result<Option<Vec<u32>>, DtError> {
        let Some(value) = self.prop(i, name) else {
            return Ok(None);
        };
        let cells = to_cells(value).ok_or_else(|| {
            self.prop_err(
                i,
                name,
                format!("length {} is not a multiple of 4", value.len()),
            )
        })?;
        Ok(Some(cells))
    }

    /// A string-list property, `None` when absent.
    pub fn strings_prop(&self, i: usize, name: &str) -> Result<Option<Vec<&'a str>>, DtError> {
        let Some(value) = self.prop(i, name) else {
            return Ok(None);
        };
        match split_strings(value) {
            Some(list) => Ok(Some(list)),
            None => Err(self.prop_err(i, name, "not a NUL-terminated UTF-8 string list")),
        }
    }

    /// A single-string property (the first string of a list), `None` when absent.
    pub fn str_prop(&self, i: usize, name: &str) -> Result<Option<&'a str>, DtError> {
        Ok(self
            .strings_prop(i, name)?
            .and_then(|list| list.first().copied()))
    }

    /// The `compatible` strings; a malformed property counts as none.
    pub fn compatible(&self, i: usize) -> Vec<&'a str> {
        self.prop(i, "compatible")
            .and_then(split_strings)
            .unwrap_or_default()
    }

    /// Whether any `compatible` string of node `i` satisfies `pred`.
    pub fn is_compatible(&self, i: usize, pred: impl Fn(&str) -> bool) -> bool {
        self.compatible(i).into_iter().any(pred)
    }

    /// Nodes (in blob order) with a `compatible` string satisfying `pred` and not disabled.
    pub fn find_compatible(
        &self,
        pred: impl Fn(&str) -> bool + Copy,
    ) -> impl Iterator<Item = usize> {
        (0..self.nodes.len()).filter(move |&i| self.enabled(i) && self.is_compatible(i, pred))
    }

    /// `device_type` equals `ty`.
    pub fn device_type_is(&self, i: usize, ty: &str) -> bool {
        self.prop(i, "device_type")
            .and_then(split_strings)
            .is_some_and(|l| l.first() == Some(&ty))
    }

    /// `status` is absent, `"okay"` or `"ok"`.
    pub fn enabled(&self, i: usize) -> bool {
        match self.prop(i, "status").and_then(split_strings) {
            None => self.prop(i, "status").is_none(),
            Some(list) => matches!(list.first(), Some(&"okay" | &"ok")),
        }
    }

    /// `#address-cells` of node `i` (which sizes its children's `reg`).
    pub fn address_cells(&self, i: usize) -> Result<usize, DtError> {
        Ok(self
            .u32_prop(i, "#address-cells")?
            .map_or(DEFAULT_ADDRESS_CELLS, |v| v as usize))
    }

    /// `#size-cells` of node `i`.
    pub fn size_cells(&self, i: usize) -> Result<usize, DtError> {
        Ok(self
            .u32_prop(i, "#size-cells")?
            .map_or(DEFAULT_SIZE_CELLS, |v| v as usize))
    }

    /// The `phandle` (or legacy `linux,phandle`) of node `i`.
    pub fn phandle(&self, i: usize) -> Result<Option<u32>, DtError> {
        match self.u32_prop(i, "phandle")? {
            Some(p) => Ok(Some(p)),
            None => self.u32_prop(i, "linux,phandle"),
        }
    }

    /// The node whose phandle is `phandle`.
    pub fn by_phandle(&self, phandle: u32) -> Option<usize> {
        self.phandles
            .iter()
            .find(|&&(p, _)| p == phandle)
            .map(|&(_, i)| i)
    }

    /// Resolves a phandle found in property `prop` of node `i`.
    pub fn resolve_phandle(&self, i: usize, prop: &str, phandle: u32) -> Result<usize, DtError> {
        self.by_phandle(phandle)
            .ok_or_else(|| self.prop_err(i, prop, format!("phandle {phandle:#x} matches no node")))
    }

    /// Looks up an absolute path. A component without `@` also matches a node whose name
    /// before the `@` equals it (as `/pl011` for `/pl011@9000000`).
    pub fn find_path(&self, path: &str) -> Option<usize> {
        let rest = path.strip_prefix('/')?;
        let mut at = 0;
        for part in rest.split('/').filter(|p| !p.is_empty()) {
            let children = self.children(at);
            let exact = children.iter().copied().find(|&c| self.name(c) == part);
            let loose = || {
                let base_of = |c: usize| self.name(c).split('@').next().unwrap_or_default();
                children
                    .iter()
                    .copied()
                    .find(|&c| !part.contains('@') && base_of(c) == part)
            };
            at = exact.or_else(loose)?;
        }
        Some(at)
    }

    /// Resolves a path that may start with an alias (`serial0`, `serial0/child`) and may carry
    /// `:options` (as `stdout-path` does). Aliases are resolved one level only.
    pub fn resolve_path(&self, path: &str) -> Option<usize> {
        let path = path.split(':').next().unwrap_or_default();
        if path.starts_with('/') {
            return self.find_path(path);
        }
        let (alias, rest) = path.split_once('/').unwrap_or((path, ""));
        let aliases = self.find_path("/aliases")?;
        let target = self.str_prop(aliases, alias).ok()??;
        if !target.starts_with('/') {
            return None;
        }
        let full = if rest.is_empty() {
            String::from(target)
        } else {
            format!("{target}/{rest}")
        };
        self.find_path(&full)
    }

    /// The raw `reg` of node `i` as (address, size) pairs in the parent's address space.
    ///
    /// Cell sizes come from the parent's `#address-cells`/`#size-cells` (defaults 2 and 1).
    /// Both must be at most 2 so values fit in a `u64`; `#size-cells = 0` gives size 0.
    pub fn raw_reg(&self, i: usize) -> Result<Vec<Region>, DtError> {
        let parent = self.nodes[i]
            .parent
            .ok_or_else(|| self.prop_err(i, "reg", "on the root node"))?;
        let (ac, sc) = (self.address_cells(parent)?, self.size_cells(parent)?);
        if ac == 0 || ac > 2 || sc > 2 {
            let msg = format!(
                "parent {} has #address-cells = {ac}, #size-cells = {sc}; only 1..=2 and 0..=2 are supported",
                self.path(parent)
            );
            return Err(self.prop_err(i, "reg", msg));
        }
        let value = self
            .prop(i, "reg")
            .ok_or_else(|| self.prop_err(i, "reg", "missing"))?;
        let entry = (ac + sc) * 4;
        if value.is_empty() || !value.len().is_multiple_of(entry) {
            let msg = format!(
                "length {} is not a non-zero multiple of {entry} bytes (#address-cells = {ac}, #size-cells = {sc})",
                value.len()
            );
            return Err(self.prop_err(i, "reg", msg));
        }
        let regions = value.chunks_exact(entry).map(|e| Region {
            base: cells_to_u64(&e[..ac * 4]),
            size: cells_to_u64(&e[ac * 4..]),
        });
        Ok(regions.collect())
    }

    /// `reg` of node `i` translated to CPU physical addresses through the parents' `ranges`.
    pub fn reg(&self, i: usize) -> Result<Vec<Region>, DtError> {
        let mut regions = self.raw_reg(i)?;
        for region in &mut regions {
            region.base = self.translate(i, region.base)?;
        }
        Ok(regions)
    }

    /// Translates `addr` (in the address space of node `i`'s parent) up to the root.
    ///
    /// Each bus between the node and the root must have `ranges`: empty means identity, absent
    /// means the bus is not memory-mapped (an error). Nodes directly under `/` need no
    /// translation, which covers everything QEMU `virt` describes.
    pub fn translate(&self, i: usize, addr: u64) -> Result<u64, DtError> {
        let mut addr = addr;
        let mut bus = self.nodes[i].parent;
        while let Some(b) = bus {
            let Some(up) = self.nodes[b].parent else {
                break;
            };
            addr = self.translate_one(i, b, up, addr)?;
            bus = Some(up);
        }
        Ok(addr)
    }

    /// Maps `addr` from bus `b`'s address space into its parent `up`'s, using `b`'s `ranges`.
    fn translate_one(&self, i: usize, b: usize, up: usize, addr: u64) -> Result<u64, DtError> {
        let no_map =
            |why: String| self.prop_err(i, "reg", format!("cannot translate {addr:#x}: {why}"));
        let bus = self.path(b);
        let value = self
            .prop(b, "ranges")
            .ok_or_else(|| no_map(format!("{bus} has no `ranges`")))?;
        if value.is_empty() {
            return Ok(addr);
        }
        let (child_ac, child_sc) = (self.address_cells(b)?, self.size_cells(b)?);
        let parent_ac = self.address_cells(up)?;
        if child_ac > 2 || child_sc > 2 || parent_ac > 2 {
            return Err(no_map(format!(
                "{bus} `ranges` has cells wider than 64 bits"
            )));
        }
        let entry = (child_ac + parent_ac + child_sc) * 4;
        if entry == 0 || !value.len().is_multiple_of(entry) {
            let msg = format!("length {} is not a multiple of {entry}", value.len());
            return Err(DtError::prop(bus, "ranges", msg));
        }
        for e in value.chunks_exact(entry) {
            let (child, rest) = e.split_at(child_ac * 4);
            let (parent, size) = rest.split_at(parent_ac * 4);
            let offset = addr.wrapping_sub(cells_to_u64(child));
            if addr >= cells_to_u64(child) && offset < cells_to_u64(size) {
                return Ok(cells_to_u64(parent).wrapping_add(offset));
            }
        }
        Err(no_map(format!("no `ranges` entry of {bus} covers it")))
    }

    /// The interrupt controller that `interrupts` of node `i` refer to (Linux's
    /// `of_irq_find_parent`): follow `interrupt-parent`, else the tree parent, until a node
    /// with `#interrupt-cells`.
    fn interrupt_parent(&self, i: usize) -> Result<usize, DtError> {
        let mut at = i;
        for _ in 0..self.nodes.len() {
            let next = match self.u32_prop(at, "interrupt-parent")? {
                Some(ph) => self.resolve_phandle(at, "interrupt-parent", ph)?,
                None => self.nodes[at].parent.ok_or_else(|| {
                    self.prop_err(
                        i,
                        "interrupts",
                        "no interrupt-parent in the node or its ancestors",
                    )
                })?,
            };
            if self.prop(next, "#interrupt-cells").is_some() {
                return Ok(next);
            }
            at = next;
        }
        Err(self.prop_err(i, "interrupts", "interrupt-parent chain loops"))
    }

    /// `#interrupt-cells` of controller `ctl`, which must be at least 1.
    pub(crate) fn interrupt_cells(&self, ctl: usize) -> Result<usize, DtError> {
        match self.u32_prop(ctl, "#interrupt-cells")? {
            Some(n) if n >= 1 => Ok(n as usize),
            _ => Err(self.prop_err(ctl, "#interrupt-cells", "missing or zero")),
        }
    }

    /// Whether node `ctl` is a GICv3 (the only controller whose specifiers we decode).
    fn is_gic_v3(&self, ctl: usize) -> bool {
        self.is_compatible(ctl, |c| c == "arm,gic-v3")
    }

    /// Decodes one specifier for controller `ctl`: a GIC `<type number flags ...>` becomes an
    /// [`Irq`]; a specifier for any other controller becomes `None`.
    pub(crate) fn decode_irq(
        &self,
        i: usize,
        prop: &str,
        ctl: usize,
        spec: &[u32],
    ) -> Result<Option<Irq>, DtError> {
        if !self.is_gic_v3(ctl) {
            return Ok(None);
        }
        let [ty, number, trigger, ..] = *spec else {
            let msg = format!(
                "GIC specifier needs at least 3 cells, {} has #interrupt-cells = {}",
                self.path(ctl),
                spec.len()
            );
            return Err(self.prop_err(i, prop, msg));
        };
        let (kind, max) = match ty {
            0 => (IrqKind::Spi, MAX_SPI),
            1 => (IrqKind::Ppi, MAX_PPI),
            _ => {
                return Err(self.prop_err(
                    i,
                    prop,
                    format!("interrupt type {ty} is not SPI (0) or PPI (1)"),
                ));
            }
        };
        if number > max {
            return Err(self.prop_err(i, prop, format!("{kind:?} number {number} is above {max}")));
        }
        Ok(Some(Irq {
            kind,
            number,
            trigger,
        }))
    }

    /// All interrupt specifiers of node `i` in order, from `interrupts-extended` if present,
    /// else from `interrupts`. GIC specifiers decode to `Some`, others to `None`.
    pub fn irq_specs(&self, i: usize) -> Result<Vec<Option<Irq>>, DtError> {
        if let Some(cells) = self.cells_prop(i, "interrupts-extended")? {
            return self.extended_specs(i, &cells);
        }
        let Some(cells) = self.cells_prop(i, "interrupts")? else {
            return Ok(Vec::new());
        };
        let ctl = self.interrupt_parent(i)?;
        let n = self.interrupt_cells(ctl)?;
        if cells.is_empty() || !cells.len().is_multiple_of(n) {
            let msg = format!(
                "{} cells is not a multiple of #interrupt-cells = {n} of {}",
                cells.len(),
                self.path(ctl)
            );
            return Err(self.prop_err(i, "interrupts", msg));
        }
        cells
            .chunks_exact(n)
            .map(|spec| self.decode_irq(i, "interrupts", ctl, spec))
            .collect()
    }

    fn extended_specs(&self, i: usize, mut cells: &[u32]) -> Result<Vec<Option<Irq>>, DtError> {
        const PROP: &str = "interrupts-extended";
        let mut out = Vec::new();
        while let Some((&phandle, rest)) = cells.split_first() {
            let ctl = self.resolve_phandle(i, PROP, phandle)?;
            let n = self.interrupt_cells(ctl)?;
            let spec = rest.get(..n).ok_or_else(|| {
                self.prop_err(
                    i,
                    PROP,
                    format!(
                        "truncated specifier for {} (#interrupt-cells = {n})",
                        self.path(ctl)
                    ),
                )
            })?;
            out.push(self.decode_irq(i, PROP, ctl, spec)?);
            cells = &rest[n..];
        }
        Ok(out)
    }

    /// The GIC interrupts of node `i` (specifiers for other controllers are skipped).
    pub fn gic_irqs(&self, i: usize) -> Result<Vec<Irq>, DtError> {
        Ok(self.irq_specs(i)?.into_iter().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dt::blob;
    use crate::dt::testutil::{Builder, QEMU_VIRT};

    fn with_tree<R>(dtb: &[u8], f: impl FnOnce(&Tree<'_>) -> R) -> R {
        let blob = blob::check(dtb).unwrap();
        let fdt = blob.open().unwrap();
        let tree = Tree::new(&fdt).unwrap();
        f(&tree)
    }

    #[test]
    fn paths_and_lookup() {
        with_tree(QEMU_VIRT, |t| {
            assert_eq!(t.path(0), "/");
            let its = t.find_path("/intc@8000000/its@8080000").unwrap();
            assert_eq!(t.path(its), "/intc@8000000/its@8080000");
            assert_eq!(t.find_path("/intc/its"), Some(its));
            assert_eq!(t.find_path("/nope"), None);
            assert_eq!(
                t.resolve_path("serial0:115200n8"),
                t.find_path("/pl011@9000000")
            );
            assert_eq!(t.resolve_path("nope"), None);
        });
    }

    #[test]
    fn reg_with_ranges_translation() {
        let mut b = Builder::new();
        b.node("soc", |b| {
            b.u32("#address-cells", 1).u32("#size-cells", 1);
            b.cells("ranges", &[0x0, 0x0, 0x1000_0000, 0x100_0000]);
            b.node("dev@1000", |b| {
                b.cells("reg", &[0x1000, 0x100]);
            });
            b.node("bad@2000000", |b| {
                b.cells("reg", &[0x200_0000, 0x100]);
            });
        });
        with_tree(&b.finish(), |t| {
            let dev = t.find_path("/soc/dev@1000").unwrap();
            assert_eq!(
                t.reg(dev).unwrap(),
                [Region {
                    base: 0x1000_1000,
                    size: 0x100
                }]
            );
            let bad = t.find_path("/soc/bad@2000000").unwrap();
            let err = t.reg(bad).unwrap_err().to_string();
            assert_eq!(
                err,
                "/soc/bad@2000000: property `reg`: cannot translate 0x2000000: no `ranges` entry of /soc covers it"
            );
        });
    }

    #[test]
    fn self_referencing_alias_does_not_recurse() {
        let mut b = Builder::new();
        b.node("aliases", |b| {
            b.string("loop", "loop");
        });
        with_tree(&b.finish(), |t| assert_eq!(t.resolve_path("loop"), None));
    }

    #[test]
    fn interrupts_extended_mixes_controllers() {
        let mut b = Builder::new();
        b.node("intc", |b| {
            b.strings("compatible", &["arm,gic-v3"])
                .u32("#interrupt-cells", 3)
                .u32("phandle", 1);
        });
        b.node("gpio", |b| {
            b.u32("#interrupt-cells", 2).u32("phandle", 2);
        });
        b.node("dev", |b| {
            b.cells("interrupts-extended", &[1, 0, 5, 4, 2, 7, 1]);
        });
        with_tree(&b.finish(), |t| {
            let dev = t.find_path("/dev").unwrap();
            let specs = t.irq_specs(dev).unwrap();
            assert_eq!(
                specs,
                [
                    Some(Irq {
                        kind: IrqKind::Spi,
                        number: 5,
                        trigger: 4
                    }),
                    None
                ]
            );
        });
    }
}
