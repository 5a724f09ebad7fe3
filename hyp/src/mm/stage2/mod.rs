//! Lock-free stage-2 translation tables shared by the CPUs and the SMMUs, with batched, per-VM
//! TLB maintenance.
//!
//! - [`table`]: the table itself and its concurrency contract (module docs there), and
//!   [`Stage2`], which ties a table to a VMID and the agents that walk it.
//! - [`tlb`]: what a batch of changes needs invalidated ([`TlbGather`]) and the agents' interface
//!   ([`TlbBackend`]).
//! - [`pool`]: a lock-free page pool that keeps table allocation off the frame allocator's lock.

pub mod pool;
mod sync;
pub mod table;
pub mod tlb;

#[cfg(test)]
pub(crate) mod tests_alloc;
#[cfg(all(test, loom))]
mod tests_loom;
#[cfg(all(test, not(loom)))]
mod tests_table;

pub use self::sync::AtomicU64;
pub use pool::PagePool;
pub use table::{
    BreakSync, PageAllocator, SplitPolicy, Stage2, Stage2Config, Stage2Error, Stage2Table,
    WalkerSync, level_size, stage2_geometry,
};
pub use tlb::{Invalidation, TlbBackend, TlbError, TlbGather};

pub use crate::mm::pgtable::{Attrs, MapError, MemType};

pub mod backend;
#[cfg(all(test, not(loom)))]
mod model;
