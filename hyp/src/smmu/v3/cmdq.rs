//! The SMMUv3 command queue, shared by every CPU without a lock.
//!
//! Several CPUs — running different VMs — invalidate their VMs' stage-2 TLB entries at the same
//! time, each through the one command queue of the SMMU. A global lock around "write the commands,
//! write PROD, wait for the `CMD_SYNC`" would make every CPU wait for the slowest sync in the
//! system. [`CmdQueue`] instead follows the scheme of Linux's arm-smmu-v3 driver: slots are
//! reserved with a compare-and-swap, filled in parallel, published to the SMMU in batches by
//! whichever CPU happens to be the *owner*, and each CPU that asked for a `CMD_SYNC` polls the
//! SMMU's CONS for its own sync only.
//!
//! # Shared state
//!
//! Every position in the queue is a 64-bit, never-wrapping *count* of slots (`p`). The SMMU sees
//! `p mod 2^(log2size + 1)`: the low `log2size` bits are the index and the next bit is the wrap
//! bit, exactly the PROD/CONS encoding, so the count is that encoding with more wrap bits. Counts
//! make every comparison in the protocol exact (no "same index, which lap?" questions) and let
//! the waiters below work out the lap of the hardware CONS without a lock.
//!
//! | word | what |
//! |---|---|
//! | `prod` | bit 63: OWNED; bits 62..0: slots reserved so far. Changed only by CAS / `fetch_and`. |
//! | `owner_prod` | the count up to which the last owner wrote PROD; the next owner starts there. |
//! | `cons` | a lower bound of the hardware CONS (as a count); only ever raised (`fetch_max`). |
//! | `valid[i]` | `p + 1` once slot `p` (with `p mod size == i`) holds its command: a per-slot sequence number, so "valid" needs no wrap polarity. |
//!
//! # Issuing `n` commands (+ 1 `CMD_SYNC`)
//!
//! 1. **Reserve.** Read `prod` and `cons`; if `prod + n - cons > size` the queue may be full:
//!    read CONS from the hardware (the only time the issue path reads it) and spin, bounded,
//!    until there is space. Then CAS `prod` to `prod + n` with OWNED set. The CPU that found
//!    OWNED clear is the **owner** of everything reserved from its first slot until it clears
//!    the flag again; every other CPU is not.
//! 2. **Write** the commands (and the `CMD_SYNC` last) into the reserved slots, clean them to the
//!    point of coherency for a non-coherent SMMU, then mark each slot valid (`valid[i] = p + 1`,
//!    release). A CPU never waits between reserving and marking valid, so a reserved slot always
//!    becomes valid within a few stores.
//! 3. **Non-owners** are done here when they asked for no sync: they return without waiting for
//!    anyone. Their commands go out with the owner's batch.
//! 4. **The owner**
//!    1. waits until `owner_prod` equals its first slot: the previous owner has written PROD up
//!       to there (so PROD writes happen in order and PROD never moves backwards);
//!    2. clears OWNED with `fetch_and`, which returns the end of its batch `E`: its own slots and
//!       every slot other CPUs reserved meanwhile. From now on the next reserving CPU is the next
//!       owner, gathering the next batch while this one is published;
//!    3. waits until every slot of the batch is valid (acquire), so PROD never covers a slot
//!       that has not been written;
//!    4. writes PROD = `E` to the SMMU **once** for the whole batch;
//!    5. hands over: `owner_prod = E` (release).
//! 5. **Sync.** A CPU that appended a `CMD_SYNC` at slot `s` waits until CONS has passed `s`
//!    (as counts: `cons > s`), checking CONS.ERR. It waits for its own sync only — not for later
//!    syncs, and it holds nothing while it waits: other CPUs reserve, write and publish around
//!    it. Because the SMMU executes the queue in order, `cons > s` means every slot before `s`
//!    has completed: every command reserved before this sync, on any CPU. A command whose
//!    `issue` returned before this `issue` started was reserved earlier in `prod`'s modification
//!    order, so it is covered — which is what [`CommandQueue::sync`] promises.
//!
//! The only waits on other CPUs are 4.1 and 4.3, and they last as long as another CPU takes to
//! write a few slots (no hardware involved). The waits on the SMMU (full queue, sync) are
//! bounded by [`CmdqOptions::max_spins`] and end in [`CmdqError::Timeout`]; a set CONS.ERR ends
//! them with [`CmdqError::Command`]. The waits on other CPUs are bounded too, by
//! [`CPU_WAIT_SCALE`] times as many spins: an owner that gives up in 4.1 or 4.3 cannot publish
//! its batch, so it marks the queue broken and every later call fails with
//! [`CmdqError::Broken`] instead of hanging. That must only happen when a CPU really stopped in
//! the middle of `issue`, not when it was merely descheduled for a while (a vCPU thread of an
//! emulator), hence the larger bound: a spin there is a load, not an MMIO read.
//!
//! # Reading CONS without knowing its lap
//!
//! The hardware CONS has one wrap bit; the waiters need a count. A reader loads `cons` (= `lo`),
//! reads the register (`raw`) and loads `cons` again. If `cons` changed, another CPU saw the SMMU
//! make progress: the reader takes that newer bound and reads the register again on its next
//! spin. If it is still `lo`, the hardware count `c` at the register read lies in
//! `[lo, lo + size]`:
//!
//! - `lo <= c`: every value of `cons` comes from an earlier register read, and CONS only grows.
//! - `c <= lo + size`: `c` is at most the last PROD written, the end `E` of some batch. Slot
//!   `E - 1` was reserved by a CPU that checked `E - seen <= size` against a value `seen` of
//!   `cons` that it loaded before marking the slot valid, which the owner acquired before
//!   writing PROD, which the SMMU saw before consuming up to `c`, which the register read
//!   observed before the second load of `cons` ([`QueueHw::read_cons`] is ordered). So that
//!   load returns `seen` or a later value, and since `cons` only grows, `seen <= lo`.
//!
//! Within `size + 1 <= 2 * size` consecutive counts each hardware value occurs once, so
//! `c = lo + ((raw - lo) mod 2 * size)`, which the reader publishes with `fetch_max`. Linux
//! closes the same gap with a shared/exclusive counter that keeps its cached CONS from moving
//! while a sync waits; here nobody holds anything while it waits. A reader only retries when
//! `cons` rose, so it cannot be kept spinning while the SMMU makes progress: once `cons` passes
//! its sync it is done.
//!
//! # Errors
//!
//! When the SMMU meets a command it cannot execute it stops, sets CONS.ERR and leaves CONS at
//! that command. Every waiter whose sync had not completed gets [`CmdqError::Command`] with the
//! error code and the index; a waiter whose sync completed before the failing command still gets
//! `Ok`. The driver's GERROR handler calls [`CmdQueue::skip_failed_command`] (which turns an
//! illegal command into a `CMD_SYNC`, as Linux does) and then acknowledges GERROR.CMDQ_ERR.
//!
//! # Contract with the rest of the driver
//!
//! `issue` must not be re-entered on the same CPU (from an interrupt handler that interrupted it):
//! a CPU stopped between steps 1 and 2 would make its own nested call wait for itself.
//!
//! Like a queued lock, the protocol assumes that a CPU is not preempted for long in the middle
//! of `issue`: the owner role is handed to a CPU when it reserves, and the CPUs whose slots it
//! gathered wait for it. At EL2 on dedicated pCPUs that holds. Where threads share CPUs (host
//! tests and benchmarks, an emulator's vCPU threads on a busy host) a descheduled owner stalls
//! the CPUs behind it for a time slice, where a descheduled *waiter* of a lock would stall
//! nobody; the queue stays correct, only slower.

use alloc::boxed::Box;
use alloc::sync::Arc;
use core::fmt;

use super::cmd::Command;
use crate::mm::stage2::TlbError;
use crate::mm::stage2::backend::smmuv3::CommandQueue;

use self::sync::{AtomicBool, AtomicU64, Ordering, spin_hint};

/// The atomics the queue uses: `core`'s normally, [loom]'s under `--cfg loom`, so the loom
/// models at the bottom of this file check the real protocol.
///
/// [loom]: https://docs.rs/loom
mod sync {
    #[cfg(loom)]
    pub(super) use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    #[cfg(not(loom))]
    pub(super) use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// Under loom, a yield in every spin, so that the model runs the thread being waited for;
    /// nothing otherwise (`CmdqOptions::relax` pauses).
    #[inline]
    pub(super) fn spin_hint() {
        #[cfg(loom)]
        loom::thread::yield_now();
    }
}

