//! SMMUv3 TLB maintenance for one VM's stage 2, through the SMMU's command queue.
//!
//! What one [`Invalidation`] becomes:
//!
//! | invalidation | commands |
//! |---|---|
//! | everything (`range: None`), or (without RIL) more than [`FULL_FLUSH_PAGES`] commands | `CMD_TLBI_S12_VMALL(vmid)` |
//! | a range, IDR3.RIL = 1 | `CMD_TLBI_S2_IPA` range form: TG = 4 KiB, each command covers `(NUM + 1) << SCALE` pages; `LEAF` when only leaf entries changed, and then `TTL` = the level of the changed entries when the gather knows it |
//! | a range, IDR3.RIL = 0 | one `CMD_TLBI_S2_IPA` per 4 KiB page, or per block when only leaf entries at one block level changed; `LEAF` as above; TG = TTL = 0 (no hint) |
//!
//! `sync` is a `CMD_SYNC` (through [`CommandQueue::sync`]).
//!
//! ## Nested translation (stage 1 owned by the guest)
//!
//! When the VM's streams use nested STEs (Config = S1+S2), the SMMU may cache *combined*
//! stage-1+2 entries (VA → PA) tagged with the ASID and the VMID. `CMD_TLBI_S2_IPA` removes
//! stage-2 entries by IPA only: the SMMU has no reverse map from an IPA to the combined entries
//! built from it, so those entries are not required to go. Software must then remove every
//! stage-1 entry of the VMID with `CMD_TLBI_NH_ALL(vmid)` — the SMMU equivalent of the CPU's
//! `TLBI IPAS2E1IS; DSB; TLBI VMALLE1IS; DSB`:
//!
//! * The `NH_ALL` must start only after the `S2_IPA`s have **completed** (a `CMD_SYNC` between
//!   them). Otherwise a translation between the two could build a new combined entry from a
//!   stage-2 TLB entry the `S2_IPA` has not removed yet, and that combined entry would survive
//!   both commands. Linux issues the two with a sync between them for the same reason.
//! * `CMD_TLBI_S12_VMALL(vmid)` removes every stage-1, stage-2 and combined entry of the VMID, so
//!   a full flush needs no `NH_ALL`; only range invalidations do.
//!
//! So in nested mode `invalidate` queues the `S2_IPA`s and takes a ticket; `sync` does
//! `CMD_SYNC`, then (unless another caller's `NH_ALL` already covered every ticket taken so far)
//! `NH_ALL(vmid)` + `CMD_SYNC`. That keeps `invalidate` non-blocking and lets concurrent syncs of
//! one VM share one `NH_ALL`, without a lock (see [`SmmuV3Tlb::sync`]).
//!
//! Nested mode needs an SMMU with stage 1 (IDR0.S1P): `NH_ALL` is an illegal command on a
//! stage-2-only SMMU (QEMU answers it with `CERROR_ILL`), and without stage 1 there are no
//! combined entries to remove anyway.
//!
//! One [`SmmuV3Tlb`] serves one VM on one SMMU (the tickets are per VM); the [`CommandQueue`] is
//! shared by every VM on that SMMU.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::mm::stage2::tlb::{FULL_FLUSH_PAGES, Invalidation, TlbBackend, TlbError};
use crate::smmu::v3::cmd::{self, Command as V3Command, op};

/// One 16-byte SMMUv3 command: two little-endian doublewords.
pub type Command = [u64; 2];

/// `CMD_TLBI_NH_ALL`: every non-hyp stage-1 entry (and combined entry) of a VMID.
pub const OP_TLBI_NH_ALL: u8 = op::TLBI_NH_ALL;
/// `CMD_TLBI_S12_VMALL`: every stage-1, stage-2 and combined entry of a VMID.
pub const OP_TLBI_S12_VMALL: u8 = op::TLBI_S12_VMALL;
/// `CMD_TLBI_S2_IPA`: stage-2 entries by IPA (or IPA range).
pub const OP_TLBI_S2_IPA: u8 = op::TLBI_S2_IPA;
/// `CMD_SYNC`.
pub const OP_SYNC: u8 = op::SYNC;

