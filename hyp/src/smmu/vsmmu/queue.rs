//! Index arithmetic of the SMMUv3 circular queues (command and event queue) as the guest
//! programs them: a base register holding the address and log2 of the number of entries, and
//! PROD/CONS registers holding an index plus a wrap bit just above it (IHI0070 §3.5).
//!
//! Pure arithmetic on register values (the pointer helpers are the driver's, in
//! [`regs`]); reading and writing the entries goes through
//! [`GuestMemory`](super::GuestMemory).

use crate::smmu::v3::regs::{self, Q_BASE_ADDR_MASK};

/// `*_BASE.LOG2SIZE`, bits 4..0.
const BASE_LOG2SIZE_MASK: u64 = 0x1f;

/// The geometry of one queue: where it is and how many entries it has, as the guest last wrote
/// its base register, with the size clamped to what the ID registers advertise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Queue {
    /// Guest IPA of entry 0.
    base: u64,
    /// log2 of the number of entries.
    log2size: u32,
    /// Size of one entry in bytes.
    entry_size: u64,
}

impl Queue {
    /// The queue described by the base register value `base_reg`, with entries of `entry_size`
    /// bytes and at most `2^max_log2size` of them.
    ///
    /// A LOG2SIZE above the advertised maximum behaves as the maximum (as QEMU and the
    /// architecture's CONSTRAINED UNPREDICTABLE choices allow). The address is aligned down to
    /// the queue's size in bytes: the architecture requires that alignment and lets an SMMU treat
    /// the low bits of a misaligned base as zero, which also keeps every entry of the queue inside
    /// one naturally aligned block.
    pub(super) fn from_base(base_reg: u64, entry_size: u64, max_log2size: u32) -> Queue {
        let log2size = ((base_reg & BASE_LOG2SIZE_MASK) as u32).min(max_log2size);
        let bytes = entry_size << log2size;
        Queue {
            base: base_reg & Q_BASE_ADDR_MASK & !(bytes - 1),
            log2size,
            entry_size,
        }
    }

    /// Bits of PROD/CONS that hold the index and the wrap bit.
    #[cfg(test)]
    fn ptr_mask(self) -> u32 {
        regs::q_wrap_index_mask(self.log2size)
    }

    /// `ptr` advanced by one entry (index and wrap bit only; other bits are dropped).
    pub(super) fn inc(self, ptr: u32) -> u32 {
        regs::q_inc(ptr, self.log2size)
    }

    /// The queue holds no entries.
    pub(super) fn is_empty(self, prod: u32, cons: u32) -> bool {
        regs::q_empty(prod, cons, self.log2size)
    }

    /// Every entry of the queue is in use: same index, different wrap bits.
    pub(super) fn is_full(self, prod: u32, cons: u32) -> bool {
        regs::q_full(prod, cons, self.log2size)
    }

    /// Guest IPA of the entry that `ptr` indexes.
    pub(super) fn entry_addr(self, ptr: u32) -> u64 {
        self.base + u64::from(regs::q_idx(ptr, self.log2size)) * self.entry_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry() {
        // 8 entries of 16 bytes, base misaligned by 0x40: aligned down to the 128-byte size.
        let q = Queue::from_base(0x8000_1040 | 3, 16, 19);
        assert_eq!(q.entry_addr(0), 0x8000_1000);
        assert_eq!(q.entry_addr(7), 0x8000_1070);
        // The wrap bit does not move the entry.
        assert_eq!(q.entry_addr(8 | 7), 0x8000_1070);
        assert_eq!(q.ptr_mask(), 0xf);
        // Attribute bits and bits above 51 are not part of the address.
        let q = Queue::from_base((1 << 62) | (1 << 55) | 0x9000_0000, 32, 19);
        assert_eq!(q.entry_addr(0), 0x9000_0000);
        assert_eq!(q.ptr_mask(), 1);
        // LOG2SIZE is clamped to the advertised maximum.
        let q = Queue::from_base(0x8000_0000 | 31, 16, 5);
        assert_eq!(q.ptr_mask(), 0x3f);
    }

    #[test]
    fn empty_full_and_wrap() {
        let q = Queue::from_base(2, 16, 19); // 4 entries
        assert!(q.is_empty(0, 0));
        assert!(q.is_empty(5, 5));
        // Bits above the wrap bit are ignored.
        assert!(q.is_empty(0x100 | 3, 3));
        assert!(!q.is_full(0, 0));
        assert!(q.is_full(4, 0));
        assert!(q.is_full(2, 6));
        assert!(!q.is_empty(4, 0));
        let mut p = 0;
        for _ in 0..4 {
            p = q.inc(p);
        }
        assert_eq!(p, 4);
        for _ in 0..4 {
            p = q.inc(p);
        }
        assert_eq!(p, 0);
        assert_eq!(q.inc(0xffff_ff07), 0);
    }

    #[test]
    fn zero_size_queue_has_one_entry() {
        let q = Queue::from_base(0x8000_0000, 16, 19);
        assert_eq!(q.ptr_mask(), 1);
        assert!(q.is_full(1, 0));
        assert_eq!(q.entry_addr(1), 0x8000_0000);
    }
}