/// The SMMU's side of a command queue: its PROD and CONS registers.
///
/// Both use the SMMUv3 encoding: bits `[log2size-1:0]` are the index, bit `log2size` is the
/// wrap bit. CONS also carries ERR in bits `[30:24]`.
pub trait QueueHw: Send + Sync {
    /// Writes CMDQ_PROD. Everything the calling CPU has observed written to the queue memory
    /// before this call (its own stores, and other CPUs' stores it acquired) must be visible to
    /// the SMMU before the SMMU sees the new PROD: an MMIO implementation issues a store barrier
    /// to the outer-shareable domain first (Linux `writel`).
    fn write_prod(&self, prod: u32);
    /// Reads CMDQ_CONS. Must be ordered before the caller's later memory accesses (Linux `readl`).
    fn read_cons(&self) -> u32;
}

/// Tuning and platform hooks of a [`CmdQueue`].
#[derive(Clone, Copy, Debug)]
pub struct CmdqOptions {
    /// Most `relax` calls one wait for the SMMU makes (for space in the queue, for a
    /// `CMD_SYNC`) before it gives up with [`CmdqError::Timeout`]; waits for other CPUs get
    /// [`CPU_WAIT_SCALE`] times as many.
    pub max_spins: u64,
    /// Called once per spin of every wait: a pause, `wfe`, a delay.
    pub relax: fn(),
    /// Cleans `len` bytes at the given address to the point of coherency (`DC CVAC` + `DSB`), for
    /// an SMMU that does not snoop the CPUs' caches; `None` for a coherent one.
    pub clean: Option<fn(*const u8, usize)>,
}

impl Default for CmdqOptions {
    /// About a second of spinning on an MMIO register read per spin, like Linux's
    /// `ARM_SMMU_POLL_TIMEOUT_US`; coherent queue.
    fn default() -> Self {
        Self {
            max_spins: 1 << 22,
            relax: core::hint::spin_loop,
            clean: None,
        }
    }
}

/// Why [`CmdQueue::issue`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdqError {
    /// The batch (with its `CMD_SYNC`) needs more slots than the queue has.
    TooLarge {
        /// Slots the batch needs.
        slots: usize,
        /// Slots in the queue.
        capacity: usize,
    },
    /// The SMMU stopped at a command: CONS.ERR was `code` (1 CERROR_ILL, 2 CERROR_ABT,
    /// 3 CERROR_ATC_INV_SYNC) with CONS at queue index `index`.
    Command {
        /// CONS.ERR.
        code: u8,
        /// The queue index of the command the SMMU stopped at.
        index: u32,
    },
    /// A wait exceeded [`CmdqOptions::max_spins`]: the SMMU did not consume the queue (or, for
    /// an owner, another CPU stopped in the middle of an issue).
    Timeout,
    /// An owner timed out before publishing its batch: some commands will never reach the SMMU,
    /// so the queue refuses all further work.
    Broken,
    /// [`CmdQueue::resync`] found commands being issued: the queue is not idle.
    Busy,
}

impl fmt::Display for CmdqError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdqError::TooLarge { slots, capacity } => {
                write!(f, "batch of {slots} slots exceeds the queue ({capacity})")
            }
            CmdqError::Command { code, index } => {
                let what = match code {
                    1 => "illegal command",
                    2 => "abort on command fetch",
                    3 => "ATC invalidation timeout",
                    _ => "unknown error",
                };
                write!(
                    f,
                    "SMMU stopped at queue index {index}: {what} (CONS.ERR {code})"
                )
            }
            CmdqError::Timeout => f.write_str("timed out waiting for the command queue"),
            CmdqError::Broken => f.write_str("command queue broken by an earlier timeout"),
            CmdqError::Busy => f.write_str("command queue busy (commands being issued)"),
        }
    }
}

/// Counters of a [`CmdQueue`] since it was created. Taken while other CPUs issue, they may be a
/// few commands apart from each other; once the queue is idle they are exact.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CmdqStats {
    /// Commands issued, not counting the queue's own `CMD_SYNC`s.
    pub commands: u64,
    /// `CMD_SYNC`s issued (calls with `sync`).
    pub syncs: u64,
    /// PROD writes: batches published to the SMMU.
    pub batches: u64,
    /// Times a CPU became owner. Equal to `batches` unless an owner timed out.
    pub owned: u64,
    /// Slots owners published on behalf of other CPUs (their batches' shares of other CPUs).
    pub gathered: u64,
    /// Times a reservation found the queue full and had to wait for the SMMU.
    pub full_waits: u64,
}

/// CMDQ_CONS.ERR: bits [30:24].
const CONS_ERR_SHIFT: u32 = 24;
const CONS_ERR_MASK: u32 = 0x7f;
/// CONS.ERR: the command was illegal.
pub const CERROR_ILL: u8 = 1;
/// Largest CMDQ_BASE.LOG2SIZE the architecture allows (IDR1.CMDQS is at most 19).
pub const MAX_LOG2SIZE: u32 = 19;

/// Waits on other CPUs (an owner waiting for its predecessor or for other CPUs' slots) may spin
/// this many times [`CmdqOptions::max_spins`] before the owner gives up and breaks the queue.
pub const CPU_WAIT_SCALE: u64 = 64;

/// `prod` bit 63: a CPU owns the batch being gathered.
const OWNED: u64 = 1 << 63;

/// A value on a cache line of its own, so that CPUs hammering one word do not slow the others.
#[repr(align(64))]
struct Padded<T>(T);

impl<T> core::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// The counters that are not derived from `prod`.
struct Counters {
    syncs: AtomicU64,
    batches: AtomicU64,
    owned: AtomicU64,
    gathered: AtomicU64,
    full_waits: AtomicU64,
}

/// The lock-free SMMUv3 command queue; see the module docs for the protocol.
pub struct CmdQueue {
    /// OWNED | slots reserved (a count).
    prod: Padded<AtomicU64>,
    /// The count up to which PROD has been written by the last owner.
    owner_prod: Padded<AtomicU64>,
    /// A lower bound of the hardware CONS, as a count.
    cons: Padded<AtomicU64>,
    /// An owner gave up: batches may be lost.
    broken: AtomicBool,
    /// `valid[p % size] == p + 1`: slot `p` has been written.
    valid: Box<[AtomicU64]>,
    /// The queue memory: `size` 16-byte entries.
    entries: *mut [u64; 2],
    log2size: u32,
    /// The count the queue started at (the hardware CONS at creation).
    start: u64,
    hw: Arc<dyn QueueHw>,
    opts: CmdqOptions,
    stats: Padded<Counters>,
    /// Under loom, a copy of the queue memory that loom can see: loom checks every access to it
    /// for races, so a slot read by the model SMMU before it was written (or written while the
    /// SMMU reads it) fails the model.
    #[cfg(loom)]
    shadow: Box<[loom::cell::UnsafeCell<[u64; 2]>]>,
}

// SAFETY: the only non-Send/Sync field is `entries`, memory that the constructor's caller handed
// to this queue alone. Every slot is written only by the one CPU that reserved it, before it is
// marked valid, and read by the SMMU only after PROD covers it; the protocol (module docs) orders
// these accesses.
unsafe impl Send for CmdQueue {}
// SAFETY: as for `Send`: shared access to `entries` is ordered by the reservation protocol.
unsafe impl Sync for CmdQueue {}