/// `CMD_SYNC.CS`: no completion signal (software polls the queue's CONS).
pub const SYNC_CS_NONE: u8 = cmd::SYNC_CS_NONE;
/// `CMD_SYNC.CS`: signal completion with an interrupt/MSI.
pub const SYNC_CS_IRQ: u8 = cmd::SYNC_CS_IRQ;
/// `CMD_SYNC.CS`: signal completion with SEV.
pub const SYNC_CS_SEV: u8 = cmd::SYNC_CS_SEV;

/// Opcode field of doubleword 0.
const D0_OP_MASK: u64 = 0xff;
/// `LEAF`, doubleword 1 bit 0.
#[cfg(test)]
const D1_LEAF: u64 = 1 << 0;
/// The IPA bits a stage-2 table can translate: [51:12].
const D1_IPA_MASK: u64 = ((1 << 52) - 1) & !0xfff;

const PAGE_SHIFT: u32 = 12;
const PAGE: u64 = 1 << PAGE_SHIFT;
/// Largest NUM + 1 a range command takes (NUM is 5 bits, but the decomposition below uses the
/// low five set-bit-aligned bits of the page count, which are at most 31).
const RANGE_NUM_MAX: u64 = 31;
/// Largest SCALE (5 bits).
const RANGE_SCALE_MAX: u32 = 31;

/// Bytes mapped by one entry at `level` (1: 1 GiB, 2: 2 MiB, 3: 4 KiB) with the 4 KiB granule.
pub(crate) fn level_size(level: u8) -> u64 {
    1 << (PAGE_SHIFT + 9 * (3 - u32::from(level)))
}

/// `CMD_TLBI_S2_IPA` for `vmid` at `ipa`.
///
/// `range`: `None` for the single-address form (TG = 0: no range, no TTL hint; `ttl` must be 0),
/// or `Some((num, scale))` for the range form (needs IDR3.RIL): the raw `NUM` and `SCALE` fields,
/// so the command covers `(num + 1) << scale` 4 KiB pages from `ipa` (TG = 4 KiB).
/// `ttl`: the level (1..=3) of the leaf entries being invalidated, or 0 when unknown; a non-zero
/// TTL is only a correct hint together with `leaf`.
pub fn tlbi_s2_ipa(vmid: u16, ipa: u64, leaf: bool, ttl: u8, range: Option<(u8, u8)>) -> Command {
    debug_assert!(ttl <= 3);
    let (tg, num, scale, ttl) = match range {
        Some((num, scale)) => {
            debug_assert!(num <= 31 && u32::from(scale) <= RANGE_SCALE_MAX);
            (cmd::TG_4K, num, scale, ttl)
        }
        None => {
            debug_assert_eq!(ttl, 0, "TTL needs TG, which only the range form sets");
            (0, 0, 0, 0)
        }
    };
    V3Command::TlbiS2Ipa {
        vmid,
        addr: ipa & D1_IPA_MASK,
        leaf,
        ttl,
        tg,
        num,
        scale,
    }
    .encode()
}

/// `CMD_TLBI_S12_VMALL`: everything cached for `vmid` (stage 1, stage 2 and combined).
pub fn tlbi_s12_vmall(vmid: u16) -> Command {
    V3Command::TlbiS12Vmall { vmid }.encode()
}

/// `CMD_TLBI_NH_ALL`: every non-hyp stage-1 and combined stage-1+2 entry of `vmid`.
pub fn tlbi_nh_all(vmid: u16) -> Command {
    V3Command::TlbiNhAll { vmid }.encode()
}

/// `CMD_SYNC` with completion signal `cs` ([`SYNC_CS_NONE`], [`SYNC_CS_IRQ`], [`SYNC_CS_SEV`]).
pub fn cmd_sync(cs: u8) -> Command {
    V3Command::Sync {
        cs: cs & 0b11,
        msh: 0,
        msiattr: 0,
        msidata: 0,
        msiaddr: 0,
    }
    .encode()
}