impl CmdQueue {
    /// A queue over `1 << log2size` entries at `entries`, driven through `hw`. It starts where
    /// the hardware CONS is (normally 0 after the driver programmed CMDQ_BASE).
    ///
    /// # Safety
    ///
    /// - `entries` points to `1 << log2size` entries of 16 bytes, readable and writable by this
    ///   CPU at that address for as long as the queue lives, used by nothing else but the SMMU
    ///   behind `hw` (which reads them as its command queue).
    /// - The queue is empty: the hardware PROD equals CONS, with CONS.ERR clear.
    ///
    /// # Panics
    ///
    /// If `log2size` exceeds [`MAX_LOG2SIZE`] or `entries` is null or misaligned.
    pub unsafe fn new(
        entries: *mut [u64; 2],
        log2size: u32,
        hw: Arc<dyn QueueHw>,
        opts: CmdqOptions,
    ) -> CmdQueue {
        assert!(
            log2size <= MAX_LOG2SIZE,
            "CMDQ log2size {log2size} too large"
        );
        assert!(
            !entries.is_null() && entries.is_aligned(),
            "bad CMDQ memory"
        );
        let size = 1usize << log2size;
        let raw = hw.read_cons();
        debug_assert_eq!((raw >> CONS_ERR_SHIFT) & CONS_ERR_MASK, 0, "CMDQ in error");
        let start = u64::from(raw) & ((2 << log2size) - 1);
        let counter = |v: u64| AtomicU64::new(v);
        CmdQueue {
            prod: Padded(counter(start)),
            owner_prod: Padded(counter(start)),
            cons: Padded(counter(start)),
            broken: AtomicBool::new(false),
            valid: (0..size).map(|_| AtomicU64::new(0)).collect(),
            entries,
            log2size,
            start,
            hw,
            opts,
            stats: Padded(Counters {
                syncs: counter(0),
                batches: counter(0),
                owned: counter(0),
                gathered: counter(0),
                full_waits: counter(0),
            }),
            #[cfg(loom)]
            shadow: (0..size)
                .map(|_| loom::cell::UnsafeCell::new([0; 2]))
                .collect(),
        }
    }

    /// Entries in the queue.
    pub fn capacity(&self) -> usize {
        1 << self.log2size
    }

    /// CMDQ_BASE.LOG2SIZE of the queue.
    pub fn log2size(&self) -> u32 {
        self.log2size
    }

    fn size(&self) -> u64 {
        1 << self.log2size
    }

    /// The slot index of count `p`.
    fn slot(&self, p: u64) -> usize {
        (p & (self.size() - 1)) as usize
    }

    /// Count `p` in the PROD/CONS encoding (index + wrap bit).
    fn hw_value(&self, p: u64) -> u32 {
        (p & ((2 << self.log2size) - 1)) as u32
    }

    /// Appends `cmds` and, with `sync`, a `CMD_SYNC` after them, then — with `sync` — waits until
    /// the SMMU has completed that `CMD_SYNC`, and so every command reserved before it on any
    /// CPU. Without `sync` it returns once the commands are in the queue (an owner: once they
    /// are published; anyone else: at once).
    ///
    /// # Errors
    ///
    /// [`CmdqError::TooLarge`] (nothing issued) when the batch needs more slots than the queue
    /// has; [`CmdqError::Command`] when the SMMU stopped at a failed command before this call's
    /// sync (or, waiting for space, before any room was made); [`CmdqError::Timeout`] when a
    /// wait ran out of spins; [`CmdqError::Broken`] after an owner gave up. After an error the
    /// commands may or may not have been executed.
    pub fn issue(&self, cmds: &[[u64; 2]], sync: bool) -> Result<(), CmdqError> {
        let n = cmds.len() as u64 + u64::from(sync);
        if n == 0 {
            return Ok(());
        }
        if n > self.size() {
            return Err(CmdqError::TooLarge {
                slots: cmds.len() + usize::from(sync),
                capacity: self.capacity(),
            });
        }
        if self.broken.load(Ordering::Relaxed) {
            return Err(CmdqError::Broken);
        }
        let (first, owner) = self.reserve(n)?;
        let end = first + n;
        for (i, cmd) in cmds.iter().enumerate() {
            self.write_slot(first + i as u64, *cmd);
        }
        if sync {
            self.write_slot(end - 1, Command::sync().encode());
            self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        }
        self.clean_slots(first, end);
        for p in first..end {
            self.valid[self.slot(p)].store(p + 1, Ordering::Release);
        }
        if owner {
            self.publish(first, end)?;
        }
        if sync {
            self.wait_consumed(end - 1)?;
        }
        Ok(())
    }

    /// Step 1: reserves `n` slots; returns the first and whether this CPU is the owner.
    fn reserve(&self, n: u64) -> Result<(u64, bool), CmdqError> {
        let size = self.size();
        let mut old = self.prod.load(Ordering::Relaxed);
        let mut spins = 0u64;
        let mut counted = false;
        loop {
            let p = old & !OWNED;
            // Acquire: pairs with the release in `read_cons`, so that `prod`, whose slots were
            // published before the SMMU consumed up to this value, is not older than it (the
            // subtraction below then cannot underflow once the CAS succeeds).
            let mut cons = self.cons.load(Ordering::Acquire);
            if (p + n).saturating_sub(cons) > size {
                // Full as far as we know: ask the SMMU.
                let (now, err) = self.read_cons();
                cons = now;
                if (p + n).saturating_sub(cons) > size {
                    if err != 0 {
                        return Err(self.command_error(err, cons));
                    }
                    if !counted {
                        counted = true;
                        self.stats.full_waits.fetch_add(1, Ordering::Relaxed);
                    }
                    self.relax(&mut spins)?;
                    old = self.prod.load(Ordering::Relaxed);
                    continue;
                }
            }
            match self.prod.compare_exchange_weak(
                old,
                (p + n) | OWNED,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok((p, old & OWNED == 0)),
                Err(now) => old = now,
            }
        }
    }

    /// Writes `cmd` into slot `p`, which this CPU reserved.
    fn write_slot(&self, p: u64, cmd: [u64; 2]) {
        let i = self.slot(p);
        // SAFETY: `i < size` and `entries` holds `size` entries (constructor contract). Slot `p`
        // was reserved by this CPU and is not yet valid: no other CPU writes it, and the SMMU
        // consumed the previous occupant (`p - size`) before the reservation passed the space
        // check, and will not read it again until PROD covers `p`.
        unsafe {
            self.entries
                .add(i)
                .write_volatile([cmd[0].to_le(), cmd[1].to_le()])
        };
        #[cfg(loom)]
        // SAFETY: as above; loom checks that claim.
        self.shadow[i].with_mut(|s| unsafe { *s = cmd });
    }

    /// Cleans slots `[first, end)` (at most `size`) to the point of coherency, if asked to.
    fn clean_slots(&self, first: u64, end: u64) {
        let Some(clean) = self.opts.clean else {
            return;
        };
        let (a, len) = (self.slot(first), (end - first) as usize);
        let head = len.min(self.capacity() - a);
        const ENTRY: usize = core::mem::size_of::<[u64; 2]>();
        // `wrapping_add` keeps the address arithmetic safe; both ranges lie inside the queue.
        clean(self.entries.wrapping_add(a) as *const u8, head * ENTRY);
        if head < len {
            clean(self.entries as *const u8, (len - head) * ENTRY);
        }
    }

    /// Step 4: as owner of the batch that starts at `first` (own slots up to `own_end`),
    /// publishes the batch and hands over.
    fn publish(&self, first: u64, own_end: u64) -> Result<(), CmdqError> {
        self.stats.owned.fetch_add(1, Ordering::Relaxed);
        let mut spins = 0u64;
        let limit = self.opts.max_spins.saturating_mul(CPU_WAIT_SCALE);
        // 4.1: the previous owner has written PROD up to `first`. Acquire: its PROD write is
        // ordered before ours.
        while self.owner_prod.load(Ordering::Acquire) != first {
            self.relax_up_to(&mut spins, limit)
                .inspect_err(|_| self.break_queue())?;
        }
        // 4.2: close the batch; the next reservation makes its CPU the next owner.
        let end = self.prod.fetch_and(!OWNED, Ordering::Relaxed) & !OWNED;
        // 4.3: every slot other CPUs reserved in the batch is written (acquire: their stores to
        // the entries are visible to this CPU, and so to the SMMU after `write_prod`'s barrier).
        for p in own_end..end {
            let v = &self.valid[self.slot(p)];
            while v.load(Ordering::Acquire) != p + 1 {
                self.relax_up_to(&mut spins, limit)
                    .inspect_err(|_| self.break_queue())?;
            }
        }
        // 4.4 and 4.5.
        self.hw.write_prod(self.hw_value(end));
        self.owner_prod.store(end, Ordering::Release);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats
            .gathered
            .fetch_add(end - own_end, Ordering::Relaxed);
        Ok(())
    }

    fn break_queue(&self) {
        self.broken.store(true, Ordering::Relaxed);
    }

    /// Step 5: waits until the SMMU has consumed slot `s` (this CPU's `CMD_SYNC`).
    fn wait_consumed(&self, s: u64) -> Result<(), CmdqError> {
        let mut spins = 0u64;
        loop {
            // Somebody else may already have seen the SMMU pass `s`.
            if self.cons.load(Ordering::Acquire) > s {
                return Ok(());
            }
            let (cons, err) = self.read_cons();
            if cons > s {
                return Ok(());
            }
            if err != 0 {
                return Err(self.command_error(err, cons));
            }
            if self.broken.load(Ordering::Relaxed) {
                return Err(CmdqError::Broken);
            }
            self.relax(&mut spins)?;
        }
    }