/// Splits `pages` 4 KiB pages into range-command pieces, in address order: `(num, scale,
/// pages_covered)` with `pages_covered = (num + 1) << scale`. The pieces cover exactly `pages`
/// (never more), in at most `ceil(bits / 5)` commands: each piece takes the (up to) five bits
/// of the remaining count that start at its lowest set bit.
pub fn range_pieces(mut pages: u64) -> impl Iterator<Item = (u8, u8, u64)> {
    core::iter::from_fn(move || {
        if pages == 0 {
            return None;
        }
        let scale = pages.trailing_zeros().min(RANGE_SCALE_MAX);
        // `pages >> scale` is odd when `scale` is the lowest set bit, so `num >= 1`. Only when
        // SCALE was capped (counts of 2^32 pages and more) can the low five bits be zero; then
        // take 31 << 31 pages, which the count exceeds.
        let num = match (pages >> scale) & RANGE_NUM_MAX {
            0 => RANGE_NUM_MAX,
            n => n,
        };
        let covered = num << scale;
        pages -= covered;
        Some(((num - 1) as u8, scale as u8, covered))
    })
}

/// The commands that carry out `inv` on an SMMU with (`ril`) or without range invalidation.
/// Pure: [`SmmuV3Tlb`] submits what this returns.
pub fn commands(inv: &Invalidation, ril: bool) -> Vec<Command> {
    let Some((start, end)) = inv.range else {
        return alloc::vec![tlbi_s12_vmall(inv.vmid)];
    };
    let start = start & !(PAGE - 1);
    let end = end.next_multiple_of(PAGE);
    if end <= start {
        return Vec::new();
    }
    let leaf = inv.leaf_only;
    let level = if leaf && (1..=3).contains(&inv.level) {
        inv.level
    } else {
        0
    };
    let mut cmds = Vec::new();
    if ril {
        let mut ipa = start;
        for (num, scale, covered) in range_pieces((end - start) >> PAGE_SHIFT) {
            cmds.push(tlbi_s2_ipa(inv.vmid, ipa, leaf, level, Some((num, scale))));
            ipa += covered << PAGE_SHIFT;
        }
    } else {
        // Without a range form, one command per entry that may hold a translation: per block
        // when all changed entries are blocks of one level (a TLBI by address removes the entry
        // covering that address, whatever its size), else per page.
        let step = if level != 0 { level_size(level) } else { PAGE };
        let first = start & !(step - 1);
        let count = (end - first).div_ceil(step);
        if count > FULL_FLUSH_PAGES {
            return alloc::vec![tlbi_s12_vmall(inv.vmid)];
        }
        cmds.extend((0..count).map(|i| tlbi_s2_ipa(inv.vmid, first + i * step, leaf, 0, None)));
    }
    cmds
}

/// The SMMU's command queue, as the TLB backends need it. The lock-free queue that implements
/// this on hardware comes with the SMMU driver; tests use a recording mock.
pub trait CommandQueue: Send + Sync {
    /// Appends `cmds`, in order, to the queue. May return before the SMMU consumed them.
    fn submit(&self, cmds: &[Command]) -> Result<(), TlbError>;
    /// Appends a `CMD_SYNC` and waits for it: returns once every command submitted before this
    /// call started — by any CPU, in happens-before order — has completed.
    fn sync(&self) -> Result<(), TlbError>;
}

/// Stage-2 TLB maintenance of one VM on one SMMUv3.
pub struct SmmuV3Tlb {
    queue: Arc<dyn CommandQueue>,
    vmid: u16,
    /// IDR3.RIL: range invalidation.
    ril: bool,
    /// The VM's streams use nested (stage 1 + stage 2) STEs.
    nested: bool,
    /// Nested mode: range invalidations queued so far (a ticket each).
    nh_requested: AtomicU64,
    /// Nested mode: every ticket up to this one is covered by a completed `NH_ALL`.
    nh_done: AtomicU64,
    /// A submission failed: invalidations may be missing, so every later sync fails.
    failed: AtomicBool,
}

const AGENT: &str = "smmuv3";