    /// Reads the hardware CONS as a count, raising `cons` to it; returns it with CONS.ERR. When
    /// another CPU raised `cons` meanwhile, returns that newer bound (and ERR 0) instead: see
    /// "Reading CONS without knowing its lap" in the module docs.
    fn read_cons(&self) -> (u64, u8) {
        let lo = self.cons.load(Ordering::Acquire);
        let raw = self.hw.read_cons();
        let again = self.cons.load(Ordering::Acquire);
        if again != lo {
            return (again, 0);
        }
        let err = ((raw >> CONS_ERR_SHIFT) & CONS_ERR_MASK) as u8;
        let wrap_mask = (2u64 << self.log2size) - 1;
        let now = lo + (u64::from(raw).wrapping_sub(lo) & wrap_mask);
        // Release: pairs with the acquire loads above and in `reserve`.
        let before = self.cons.fetch_max(now, Ordering::AcqRel);
        (before.max(now), err)
    }

    fn command_error(&self, code: u8, cons: u64) -> CmdqError {
        CmdqError::Command {
            code,
            index: self.slot(cons) as u32,
        }
    }

    /// One spin of a wait for the SMMU.
    fn relax(&self, spins: &mut u64) -> Result<(), CmdqError> {
        self.relax_up_to(spins, self.opts.max_spins)
    }

    /// One spin of a wait that gives up after `limit` spins.
    fn relax_up_to(&self, spins: &mut u64, limit: u64) -> Result<(), CmdqError> {
        *spins += 1;
        if *spins > limit {
            return Err(CmdqError::Timeout);
        }
        (self.opts.relax)();
        spin_hint();
        Ok(())
    }

    /// For the GERROR handler, after CMDQ_ERR: when CONS.ERR is CERROR_ILL, replaces the command
    /// the SMMU stopped at with a `CMD_SYNC`, so that the SMMU goes on with the rest of the queue
    /// once the handler acknowledges the error (GERRORN). Other errors leave the queue as it is:
    /// after CERROR_ABT the SMMU fetches the command again, after CERROR_ATC_INV_SYNC it moves on.
    /// Returns the error, or `None` when CONS.ERR is clear.
    pub fn skip_failed_command(&self) -> Option<CmdqError> {
        let raw = self.hw.read_cons();
        let code = ((raw >> CONS_ERR_SHIFT) & CONS_ERR_MASK) as u8;
        if code == 0 {
            return None;
        }
        let i = self.slot(u64::from(raw));
        if code == CERROR_ILL {
            let sync = Command::sync().encode();
            // SAFETY: `i < size`. The slot is published and not consumed — the SMMU stopped at
            // it — so no CPU writes it until the SMMU moves on, and the SMMU does not read it
            // until the error is acknowledged, after this call.
            unsafe {
                self.entries
                    .add(i)
                    .write_volatile([sync[0].to_le(), sync[1].to_le()])
            };
            #[cfg(loom)]
            // SAFETY: as above.
            self.shadow[i].with_mut(|s| unsafe { *s = sync });
            if let Some(clean) = self.opts.clean {
                clean(
                    self.entries.wrapping_add(i) as *const u8,
                    core::mem::size_of::<[u64; 2]>(),
                );
            }
        }
        Some(CmdqError::Command {
            code,
            index: i as u32,
        })
    }

    /// Lets the queue go on after the SMMU's command-queue registers were programmed again
    /// (its power domain was off, or the driver re-enabled it): every published command counts
    /// as consumed, and the return value is the PROD/CONS value (index + wrap bit) at which the
    /// caller must program both CMDQ_PROD and CMDQ_CONS before it sets CMDQEN. The counts then
    /// continue where they were — the next command goes to the very next slot, and a waiter's
    /// view of CONS stays exact (module docs: "Reading CONS without knowing its lap").
    ///
    /// Commands published but not consumed by then (an SMMU that stopped before it lost power)
    /// are dropped; the caller is expected to issue whatever supersedes them (the driver's
    /// resume issues `CMD_CFGI_ALL` and `CMD_TLBI_*_ALL`). No waiter can be left behind for
    /// them: the queue must be idle.
    ///
    /// # Errors
    ///
    /// [`CmdqError::Busy`] when an `issue` is in progress (a batch is owned, or published only
    /// partly); [`CmdqError::Broken`] after an owner gave up. Nothing changes then.
    ///
    /// # Safety
    ///
    /// - No `issue` runs concurrently (checked as far as the shared state shows, see Errors):
    ///   otherwise a CPU could reserve a slot counted as consumed here, and the SMMU could read
    ///   it half written.
    /// - The SMMU does not read the queue (CMDQEN clear, acknowledged) from before this call
    ///   until the caller wrote the returned value to CMDQ_PROD and CMDQ_CONS: the slots below it
    ///   are rewritten by the next issues.
    pub unsafe fn resync(&self) -> Result<u32, CmdqError> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(CmdqError::Broken);
        }
        // Acquire: pairs with the owner's release of `owner_prod`, so the PROD write of the
        // last batch is ordered before the caller's register writes.
        let p = self.prod.load(Ordering::Acquire);
        if p & OWNED != 0 || self.owner_prod.load(Ordering::Acquire) != p {
            return Err(CmdqError::Busy);
        }
        // Release: pairs with the acquire loads of `cons` in `reserve` and `read_cons`.
        self.cons.fetch_max(p, Ordering::AcqRel);
        Ok(self.hw_value(p))
    }

    /// The counters so far.
    pub fn stats(&self) -> CmdqStats {
        let s = &self.stats;
        let syncs = s.syncs.load(Ordering::Relaxed);
        let slots = (self.prod.load(Ordering::Relaxed) & !OWNED) - self.start;
        CmdqStats {
            commands: slots.saturating_sub(syncs),
            syncs,
            batches: s.batches.load(Ordering::Relaxed),
            owned: s.owned.load(Ordering::Relaxed),
            gathered: s.gathered.load(Ordering::Relaxed),
            full_waits: s.full_waits.load(Ordering::Relaxed),
        }
    }

    /// Loom models only: slot `i` as the model SMMU reads it, through loom's race checks.
    #[cfg(all(test, loom))]
    fn loom_read(&self, i: usize) -> [u64; 2] {
        // SAFETY: loom checks that no write to the slot races with this read.
        self.shadow[i].with(|s| unsafe { *s })
    }
}

const AGENT: &str = "smmuv3-cmdq";

fn tlb_error(e: CmdqError) -> TlbError {
    log::error!("{AGENT}: {e}");
    TlbError {
        agent: AGENT,
        what: match e {
            CmdqError::TooLarge { .. } => "batch larger than the command queue",
            CmdqError::Command { .. } => "the SMMU stopped at a command (CONS.ERR)",
            CmdqError::Timeout => "timed out waiting for the SMMU",
            CmdqError::Broken => "command queue broken by an earlier timeout",
            CmdqError::Busy => "command queue busy",
        },
    }
}

/// The stage-2 TLB backends' view: `submit` appends without waiting (in chunks of at most the
/// queue's size), `sync` appends a `CMD_SYNC` and waits for it.
impl CommandQueue for CmdQueue {
    fn submit(&self, cmds: &[[u64; 2]]) -> Result<(), TlbError> {
        for chunk in cmds.chunks(self.capacity()) {
            self.issue(chunk, false).map_err(tlb_error)?;
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), TlbError> {
        self.issue(&[], true).map_err(tlb_error)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::mm::stage2::backend::smmuv3::{
        OP_SYNC, OP_TLBI_S2_IPA, SYNC_CS_NONE, SmmuV3Tlb, cmd_sync, tlbi_s2_ipa,
    };
    use crate::mm::stage2::{Invalidation, TlbBackend};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, AtomicUsize};
    use std::thread;
    use std::vec::Vec;

    /// An illegal opcode for the model SMMU.
    const BAD: u64 = 0x7f;

    /// The command thread `t` issues as its `seq`-th: a `TLBI_S2_IPA` with VMID `t + 1`.
    fn cmd(t: usize, seq: u64) -> [u64; 2] {
        tlbi_s2_ipa(t as u16 + 1, seq << 12, false, 0, None)
    }

    /// `Some((t, seq))` for a command made by [`cmd`], `None` for a `CMD_SYNC`.
    fn decode(c: [u64; 2]) -> Option<(usize, u64)> {
        match c[0] & 0xff {
            op if op == u64::from(OP_SYNC) => None,
            op if op == u64::from(OP_TLBI_S2_IPA) => {
                Some(((c[0] >> 32 & 0xffff) as usize - 1, c[1] >> 12))
            }
            op => panic!("unexpected opcode {op:#x}"),
        }
    }

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Mode {
        /// Consumes synchronously in `write_prod` (and in `read_cons`, to catch up after the
        /// limit is raised or an error acknowledged), like QEMU.
        Inline,
        /// A thread of its own consumes, one entry at a time, lagging behind PROD.
        Thread,
    }

    #[derive(Default)]
    struct ModelState {
        /// Every command consumed, in order.
        log: Vec<[u64; 2]>,
        /// Every PROD value written, in order.
        prod_writes: Vec<u32>,
        /// CONS (index + wrap).
        cons: u32,
        /// CONS.ERR.
        err: u8,
    }

    /// A host model of the SMMU's command-queue consumer.
    struct ModelHw {
        base: usize,
        log2size: u32,
        mode: Mode,
        prod: AtomicU32,
        /// What `read_cons` returns.
        cons: AtomicU32,
        st: Mutex<ModelState>,
        /// Consume no more than this many entries in all (a stopped or held-back SMMU).
        limit: AtomicUsize,
        /// `write_prod` spins while set (a slow PROD write), counting itself in `in_write`.
        block: AtomicBool,
        in_write: AtomicUsize,
        exit: AtomicBool,
    }

    impl ModelHw {
        fn wrap_mask(&self) -> u32 {
            (2 << self.log2size) - 1
        }

        /// Consumes up to `max` entries below PROD; returns how many.
        fn consume(&self, max: usize) -> usize {
            let mut st = self.st.lock().unwrap();
            let prod = self.prod.load(Ordering::Acquire);
            let mut done = 0;
            while done < max
                && st.err == 0
                && st.cons != prod
                && st.log.len() < self.limit.load(Ordering::Relaxed)
            {
                let i = (st.cons & ((1 << self.log2size) - 1)) as usize;
                // SAFETY: slot `i` is below PROD: the queue wrote it before publishing it
                // (acquired through `prod`), and writes it again only after CONS passes it.
                let e = unsafe { (self.base as *const [u64; 2]).add(i).read_volatile() };
                let e = [u64::from_le(e[0]), u64::from_le(e[1])];
                let op = e[0] & 0xff;
                if ![0x10, 0x28, 0x2a, 0x46].contains(&op) {
                    st.err = CERROR_ILL;
                } else {
                    st.log.push(e);
                    st.cons = (st.cons + 1) & self.wrap_mask();
                    done += 1;
                }
                self.cons.store(
                    st.cons | (u32::from(st.err) << CONS_ERR_SHIFT),
                    Ordering::Release,
                );
            }
            done
        }

        /// GERRORN acknowledge: clears CONS.ERR and goes on.
        fn ack(&self) {
            let mut st = self.st.lock().unwrap();
            st.err = 0;
            self.cons.store(st.cons, Ordering::Release);
            drop(st);
            self.consume(usize::MAX);
        }

        fn log(&self) -> Vec<[u64; 2]> {
            self.st.lock().unwrap().log.clone()
        }

        fn log_len(&self) -> usize {
            self.st.lock().unwrap().log.len()
        }

        fn prod_writes(&self) -> Vec<u32> {
            self.st.lock().unwrap().prod_writes.clone()
        }
    }

    impl QueueHw for ModelHw {
        fn write_prod(&self, prod: u32) {
            self.in_write.fetch_add(1, Ordering::SeqCst);
            while self.block.load(Ordering::SeqCst) {
                thread::yield_now();
            }
            {
                let mut st = self.st.lock().unwrap();
                let last = st.prod_writes.last().copied().unwrap_or(0);
                // PROD only moves forward, by at most a queue.
                let step = prod.wrapping_sub(last) & self.wrap_mask();
                assert!(
                    step > 0 && step <= 1 << self.log2size,
                    "PROD {last} -> {prod}"
                );
                st.prod_writes.push(prod);
                self.prod.store(prod, Ordering::Release);
            }
            if self.mode == Mode::Inline {
                self.consume(usize::MAX);
            }
            self.in_write.fetch_sub(1, Ordering::SeqCst);
        }

        fn read_cons(&self) -> u32 {
            if self.mode == Mode::Inline {
                self.consume(usize::MAX);
            }
            self.cons.load(Ordering::Acquire)
        }
    }

    /// A queue over a model SMMU. Fields drop in order: the queue before its memory.
    struct Harness {
        q: Arc<CmdQueue>,
        hw: Arc<ModelHw>,
        consumer: Option<thread::JoinHandle<()>>,
        _mem: Box<[[u64; 2]]>,
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            self.hw.exit.store(true, Ordering::Relaxed);
            if let Some(t) = self.consumer.take() {
                t.join().unwrap();
            }
        }
    }

    fn opts(max_spins: u64) -> CmdqOptions {
        CmdqOptions {
            max_spins,
            relax: thread::yield_now,
            clean: None,
        }
    }

    fn harness_with(log2size: u32, mode: Mode, opts: CmdqOptions) -> Harness {
        let mut mem = vec![[0u64; 2]; 1 << log2size].into_boxed_slice();
        let hw = Arc::new(ModelHw {
            base: mem.as_mut_ptr() as usize,
            log2size,
            mode,
            prod: AtomicU32::new(0),
            cons: AtomicU32::new(0),
            st: Mutex::new(ModelState::default()),
            limit: AtomicUsize::new(usize::MAX),
            block: AtomicBool::new(false),
            in_write: AtomicUsize::new(0),
            exit: AtomicBool::new(false),
        });
        // SAFETY: `mem` holds `1 << log2size` entries and outlives the queue (field order of
        // `Harness`); only the queue and the model SMMU use it; the model starts empty.
        let q = Arc::new(unsafe { CmdQueue::new(mem.as_mut_ptr(), log2size, hw.clone(), opts) });
        let consumer = (mode == Mode::Thread).then(|| {
            let hw = hw.clone();
            thread::spawn(move || {
                while !hw.exit.load(Ordering::Relaxed) {
                    hw.consume(1);
                    thread::yield_now();
                }
            })
        });
        Harness {
            q,
            hw,
            consumer,
            _mem: mem,
        }
    }

    fn harness(log2size: u32, mode: Mode) -> Harness {
        harness_with(log2size, mode, opts(1 << 30))
    }

    /// Spins until `f` holds (the test fails by timing out if it never does).
    fn until(f: impl Fn() -> bool) {
        let t0 = std::time::Instant::now();
        while !f() {
            assert!(t0.elapsed().as_secs() < 20, "condition never held");
            thread::yield_now();
        }
    }

    #[test]
    fn single_cpu_issue_and_sync() {
        let h = harness(4, Mode::Inline);
        h.q.issue(&[cmd(0, 0), cmd(0, 1)], false).unwrap();
        // Alone, the CPU is the owner: its commands are published at once.
        assert_eq!(h.hw.log(), vec![cmd(0, 0), cmd(0, 1)]);
        h.q.issue(&[cmd(0, 2)], true).unwrap();
        h.q.issue(&[], true).unwrap();
        h.q.issue(&[], false).unwrap();
        let sync = cmd_sync(SYNC_CS_NONE);
        assert_eq!(
            h.hw.log(),
            vec![cmd(0, 0), cmd(0, 1), cmd(0, 2), sync, sync]
        );
        assert_eq!(h.hw.prod_writes(), vec![2, 4, 5]);
        assert_eq!(
            h.q.stats(),
            CmdqStats {
                commands: 3,
                syncs: 2,
                batches: 3,
                owned: 3,
                gathered: 0,
                full_waits: 0
            }
        );
    }

    #[test]
    fn batch_larger_than_the_queue_is_refused() {
        let h = harness(2, Mode::Inline);
        let four: Vec<_> = (0..4).map(|i| cmd(0, i)).collect();
        assert_eq!(
            h.q.issue(&four, true),
            Err(CmdqError::TooLarge {
                slots: 5,
                capacity: 4
            })
        );
        assert_eq!(h.hw.log_len(), 0, "nothing was reserved");
        h.q.issue(&four, false).unwrap();
        h.q.issue(&four[..3], true).unwrap();
        assert_eq!(h.hw.log_len(), 8);
        // Through the stage-2 interface, long lists go in queue-sized chunks.
        let many: Vec<_> = (0..11).map(|i| cmd(1, i)).collect();
        CommandQueue::submit(&*h.q, &many).unwrap();
        assert_eq!(h.hw.log()[8..], many[..]);
    }