impl SmmuV3Tlb {
    /// The backend for VM `vmid` on the SMMU behind `queue`. `ril`: IDR3.RIL; `nested`: the VM's
    /// STEs translate both stages.
    pub fn new(queue: Arc<dyn CommandQueue>, vmid: u16, ril: bool, nested: bool) -> Self {
        Self {
            queue,
            vmid,
            ril,
            nested,
            nh_requested: AtomicU64::new(0),
            nh_done: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        }
    }

    /// The VMID this backend serves.
    pub fn vmid(&self) -> u16 {
        self.vmid
    }
}

impl TlbBackend for SmmuV3Tlb {
    fn invalidate(&self, inv: &Invalidation) {
        debug_assert_eq!(inv.vmid, self.vmid, "one SmmuV3Tlb per VM");
        let cmds = commands(inv, self.ril);
        if cmds.is_empty() {
            return;
        }
        if self.queue.submit(&cmds).is_err() {
            self.failed.store(true, Ordering::Release);
            return;
        }
        let full = cmds[0][0] & D0_OP_MASK == u64::from(OP_TLBI_S12_VMALL);
        if self.nested && !full {
            // Released after the submission: whoever reads this ticket also sees the commands
            // queued, so its CMD_SYNC covers them.
            self.nh_requested.fetch_add(1, Ordering::Release);
        }
    }

    /// Waits for this caller's invalidations. Nested mode, with `want` = tickets taken when the
    /// sync starts (including the caller's own):
    /// 1. `CMD_SYNC`: every `S2_IPA` of tickets `..= want` has completed (each was submitted
    ///    before its ticket was taken).
    /// 2. If `nh_done >= want`, another caller already issued an `NH_ALL` after a sync that
    ///    covered all those tickets, and saw it complete: nothing more to do.
    /// 3. Else `NH_ALL(vmid)` + `CMD_SYNC`, then publish `nh_done = max(nh_done, want)`.
    fn sync(&self, vmid: u16) -> Result<(), TlbError> {
        debug_assert_eq!(vmid, self.vmid, "one SmmuV3Tlb per VM");
        if self.failed.load(Ordering::Acquire) {
            return Err(TlbError {
                agent: AGENT,
                what: "a command submission failed; invalidations may be missing",
            });
        }
        if !self.nested {
            return self.queue.sync();
        }
        let want = self.nh_requested.load(Ordering::Acquire);
        self.queue.sync()?;
        if self.nh_done.load(Ordering::Acquire) >= want {
            return Ok(());
        }
        self.queue.submit(&[tlbi_nh_all(vmid)])?;
        self.queue.sync()?;
        self.nh_done.fetch_max(want, Ordering::Release);
        Ok(())
    }