    /// Every size of batch, wrapping a 16-entry queue many times, with a consumer that lags.
    #[test]
    fn queue_wraps_many_times() {
        let h = harness(4, Mode::Thread);
        let mut expect = Vec::new();
        let mut seq = 0;
        for round in 0..60 {
            for k in 0..=16u64 {
                let sync = k < 16 && (k + round) % 2 == 0;
                let cmds: Vec<_> = (seq..seq + k).map(|s| cmd(0, s)).collect();
                seq += k;
                h.q.issue(&cmds, sync).unwrap();
                expect.extend_from_slice(&cmds);
                if sync {
                    expect.push(cmd_sync(SYNC_CS_NONE));
                    // Our sync, and so everything before it, has been consumed.
                    assert!(h.hw.log_len() >= expect.len());
                }
            }
        }
        h.q.issue(&[], true).unwrap();
        expect.push(cmd_sync(SYNC_CS_NONE));
        assert_eq!(h.hw.log(), expect);
        let stats = h.q.stats();
        assert_eq!(stats.commands, seq);
        assert!(
            expect.len() > 100 * 16,
            "wrapped {} times",
            expect.len() / 16
        );
        assert!(
            stats.full_waits > 0,
            "the lagging consumer filled the queue"
        );
    }

    /// One sync's record: thread, its commands issued so far, every thread's commands issued
    /// before the sync started (as seen then), and how many entries the SMMU had consumed when
    /// the sync returned.
    struct SyncRecord {
        t: usize,
        own: u64,
        others: Vec<u64>,
        consumed: usize,
    }

    fn many_cpus(mode: Mode, threads: usize, batches: u64) {
        let h = harness(4, mode);
        let issued: Vec<AtomicU64> = (0..threads).map(|_| AtomicU64::new(0)).collect();
        let records = Mutex::new(Vec::new());
        let syncs = AtomicU64::new(0);
        thread::scope(|s| {
            for t in 0..threads {
                let (h, issued, records, syncs) = (&h, &issued, &records, &syncs);
                s.spawn(move || {
                    let mut seq = 0;
                    for i in 0..batches {
                        let k = (i * 7 + t as u64) % 5;
                        let sync = k == 0 || i % 3 == 0 || i + 1 == batches;
                        let cmds: Vec<_> = (seq..seq + k).map(|s| cmd(t, s)).collect();
                        // What every CPU has issued before this call starts.
                        let others: Vec<u64> = if sync {
                            issued.iter().map(|a| a.load(Ordering::Acquire)).collect()
                        } else {
                            Vec::new()
                        };
                        h.q.issue(&cmds, sync).unwrap();
                        seq += k;
                        issued[t].store(seq, Ordering::Release);
                        if sync {
                            syncs.fetch_add(1, Ordering::Relaxed);
                            let consumed = h.hw.log_len();
                            let r = SyncRecord {
                                t,
                                own: seq,
                                others,
                                consumed,
                            };
                            records.lock().unwrap().push(r);
                        }
                    }
                });
            }
        });
        h.q.issue(&[], true).unwrap();
        let log = h.hw.log();
        // Every command exactly once, each thread's in its own order.
        let mut pos: Vec<Vec<usize>> = vec![Vec::new(); threads];
        let mut sync_count = 0;
        for (i, c) in log.iter().enumerate() {
            match decode(*c) {
                Some((t, seq)) => {
                    assert_eq!(
                        seq,
                        pos[t].len() as u64,
                        "thread {t}: out of order or twice"
                    );
                    pos[t].push(i);
                }
                None => sync_count += 1,
            }
        }
        for (t, p) in pos.iter().enumerate() {
            assert_eq!(
                p.len() as u64,
                issued[t].load(Ordering::Relaxed),
                "thread {t}"
            );
        }
        assert_eq!(sync_count, syncs.load(Ordering::Relaxed) + 1);
        // Every sync returned only after its own commands, and every command issued anywhere
        // before it started, had been consumed.
        let records = records.into_inner().unwrap();
        for r in &records {
            if r.own > 0 {
                assert!(pos[r.t][r.own as usize - 1] < r.consumed, "thread {}", r.t);
            }
            for (u, &n) in r.others.iter().enumerate() {
                if n > 0 {
                    assert!(pos[u][n as usize - 1] < r.consumed, "{} missed {u}'s", r.t);
                }
            }
        }
        let stats = h.q.stats();
        assert_eq!(
            stats.commands,
            issued
                .iter()
                .map(|a| a.load(Ordering::Relaxed))
                .sum::<u64>()
        );
        assert_eq!(stats.batches, stats.owned);
        assert_eq!(stats.batches as usize, h.hw.prod_writes().len());
    }

    #[test]
    fn many_cpus_lagging_consumer() {
        many_cpus(Mode::Thread, 4, 2000);
    }

    #[test]
    fn many_cpus_inline_consumer() {
        many_cpus(Mode::Inline, 6, 2000);
    }

    #[test]
    fn stopped_consumer_times_out() {
        let h = harness_with(4, Mode::Inline, opts(1000));
        h.hw.limit.store(0, Ordering::Relaxed);
        assert_eq!(h.q.issue(&[cmd(0, 0)], true), Err(CmdqError::Timeout));
        // The queue is not broken: the sync was published, the SMMU just does not run.
        let fifteen: Vec<_> = (1..15).map(|i| cmd(0, i)).collect();
        h.q.issue(&fifteen, false).unwrap();
        // Full: 16 of 16 slots wait for the SMMU.
        assert_eq!(h.q.issue(&[cmd(0, 15)], false), Err(CmdqError::Timeout));
        assert_eq!(h.q.stats().full_waits, 1);
        // Once the SMMU runs again, so does the queue.
        h.hw.limit.store(usize::MAX, Ordering::Relaxed);
        h.q.issue(&[cmd(0, 15)], true).unwrap();
        assert_eq!(h.hw.log_len(), 18);
    }

    #[test]
    fn illegal_command_reports_error_and_recovers() {
        let h = harness(4, Mode::Inline);
        h.q.issue(&[cmd(0, 0)], true).unwrap();
        let bad = [BAD, 0];
        // Slots: 0 cmd, 1 sync, 2 cmd, 3 BAD, 4 cmd, 5 sync.
        assert_eq!(
            h.q.issue(&[cmd(0, 1), bad, cmd(0, 2)], true),
            Err(CmdqError::Command {
                code: CERROR_ILL,
                index: 3
            })
        );
        // The SMMU stays stopped: later syncs fail as well.
        assert!(matches!(
            h.q.issue(&[], true),
            Err(CmdqError::Command { index: 3, .. })
        ));
        // The GERROR handler: the illegal command becomes a CMD_SYNC, then the error is acked.
        assert_eq!(
            h.q.skip_failed_command(),
            Some(CmdqError::Command {
                code: CERROR_ILL,
                index: 3
            })
        );
        h.hw.ack();
        h.q.issue(&[cmd(0, 3)], true).unwrap();
        assert_eq!(h.q.skip_failed_command(), None);
        let sync = cmd_sync(SYNC_CS_NONE);
        assert_eq!(
            h.hw.log(),
            vec![
                cmd(0, 0),
                sync,
                cmd(0, 1),
                sync,
                cmd(0, 2),
                sync,
                sync,
                cmd(0, 3),
                sync
            ]
        );
    }

    /// The queue, seen as a count: slots reserved so far.
    fn reserved(q: &CmdQueue) -> u64 {
        q.prod.load(Ordering::SeqCst) & !OWNED
    }