    fn name(&self) -> &str {
        AGENT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn field(v: u64, lo: u32, hi: u32) -> u64 {
        (v >> lo) & ((1u64 << (hi - lo + 1)) - 1)
    }

    #[test]
    fn s2_ipa_fields_bit_by_bit() {
        let c = tlbi_s2_ipa(0xbeef, 0x000f_ffff_ffff_f000, true, 2, Some((0x15, 0x1b)));
        assert_eq!(field(c[0], 0, 7), 0x2a);
        assert_eq!(field(c[0], 8, 11), 0);
        assert_eq!(field(c[0], 12, 16), 0x15, "NUM[16:12]");
        assert_eq!(field(c[0], 17, 19), 0);
        assert_eq!(field(c[0], 20, 24), 0x1b, "SCALE[24:20]");
        assert_eq!(field(c[0], 25, 31), 0);
        assert_eq!(field(c[0], 32, 47), 0xbeef, "VMID[47:32]");
        assert_eq!(field(c[0], 48, 63), 0, "ASID is not used by S2 commands");
        assert_eq!(c[1] & 1, 1, "LEAF");
        assert_eq!(field(c[1], 1, 7), 0);
        assert_eq!(field(c[1], 8, 9), 2, "TTL[9:8]");
        assert_eq!(field(c[1], 10, 11), 1, "TG[11:10] = 4K");
        assert_eq!(field(c[1], 12, 51), 0xff_ffff_ffff, "IPA[51:12]");
        assert_eq!(field(c[1], 52, 63), 0);

        // Address bits outside [51:12] never leak into other fields.
        let c = tlbi_s2_ipa(1, u64::MAX, false, 0, None);
        assert_eq!(c[1], 0x000f_ffff_ffff_f000);
        assert_eq!(c[0], 0x2a | (1 << 32));

        // Each field alone.
        assert_eq!(
            tlbi_s2_ipa(0, 0, false, 0, Some((1, 0))),
            [0x2a | (1 << 12), 1 << 10]
        );
        assert_eq!(
            tlbi_s2_ipa(0, 0, false, 0, Some((0, 1))),
            [0x2a | (1 << 20), 1 << 10]
        );
        assert_eq!(
            tlbi_s2_ipa(0, 0, true, 3, Some((0, 0))),
            [0x2a, 1 | (3 << 8) | (1 << 10)]
        );
        assert_eq!(tlbi_s2_ipa(0, 0x1000, false, 0, None), [0x2a, 0x1000]);
    }

    #[test]
    fn other_commands() {
        assert_eq!(tlbi_s12_vmall(0x1234), [0x28 | (0x1234 << 32), 0]);
        assert_eq!(tlbi_nh_all(0xffff), [0x10 | (0xffff << 32), 0]);
        assert_eq!(cmd_sync(SYNC_CS_NONE), [0x46, 0]);
        assert_eq!(cmd_sync(SYNC_CS_IRQ), [0x46 | (1 << 12), 0]);
        assert_eq!(cmd_sync(SYNC_CS_SEV), [0x46 | (2 << 12), 0]);
    }

    /// Decodes a range command back into the pages it covers.
    fn covered(c: &Command) -> (u64, u64) {
        let num = field(c[0], 12, 16);
        let scale = field(c[0], 20, 24);
        assert_eq!(field(c[1], 10, 11), 1);
        let start = c[1] & D1_IPA_MASK;
        (start, start + (((num + 1) << scale) << 12))
    }

    #[test]
    fn range_decomposition_covers_exactly() {
        // Deterministic pseudo-random ranges plus every small count.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut cases: Vec<(u64, u64)> = (1..=1100).map(|n| (0x4000_0000, n)).collect();
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let start = (x >> 20) & 0xf_ffff_f000 & !(u64::MAX << 44);
            let pages = 1 + (x % (1 << (x % 36)));
            cases.push((start, pages));
        }
        for (start, pages) in cases {
            let pieces: Vec<_> = range_pieces(pages).collect();
            let bits = 64 - pages.leading_zeros();
            assert!(
                pieces.len() as u32 <= bits.div_ceil(5),
                "{pages}: {pieces:?}"
            );
            let mut at = start;
            for &(num, scale, n) in &pieces {
                assert!(num <= 30 && scale <= 31);
                assert_eq!(n, (u64::from(num) + 1) << scale);
                let c = tlbi_s2_ipa(7, at, true, 0, Some((num, scale)));
                let (s, e) = covered(&c);
                // Contiguous, in order, never past the end: the union is exactly the request.
                assert_eq!(s, at & D1_IPA_MASK);
                at = e;
            }
            assert_eq!(at, start + pages * 4096, "start {start:#x} pages {pages}");
        }
    }

    #[test]
    fn range_pieces_for_huge_counts_cap_scale() {
        for pages in [
            1u64 << 40,
            (1 << 40) + 5,
            u64::MAX >> 12,
            32 << 31,
            33 << 31,
        ] {
            let total: u64 = range_pieces(pages)
                .map(|(num, scale, n)| {
                    assert!(scale <= 31 && num <= 30);
                    n
                })
                .sum();
            assert_eq!(total, pages);
        }
    }

    fn inv(range: Option<(u64, u64)>, leaf_only: bool, level: u8) -> Invalidation {
        Invalidation {
            vmid: 5,
            range,
            leaf_only,
            level,
        }
    }

    #[test]
    fn ril_commands() {
        // 3 pages, leaf, level 3: one command, TTL 3.
        let c = commands(&inv(Some((0x8000_1000, 0x8000_4000)), true, 3), true);
        assert_eq!(c, vec![tlbi_s2_ipa(5, 0x8000_1000, true, 3, Some((2, 0)))]);
        // Table change: no LEAF, no TTL.
        let c = commands(&inv(Some((0x8000_1000, 0x8000_4000)), false, 3), true);
        assert_eq!(c, vec![tlbi_s2_ipa(5, 0x8000_1000, false, 0, Some((2, 0)))]);
        // One 2 MiB block: 512 pages in one command (NUM 0, SCALE 9), TTL 2.
        let c = commands(&inv(Some((0x8020_0000, 0x8040_0000)), true, 2), true);
        assert_eq!(c, vec![tlbi_s2_ipa(5, 0x8020_0000, true, 2, Some((0, 9)))]);
        // 33 pages: 32 + 1 → two commands, in address order.
        let c = commands(&inv(Some((0, 33 << 12)), true, 0), true);
        assert_eq!(
            c,
            vec![
                tlbi_s2_ipa(5, 0, true, 0, Some((0, 0))),
                tlbi_s2_ipa(5, 0x1000, true, 0, Some((0, 5))),
            ]
        );
        // Full.
        assert_eq!(
            commands(&inv(None, false, 0), true),
            vec![tlbi_s12_vmall(5)]
        );
    }

    #[test]
    fn per_page_and_per_block_commands_without_ril() {
        let c = commands(&inv(Some((0x8000_1000, 0x8000_4000)), true, 3), false);
        assert_eq!(
            c,
            (1..4)
                .map(|i| tlbi_s2_ipa(5, 0x8000_0000 + i * 0x1000, true, 0, None))
                .collect::<Vec<_>>()
        );
        // Two 2 MiB blocks, leaf only: one command per block.
        let c = commands(&inv(Some((0x8020_0000, 0x8060_0000)), true, 2), false);
        assert_eq!(
            c,
            vec![
                tlbi_s2_ipa(5, 0x8020_0000, true, 0, None),
                tlbi_s2_ipa(5, 0x8040_0000, true, 0, None),
            ]
        );
        // A table under a 2 MiB entry went: per page (its pages may be cached), no LEAF.
        let c = commands(&inv(Some((0x8020_0000, 0x8040_0000)), false, 2), false);
        assert_eq!(c.len(), 512);
        assert!(c.iter().all(|c| c[1] & D1_LEAF == 0));
        assert_eq!(c[511], tlbi_s2_ipa(5, 0x803f_f000, false, 0, None));
        // Too many commands: one VMALL instead.
        let c = commands(
            &inv(Some((0, (FULL_FLUSH_PAGES + 1) << 12)), true, 0),
            false,
        );
        assert_eq!(c, vec![tlbi_s12_vmall(5)]);
    }

    #[derive(Debug, Clone, PartialEq)]
    enum Ev {
        Cmd(Command),
        Sync,
    }

    #[derive(Default)]
    struct MockQueue {
        log: Mutex<Vec<Ev>>,
        fail_submit: AtomicBool,
    }

    impl CommandQueue for MockQueue {
        fn submit(&self, cmds: &[Command]) -> Result<(), TlbError> {
            if self.fail_submit.load(Ordering::Relaxed) {
                return Err(TlbError {
                    agent: "mock",
                    what: "queue error",
                });
            }
            self.log
                .lock()
                .unwrap()
                .extend(cmds.iter().map(|c| Ev::Cmd(*c)));
            Ok(())
        }
        fn sync(&self) -> Result<(), TlbError> {
            self.log.lock().unwrap().push(Ev::Sync);
            Ok(())
        }
    }

    fn take(q: &MockQueue) -> Vec<Ev> {
        core::mem::take(&mut *q.log.lock().unwrap())
    }

    #[test]
    fn plain_stage2_sync_is_one_cmd_sync() {
        let q = Arc::new(MockQueue::default());
        let b = SmmuV3Tlb::new(q.clone(), 5, true, false);
        b.invalidate(&inv(Some((0x1000, 0x2000)), true, 3));
        b.sync(5).unwrap();
        assert_eq!(
            take(&q),
            vec![
                Ev::Cmd(tlbi_s2_ipa(5, 0x1000, true, 3, Some((0, 0)))),
                Ev::Sync
            ]
        );
        assert_eq!(b.name(), "smmuv3");
    }