    /// While one owner is slow to write PROD, the next owner gathers a third CPU's commands into
    /// its batch; that CPU returns without waiting for anyone.
    #[test]
    fn owner_gathers_other_cpus_commands() {
        let h = harness(4, Mode::Inline);
        h.hw.block.store(true, Ordering::SeqCst);
        thread::scope(|s| {
            let a = s.spawn(|| h.q.issue(&[cmd(0, 0)], false));
            until(|| h.hw.in_write.load(Ordering::SeqCst) == 1);
            let b = s.spawn(|| h.q.issue(&[cmd(1, 0)], true));
            until(|| reserved(&h.q) == 3);
            // Not an owner: returns at once, with nothing of it published yet.
            h.q.issue(&[cmd(2, 0)], false).unwrap();
            assert_eq!(h.hw.prod_writes(), Vec::<u32>::new());
            assert!(!b.is_finished());
            h.hw.block.store(false, Ordering::SeqCst);
            a.join().unwrap().unwrap();
            b.join().unwrap().unwrap();
        });
        // A's batch, then B's with C's command gathered behind B's sync.
        assert_eq!(h.hw.prod_writes(), vec![1, 4]);
        let sync = cmd_sync(SYNC_CS_NONE);
        assert_eq!(h.hw.log(), vec![cmd(0, 0), cmd(1, 0), sync, cmd(2, 0)]);
        let st = h.q.stats();
        assert_eq!((st.batches, st.owned, st.gathered), (2, 2, 1));
    }

    /// A CPU waiting for its sync holds nothing: others issue and publish meanwhile, and each
    /// waiter returns as soon as its own sync is done.
    #[test]
    fn sync_waiter_blocks_nobody_and_waits_only_for_its_own_sync() {
        let h = harness(4, Mode::Inline);
        // The SMMU executes A's command only.
        h.hw.limit.store(1, Ordering::SeqCst);
        thread::scope(|s| {
            let a = s.spawn(|| h.q.issue(&[cmd(0, 0)], true));
            until(|| h.hw.log_len() == 1 && h.q.owner_prod.load(Ordering::SeqCst) == 2);
            // A is waiting for its sync. Another CPU issues and publishes around it.
            h.q.issue(&[cmd(1, 0), cmd(1, 1)], false).unwrap();
            assert_eq!(h.hw.prod_writes(), vec![2, 4]);
            let c = s.spawn(|| h.q.issue(&[cmd(2, 0)], true));
            until(|| h.hw.prod_writes().len() == 3);
            // The SMMU gets as far as A's sync: A returns, C (later in the queue) still waits.
            h.hw.limit.store(2, Ordering::SeqCst);
            a.join().unwrap().unwrap();
            assert!(!c.is_finished());
            h.hw.limit.store(usize::MAX, Ordering::SeqCst);
            c.join().unwrap().unwrap();
        });
        assert_eq!(h.hw.log_len(), 6);
    }

    /// An owner whose predecessor never finishes gives up with Timeout and marks the queue
    /// broken: later calls fail at once instead of waiting for a batch that never comes.
    #[test]
    fn stalled_owner_breaks_the_queue() {
        let h = harness_with(4, Mode::Inline, opts(10_000));
        h.hw.block.store(true, Ordering::SeqCst);
        thread::scope(|s| {
            let a = s.spawn(|| h.q.issue(&[cmd(0, 0)], false));
            until(|| h.hw.in_write.load(Ordering::SeqCst) == 1);
            assert_eq!(h.q.issue(&[cmd(1, 0)], false), Err(CmdqError::Timeout));
            assert_eq!(h.q.issue(&[cmd(1, 1)], true), Err(CmdqError::Broken));
            h.hw.block.store(false, Ordering::SeqCst);
            a.join().unwrap().unwrap();
        });
        assert_eq!(h.q.stats().owned, 2);
        assert_eq!(h.q.stats().batches, 1);
    }

    static CLEANED: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

    fn record_clean(p: *const u8, len: usize) {
        CLEANED.lock().unwrap().push((p as usize, len));
    }

    #[test]
    fn non_coherent_queue_cleans_every_written_slot() {
        let mut o = opts(1 << 30);
        o.clean = Some(record_clean);
        let h = harness_with(2, Mode::Inline, o);
        let base = h._mem.as_ptr() as usize;
        h.q.issue(&[cmd(0, 0), cmd(0, 1)], true).unwrap();
        // Slots 3, 0, 1: wraps.
        h.q.issue(&[cmd(0, 2), cmd(0, 3)], true).unwrap();
        assert_eq!(
            *CLEANED.lock().unwrap(),
            vec![(base, 48), (base + 48, 16), (base, 32)]
        );
    }

    /// The stage-2 TLB backend on the real queue.
    #[test]
    fn smmuv3_tlb_backend_through_the_queue() {
        let h = harness(4, Mode::Thread);
        let tlb = SmmuV3Tlb::new(h.q.clone(), 3, true, false);
        tlb.invalidate(&Invalidation {
            vmid: 3,
            range: Some((0x8000_0000, 0x8000_3000)),
            leaf_only: true,
            level: 3,
        });
        tlb.sync(3).unwrap();
        assert_eq!(
            h.hw.log(),
            vec![
                tlbi_s2_ipa(3, 0x8000_0000, true, 3, Some((2, 0))),
                cmd_sync(SYNC_CS_NONE)
            ]
        );
    }

    /// What the driver's resume does to the model SMMU after a power loss: CMDQ_PROD and
    /// CMDQ_CONS written with `pos` (CONS.ERR cleared).
    fn reprogram(hw: &ModelHw, pos: u32) {
        let mut st = hw.st.lock().unwrap();
        st.cons = pos;
        st.err = 0;
        hw.cons.store(pos, Ordering::Release);
        hw.prod.store(pos, Ordering::Release);
    }

    /// After a power loss the counts go on: the next command takes the next slot, nothing runs
    /// twice, and commands the SMMU never consumed are dropped.
    #[test]
    fn resync_continues_where_the_queue_stopped() {
        let h = harness(2, Mode::Inline); // 4 entries
        h.q.issue(&[cmd(0, 0), cmd(0, 1)], true).unwrap();
        // SAFETY: nothing issues; the model is "off" until `reprogram`.
        assert_eq!(unsafe { h.q.resync() }, Ok(3));
        reprogram(&h.hw, 0); // registers lost...
        reprogram(&h.hw, 3); // ...and programmed again
        h.q.issue(&[cmd(0, 2)], true).unwrap();
        // Slots 3 and 4 (index 0, wrap bit set: 5).
        assert_eq!(h.hw.prod_writes(), vec![3, 5]);
        // The SMMU stops (as if the power went while it had work): the command is published,
        // never consumed.
        h.hw.limit.store(h.hw.log_len(), Ordering::SeqCst);
        h.q.issue(&[cmd(0, 3)], false).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { h.q.resync() }, Ok(6));
        reprogram(&h.hw, 6);
        h.hw.limit.store(usize::MAX, Ordering::SeqCst);
        // Many more laps, from the new position; the syncs see the right CONS.
        for i in 4..40 {
            h.q.issue(&[cmd(0, i)], i % 2 == 0).unwrap();
        }
        h.q.issue(&[], true).unwrap();
        let sync = cmd_sync(SYNC_CS_NONE);
        let log = h.hw.log();
        assert_eq!(
            log[..6],
            [cmd(0, 0), cmd(0, 1), sync, cmd(0, 2), sync, cmd(0, 4)]
        );
        assert!(!log.contains(&cmd(0, 3)), "dropped, not executed late");
        assert_eq!(log.iter().filter(|c| decode(**c).is_some()).count(), 39);
        let st = h.q.stats();
        assert_eq!(st.batches, st.owned);
    }

    /// `resync` refuses a queue in the middle of an issue, or a broken one, and changes nothing.
    #[test]
    fn resync_needs_an_idle_queue() {
        let h = harness_with(4, Mode::Inline, opts(10_000));
        h.q.issue(&[cmd(0, 0)], true).unwrap();
        h.hw.block.store(true, Ordering::SeqCst);
        thread::scope(|s| {
            let a = s.spawn(|| h.q.issue(&[cmd(0, 1)], false));
            until(|| h.hw.in_write.load(Ordering::SeqCst) == 1);
            // SAFETY: the queue refuses (the owner has not finished publishing); nothing is
            // changed.
            assert_eq!(unsafe { h.q.resync() }, Err(CmdqError::Busy));
            h.hw.block.store(false, Ordering::SeqCst);
            a.join().unwrap().unwrap();
        });
        // SAFETY: idle now; the model keeps its registers, which already say 3.
        assert_eq!(unsafe { h.q.resync() }, Ok(3));
        h.q.issue(&[], true).unwrap();
        assert_eq!(h.hw.log_len(), 4);
        // A broken queue stays broken.
        h.hw.block.store(true, Ordering::SeqCst);
        thread::scope(|s| {
            let a = s.spawn(|| h.q.issue(&[cmd(0, 2)], false));
            until(|| h.hw.in_write.load(Ordering::SeqCst) == 1);
            assert_eq!(h.q.issue(&[cmd(1, 0)], false), Err(CmdqError::Timeout));
            h.hw.block.store(false, Ordering::SeqCst);
            a.join().unwrap().unwrap();
        });
        // SAFETY: refused.
        assert_eq!(unsafe { h.q.resync() }, Err(CmdqError::Broken));
        assert_eq!(
            CmdqError::Busy.to_string(),
            "command queue busy (commands being issued)"
        );
    }

    #[test]
    fn errors_display() {
        let e = CmdqError::Command { code: 1, index: 7 };
        assert_eq!(
            e.to_string(),
            "SMMU stopped at queue index 7: illegal command (CONS.ERR 1)"
        );
        assert_eq!(tlb_error(CmdqError::Timeout).agent, "smmuv3-cmdq");
    }
}