    #[test]
    fn nested_range_needs_nh_all_after_a_completed_s2_invalidation() {
        let q = Arc::new(MockQueue::default());
        let b = SmmuV3Tlb::new(q.clone(), 5, true, true);
        b.invalidate(&inv(Some((0x1000, 0x2000)), true, 3));
        b.sync(5).unwrap();
        assert_eq!(
            take(&q),
            vec![
                Ev::Cmd(tlbi_s2_ipa(5, 0x1000, true, 3, Some((0, 0)))),
                Ev::Sync,
                Ev::Cmd(tlbi_nh_all(5)),
                Ev::Sync,
            ]
        );
        // Nothing new: a plain CMD_SYNC.
        b.sync(5).unwrap();
        assert_eq!(take(&q), vec![Ev::Sync]);
        // A full flush: S12_VMALL covers the combined entries, no NH_ALL.
        b.invalidate(&inv(None, false, 0));
        b.sync(5).unwrap();
        assert_eq!(take(&q), vec![Ev::Cmd(tlbi_s12_vmall(5)), Ev::Sync]);
        // Two callers' ranges, one NH_ALL covers both; the second caller skips it.
        b.invalidate(&inv(Some((0x1000, 0x2000)), true, 3));
        b.invalidate(&inv(Some((0x5000, 0x6000)), true, 3));
        b.sync(5).unwrap();
        b.sync(5).unwrap();
        let ev = take(&q);
        assert_eq!(
            ev.iter().filter(|e| **e == Ev::Cmd(tlbi_nh_all(5))).count(),
            1
        );
        assert_eq!(ev.last(), Some(&Ev::Sync));
    }

    #[test]
    fn failed_submission_fails_every_later_sync() {
        let q = Arc::new(MockQueue::default());
        let b = SmmuV3Tlb::new(q.clone(), 5, false, false);
        q.fail_submit.store(true, Ordering::Relaxed);
        b.invalidate(&inv(Some((0x1000, 0x2000)), true, 3));
        q.fail_submit.store(false, Ordering::Relaxed);
        assert!(b.sync(5).is_err());
        assert!(b.sync(5).is_err());
    }

    #[test]
    fn concurrent_nested_syncs_never_skip_a_needed_nh_all() {
        // Every sync that returns must be followed (in the queue's order) by an NH_ALL that was
        // queued after a CMD_SYNC that came after the caller's S2 command.
        let q = Arc::new(MockQueue::default());
        let b = Arc::new(SmmuV3Tlb::new(q.clone(), 5, true, true));
        let done = Arc::new(Mutex::new(Vec::new()));
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (b, q, done) = (b.clone(), q.clone(), done.clone());
                s.spawn(move || {
                    for i in 0..200u64 {
                        let ipa = (t << 30) | (i << 12);
                        b.invalidate(&inv(Some((ipa, ipa + 0x1000)), true, 3));
                        b.sync(5).unwrap();
                        // Where the log stood when this sync returned.
                        let at = q.log.lock().unwrap().len();
                        done.lock().unwrap().push((ipa, at));
                    }
                });
            }
        });
        let log = q.log.lock().unwrap().clone();
        for (ipa, at) in done.lock().unwrap().iter().copied() {
            let cmd = Ev::Cmd(tlbi_s2_ipa(5, ipa, true, 3, Some((0, 0))));
            let pos = log.iter().position(|e| *e == cmd).unwrap();
            let sync_after = pos + log[pos..].iter().position(|e| *e == Ev::Sync).unwrap();
            let nh = log[sync_after..at]
                .iter()
                .position(|e| *e == Ev::Cmd(tlbi_nh_all(5)))
                .map(|p| p + sync_after);
            let nh = nh.unwrap_or_else(|| panic!("{ipa:#x}: no NH_ALL before return"));
            assert!(
                log[nh..at].contains(&Ev::Sync),
                "{ipa:#x}: NH_ALL not synced"
            );
        }
    }
}