/// Loom models of the queue (`RUSTFLAGS="--cfg loom" cargo test -p hyp --release --lib loom`):
/// a 4-entry queue, two CPUs. The model SMMU reads the queue through loom-checked cells, so
/// publishing a slot before it is written, or writing a slot the SMMU has not consumed yet, is a
/// race that fails the model.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::mm::stage2::backend::smmuv3::{OP_SYNC, tlbi_s2_ipa};
    use loom::cell::UnsafeCell;
    use loom::sync::Mutex;
    use loom::sync::atomic::AtomicU32;
    use loom::thread;
    use std::sync::{OnceLock, Weak};
    use std::vec::Vec;

    const LOG2SIZE: u32 = 2;
    const WRAP: u32 = (2 << LOG2SIZE) - 1;

    fn cmd(t: usize, seq: u64) -> [u64; 2] {
        tlbi_s2_ipa(t as u16 + 1, seq << 12, false, 0, None)
    }

    fn is_sync(c: &[u64; 2]) -> bool {
        c[0] & 0xff == u64::from(OP_SYNC)
    }

    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(2);
        builder.check(f);
    }

    fn opts() -> CmdqOptions {
        CmdqOptions {
            max_spins: u64::MAX,
            relax: || {},
            clean: None,
        }
    }

    struct State {
        cons: u32,
        log: Vec<[u64; 2]>,
    }

    /// A model SMMU. Inline: consumes everything up to PROD inside `write_prod`, keeping its
    /// state in a loom cell, so two overlapping PROD writes are a race. Lazy: consumes one entry
    /// per CONS read, so waiters see it lag behind PROD.
    struct Smmu {
        queue: OnceLock<Weak<CmdQueue>>,
        lazy: bool,
        prod: AtomicU32,
        cons: AtomicU32,
        inline_state: UnsafeCell<State>,
        lazy_state: Mutex<State>,
    }

    // SAFETY: `inline_state` is only touched inside `write_prod`, which owners call one at a
    // time (loom checks exactly that), and after every thread was joined.
    unsafe impl Sync for Smmu {}

    impl Smmu {
        fn new(lazy: bool) -> Self {
            let st = || State {
                cons: 0,
                log: Vec::new(),
            };
            Smmu {
                queue: OnceLock::new(),
                lazy,
                prod: AtomicU32::new(0),
                cons: AtomicU32::new(0),
                inline_state: UnsafeCell::new(st()),
                lazy_state: Mutex::new(st()),
            }
        }

        fn consume(&self, st: &mut State, max: usize) {
            let prod = self.prod.load(Ordering::Acquire);
            if st.cons == prod {
                return;
            }
            let q = self.queue.get().unwrap().upgrade().unwrap();
            let mut n = 0;
            while st.cons != prod && n < max {
                st.log
                    .push(q.loom_read((st.cons & ((1 << LOG2SIZE) - 1)) as usize));
                st.cons = (st.cons + 1) & WRAP;
                self.cons.store(st.cons, Ordering::Release);
                n += 1;
            }
        }

        fn log(&self) -> Vec<[u64; 2]> {
            if self.lazy {
                self.lazy_state.lock().unwrap().log.clone()
            } else {
                // SAFETY: called after every CPU finished (joined).
                self.inline_state.with(|s| unsafe { (*s).log.clone() })
            }
        }
    }

    impl QueueHw for Smmu {
        fn write_prod(&self, prod: u32) {
            self.prod.store(prod, Ordering::Release);
            if !self.lazy {
                // SAFETY: loom checks that owners never write PROD concurrently.
                self.inline_state
                    .with_mut(|s| self.consume(unsafe { &mut *s }, usize::MAX));
            }
        }

        fn read_cons(&self) -> u32 {
            if self.lazy {
                self.consume(&mut self.lazy_state.lock().unwrap(), 1);
            }
            self.cons.load(Ordering::Acquire)
        }
    }

    fn setup(lazy: bool) -> (std::sync::Arc<Smmu>, std::sync::Arc<CmdQueue>) {
        let mem = Box::leak(vec![[0u64; 2]; 1 << LOG2SIZE].into_boxed_slice());
        let smmu = std::sync::Arc::new(Smmu::new(lazy));
        // SAFETY: `mem` is leaked (lives forever) and used by this queue alone.
        let q = unsafe { CmdQueue::new(mem.as_mut_ptr(), LOG2SIZE, smmu.clone(), opts()) };
        let q = std::sync::Arc::new(q);
        smmu.queue.set(std::sync::Arc::downgrade(&q)).ok().unwrap();
        (smmu, q)
    }

    /// The SMMU's progress (entries consumed, < 8 here so the raw CONS is the count).
    fn consumed(smmu: &Smmu) -> usize {
        smmu.cons.load(Ordering::Acquire) as usize
    }

    /// Reservation and publication: two CPUs issue 6 slots through 4 entries (wrapping, maybe
    /// waiting for space). Every command is executed once, each CPU's in order; each sync returns
    /// after its CPU's commands; PROD writes never overlap and never cover an unwritten slot.
    #[test]
    fn loom_cmdq_reserve_and_publish() {
        model(|| {
            let (smmu, q) = setup(false);
            let (smmu2, q2) = (smmu.clone(), q.clone());
            let t = thread::spawn(move || {
                q2.issue(&[cmd(1, 0), cmd(1, 1)], true).unwrap();
                consumed(&smmu2)
            });
            q.issue(&[cmd(0, 0)], false).unwrap();
            q.issue(&[cmd(0, 1)], true).unwrap();
            let mine = consumed(&smmu);
            let theirs = t.join().unwrap();
            let log = smmu.log();
            assert_eq!(log.len(), 6, "{log:x?}");
            let at = |c| log.iter().position(|x| *x == c).unwrap();
            // A CPU's sync directly follows its last command.
            assert!(at(cmd(0, 0)) < at(cmd(0, 1)) && at(cmd(0, 1)) + 1 < mine);
            assert!(at(cmd(1, 0)) < at(cmd(1, 1)) && at(cmd(1, 1)) + 1 < theirs);
            assert_eq!(log.iter().filter(|c| is_sync(c)).count(), 2);
            assert_eq!(q.stats().commands, 4);
        });
    }

    /// Sync waiting with an SMMU that lags behind PROD: each sync waits until the SMMU passed
    /// it, and covers a command another CPU issued before the sync started.
    #[test]
    fn loom_cmdq_sync_waits_for_lagging_smmu() {
        model(|| {
            let (smmu, q) = setup(true);
            let flag = std::sync::Arc::new(loom::sync::atomic::AtomicBool::new(false));
            let (smmu2, q2, flag2) = (smmu.clone(), q.clone(), flag.clone());
            let t = thread::spawn(move || {
                let saw = flag2.load(Ordering::Acquire);
                q2.issue(&[cmd(1, 0)], true).unwrap();
                (saw, consumed(&smmu2))
            });
            q.issue(&[cmd(0, 0)], false).unwrap();
            flag.store(true, Ordering::Release);
            q.issue(&[cmd(0, 1)], true).unwrap();
            let mine = consumed(&smmu);
            let (saw, theirs) = t.join().unwrap();
            let log = smmu.log();
            let at = |c| log.iter().position(|x| *x == c);
            // Each sync (right after its CPU's last command) was consumed.
            assert!(at(cmd(0, 1)).unwrap() + 1 < mine);
            assert!(at(cmd(1, 0)).unwrap() + 1 < theirs);
            if saw {
                assert!(
                    at(cmd(0, 0)).unwrap() < theirs,
                    "sync missed an earlier command"
                );
            }
        });
    }
}
