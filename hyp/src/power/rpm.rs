//! Runtime power management for one SMMU (or TBU) power domain, without a lock on the fast path.
//!
//! # The state word
//!
//! Everything the fast path needs is one `AtomicU64` per domain:
//!
//! | bits  | field |
//! |-------|-------|
//! | 0–31  | usage count (references from [`Domain::get`] and [`TlbGuard`]s) |
//! | 32–33 | state: [`State::Active`], [`State::Suspending`], [`State::Suspended`], [`State::Resuming`] |
//! | 34    | slow-path lock: held by whoever is powering the domain on or off |
//! | 35–63 | power epoch: incremented each time the domain is powered off (wrapping) |
//!
//! - [`Domain::get`] on an active domain is one `fetch_add` of the count. The count is raised
//!   whatever the state is; only when the returned word says the domain was not active does the
//!   caller go to the slow path (below), still holding its count, which stops any new suspend.
//! - [`Domain::put`] is one `fetch_sub`. The CPU whose put takes the count to 0 also stores the
//!   time into `last_idle`, which lives in the same cache line as the word (the struct is 64-byte
//!   aligned and the word and `last_idle` are its first two fields), so a put touches no line but
//!   the one its `fetch_sub` already owns. Puts that leave the count above 0 write nothing else.
//! - The statistics are written only on the slow path (under the domain's lock bit) or when a
//!   TLB invalidation is skipped (the domain is off, so nothing is hot); they sit on their own
//!   cache line, away from the word.
//!
//! # The slow path
//!
//! Powering on or off is serialised **per domain** by the lock bit in the word, never by anything
//! global: two domains power up in parallel. The states `Suspending` and `Resuming` exist only
//! while the bit is held. The bit is taken by a CAS, so it coexists with the fast path: a `get`
//! or `put` may change the count while a CPU holds the bit.
//!
//! - Suspend ([`Domain::poll`], [`Domain::suspend`]): one CAS from *count 0, Active, unlocked* to
//!   *count 0, Suspending, locked*. If any reference exists, or appears first, the CAS fails and the
//!   domain stays on. Then [`PowerOps::power_off`], then *Suspended*, epoch + 1, unlocked.
//! - Resume (a `get` that found the domain not active): take the lock bit (spinning while another
//!   CPU holds it — that CPU is powering this very domain, so there is nothing else to do); if the
//!   domain is now Active, someone else resumed it; otherwise *Resuming*, [`PowerOps::power_on`],
//!   *Active*, unlock. If `power_on` fails the domain goes back to *Suspended*, the caller's count
//!   is dropped and the error returned from `get`.
//!
//! A failed `power_off` still leaves the domain *Suspended*: the SMMU is in an unknown, possibly
//! half-quiesced state and the only way back is `power_on`, which re-programs it from the shadow
//! and starts with empty TLBs. That keeps the TLB argument below true on the error path too.
//!
//! # TLB maintenance while off
//!
//! Map and unmap never power the SMMU up: they call [`Domain::tlb_begin`], not [`Domain::get`].
//! It is a `fetch_add` of the count like `get`, but when the domain turns out not to be Active it
//! gives the count back, counts a skipped TLBI and returns `None`. Why skipping is safe:
//!
//! - The table change the invalidation is for is sequenced before the `fetch_add`, which is a
//!   release read-modify-write on the state word. Every write to the word is a read-modify-write,
//!   so every later RMW on the word reads from a release sequence that contains it.
//! - If the `fetch_add` saw *Active*, the count it added pins the domain: the suspend CAS needs
//!   count 0, so the SMMU stays powered until the [`TlbGuard`] is dropped, and the invalidation
//!   reaches a powered SMMU.
//! - If it saw *Resuming*, `power_on` may already have walked the old table, so skipping would be
//!   wrong: `tlb_begin` waits (holding its count, which a resume never waits for) until the
//!   resume ends, then proceeds as if it had seen the outcome — *Active* (pinned, as above) or
//!   *Suspended* (`power_on` failed). This is the only wait in `tlb_begin`, and only while the
//!   same domain is powering up on another CPU.
//! - If it saw *Suspending* or *Suspended*, a suspend has already taken the lock or finished, so
//!   the SMMU is off or about to be; it can only come back through a later resume, whose lock CAS
//!   (acquire) comes after our `fetch_add` in the word's modification order and so synchronises
//!   with it: the table change happens-before `power_on`, which starts with empty TLBs and walks
//!   the changed tables. The invalidation is unnecessary.
//!
//! The `loom_invalidate_vs_suspend` model checks exactly this (a model SMMU whose TLB is filled
//! from the table at power-on), and the guard carries the epoch it was taken in.
//!
//! # Autosuspend
//!
//! [`Domain::poll`] (from the EL2 timer tick) suspends a domain whose count is 0 and whose last
//! idle time is older than the delay; [`Domain::next_deadline`] says when to arm the timer. A put
//! that takes the count to 0 stores its time just *after* its `fetch_sub`, so a poll in that gap
//! may see an older time and suspend a little early; that costs a power cycle, never correctness
//! (the suspend CAS still needs count 0).

#[cfg(not(loom))]
use core::sync::atomic::{AtomicU64, Ordering};
#[cfg(loom)]
use loom::sync::atomic::{AtomicU64, Ordering};

use super::PowerError;

/// The autosuspend delay Linux uses for the Adreno SMMU (and the default here), in milliseconds.
pub const DEFAULT_AUTOSUSPEND_MS: u64 = 20;

/// The autosuspend delay of `ms` milliseconds in ticks of a counter running at `freq_hz`
/// (CNTFRQ_EL0 for the EL2 timer).
pub const fn ms_to_ticks(ms: u64, freq_hz: u64) -> u64 {
    ((ms as u128 * freq_hz as u128) / 1000) as u64
}

const COUNT_MASK: u64 = 0xffff_ffff;
const ONE: u64 = 1;
const STATE_SHIFT: u32 = 32;
const STATE_MASK: u64 = 0b11 << STATE_SHIFT;
const LOCK: u64 = 1 << 34;
const EPOCH_SHIFT: u32 = 35;
const EPOCH_ONE: u64 = 1 << EPOCH_SHIFT;

/// The power state of a domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Powered and programmed; `get` succeeds with one atomic.
    Active,
    /// Being powered off (only while the domain's lock bit is held).
    Suspending,
    /// Off. TLB invalidations are skipped; `get` powers it on.
    Suspended,
    /// Being powered on (only while the domain's lock bit is held).
    Resuming,
}

impl State {
    const fn bits(self) -> u64 {
        (match self {
            State::Active => 0,
            State::Suspending => 1,
            State::Suspended => 2,
            State::Resuming => 3,
        }) << STATE_SHIFT
    }

    const fn of(word: u64) -> State {
        match (word & STATE_MASK) >> STATE_SHIFT {
            0 => State::Active,
            1 => State::Suspending,
            2 => State::Suspended,
            _ => State::Resuming,
        }
    }
}

const fn count_of(word: u64) -> u32 {
    (word & COUNT_MASK) as u32
}

const fn epoch_of(word: u64) -> u32 {
    (word >> EPOCH_SHIFT) as u32
}

/// What powering one domain on and off means; supplied by the caller (the GDSC, its clocks and the
/// SMMU driver's save/restore).
pub trait PowerOps {
    /// GDSC on, clocks on, SMMU re-programmed from the shadow (its TLBs start empty). Called with
    /// the domain's slow-path lock held, never concurrently with itself or `power_off` for the
    /// same domain.
    fn power_on(&self) -> Result<(), PowerError>;
    /// Quiesce the SMMU, clocks off, GDSC off. Called with the domain's slow-path lock held and
    /// its usage count 0.
    fn power_off(&self) -> Result<(), PowerError>;
    /// The current time in timer ticks (CNTPCT_EL0 on the target). Read only on the slow path and
    /// by the put that takes the count to 0.
    fn now(&self) -> u64;
}

/// A snapshot of a domain's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Successful power-ups.
    pub power_ups: u64,
    /// Power-downs (including failed `power_off` calls, after which the domain counts as off).
    pub power_downs: u64,
    /// Failed `power_on` calls.
    pub power_on_errors: u64,
    /// Failed `power_off` calls.
    pub power_off_errors: u64,
    /// Sum of the completed off intervals, in ticks (the current one, if off, is not included).
    pub off_ticks: u64,
    /// TLB invalidations skipped because the domain was not active.
    pub tlbi_skipped: u64,
    /// Duration of the last `power_on`, in ticks.
    pub resume_last: u64,
    /// Longest `power_on`, in ticks.
    pub resume_max: u64,
    /// Sum of the successful `power_on` durations, in ticks (mean = this / `power_ups`).
    pub resume_total: u64,
}

/// Counters written on the slow path only (or when a TLBI is skipped), on their own cache line.
#[repr(align(64))]
struct Counters {
    power_ups: AtomicU64,
    power_downs: AtomicU64,
    power_on_errors: AtomicU64,
    power_off_errors: AtomicU64,
    off_ticks: AtomicU64,
    off_since: AtomicU64,
    tlbi_skipped: AtomicU64,
    resume_last: AtomicU64,
    resume_max: AtomicU64,
    resume_total: AtomicU64,
}

impl Counters {
    fn new(now: u64) -> Self {
        Counters {
            power_ups: AtomicU64::new(0),
            power_downs: AtomicU64::new(0),
            power_on_errors: AtomicU64::new(0),
            power_off_errors: AtomicU64::new(0),
            off_ticks: AtomicU64::new(0),
            off_since: AtomicU64::new(now),
            tlbi_skipped: AtomicU64::new(0),
            resume_last: AtomicU64::new(0),
            resume_max: AtomicU64::new(0),
            resume_total: AtomicU64::new(0),
        }
    }

    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// One runtime-PM domain: an SMMU or TBU behind one GDSC.
#[repr(C, align(64))]
pub struct Domain<P: PowerOps> {
    /// Count, state, lock bit and epoch (module docs).
    word: AtomicU64,
    /// When the count last went to 0 (ticks); same cache line as `word`.
    last_idle: AtomicU64,
    /// Autosuspend delay in ticks.
    delay: u64,
    counters: Counters,
    ops: P,
}

/// A usage reference from [`Domain::get`]: the domain stays powered until it is dropped (which is
/// [`Domain::put`]).
#[must_use = "dropping the reference releases the domain at once"]
pub struct PowerRef<'a, P: PowerOps> {
    domain: &'a Domain<P>,
}

impl<P: PowerOps> Drop for PowerRef<'_, P> {
    fn drop(&mut self) {
        self.domain.put();
    }
}

/// A pin taken by [`Domain::tlb_begin`]: the domain was active and stays powered until this is
/// dropped, so an invalidation issued meanwhile reaches a powered SMMU.
#[must_use = "the invalidation must be issued while the guard is held"]
pub struct TlbGuard<'a, P: PowerOps> {
    domain: &'a Domain<P>,
    epoch: u32,
}

impl<P: PowerOps> TlbGuard<'_, P> {
    /// The power epoch the guard was taken in (constant while it is held).
    pub fn epoch(&self) -> u32 {
        self.epoch
    }
}

impl<P: PowerOps> Drop for TlbGuard<'_, P> {
    fn drop(&mut self) {
        self.domain.put();
    }
}

impl<P: PowerOps> Domain<P> {
    /// A domain with autosuspend delay `delay_ticks`, powered (`Active`, count 0, idle since now)
    /// or not (`Suspended`) as the hardware is at this point.
    pub fn new(ops: P, delay_ticks: u64, powered: bool) -> Self {
        let now = ops.now();
        let state = if powered {
            State::Active
        } else {
            State::Suspended
        };
        Domain {
            word: AtomicU64::new(state.bits()),
            last_idle: AtomicU64::new(now),
            delay: delay_ticks,
            counters: Counters::new(now),
            ops,
        }
    }

    /// The power operations this domain was built with.
    pub fn ops(&self) -> &P {
        &self.ops
    }

    /// The current state (a snapshot).
    pub fn state(&self) -> State {
        State::of(self.word.load(Ordering::Acquire))
    }

    /// The current usage count (a snapshot).
    pub fn usage(&self) -> u32 {
        count_of(self.word.load(Ordering::Relaxed))
    }

    /// The power epoch: how many times the domain has been powered off (wrapping at 2^29).
    pub fn epoch(&self) -> u32 {
        epoch_of(self.word.load(Ordering::Acquire))
    }

    /// Takes a usage reference, powering the domain on if it is not active. On an active domain
    /// this is one `fetch_add`. A `power_on` error leaves the domain suspended and is returned.
    pub fn get(&self) -> Result<PowerRef<'_, P>, PowerError> {
        // Acquire: the caller sees the SMMU state the resumer published with its release.
        let old = self.word.fetch_add(ONE, Ordering::Acquire);
        debug_assert!(count_of(old) < u32::MAX, "usage count overflow");
        if State::of(old) != State::Active {
            self.resume_slow()?;
        }
        Ok(PowerRef { domain: self })
    }

    /// Takes a usage reference that is not tied to a borrow (an active master's, held across
    /// traps), powering the domain on if needed; give it back with [`Domain::release`]. Prefer
    /// [`Domain::get`] wherever the reference can live in a scope.
    pub fn acquire(&self) -> Result<(), PowerError> {
        core::mem::forget(self.get()?);
        Ok(())
    }

    /// Gives back a reference taken with [`Domain::acquire`]. Each `release` must pair with one
    /// successful `acquire`: an unpaired one would steal another holder's reference.
    pub fn release(&self) {
        self.put();
    }

    /// Pins the domain if it is active, without ever powering it up and without counting
    /// anything: for work that only makes sense on a powered SMMU (draining its event queue,
    /// a command sync) and has nothing to catch up on later. Waits while the domain is resuming,
    /// like [`Domain::tlb_begin`], so that `None` means the domain was off (or going off) at a
    /// point ordered after the caller's earlier writes — a later resume sees them.
    pub fn get_if_active(&self) -> Option<PowerRef<'_, P>> {
        let mut w = self.word.fetch_add(ONE, Ordering::AcqRel);
        while State::of(w) == State::Resuming {
            spin_loop();
            w = self.word.load(Ordering::Acquire);
        }
        if State::of(w) == State::Active {
            return Some(PowerRef { domain: self });
        }
        self.word.fetch_sub(ONE, Ordering::Release);
        None
    }

    /// Gives a reference back (what dropping a [`PowerRef`] does). One `fetch_sub`; the put that
    /// takes the count to 0 also records the time for autosuspend.
    fn put(&self) {
        // Release: the caller's use of the SMMU happens-before a suspend that sees count 0.
        let old = self.word.fetch_sub(ONE, Ordering::Release);
        debug_assert!(count_of(old) > 0, "put without get");
        if count_of(old) == 1 {
            self.last_idle.store(self.ops.now(), Ordering::Relaxed);
        }
    }

    /// Pins the domain for a TLB invalidation if it is active; otherwise counts a skipped TLBI and
    /// returns `None` (the SMMU is off or going off, and will start with empty TLBs and re-walk the
    /// tables changed before this call). Never powers the domain up.
    pub fn tlb_begin(&self) -> Option<TlbGuard<'_, P>> {
        // AcqRel: release orders the caller's table change before any later resume's lock CAS;
        // acquire pairs with the resumer's release of Active (module docs).
        let mut w = self.word.fetch_add(ONE, Ordering::AcqRel);
        // A resume in progress may already have walked the old table: wait for it to finish
        // (holding our count, which a resume does not wait for), then decide.
        while State::of(w) == State::Resuming {
            spin_loop();
            w = self.word.load(Ordering::Acquire);
        }
        if State::of(w) == State::Active {
            return Some(TlbGuard {
                domain: self,
                epoch: epoch_of(w),
            });
        }
        // Not active: give the count back without touching the idle time.
        self.word.fetch_sub(ONE, Ordering::Release);
        Counters::bump(&self.counters.tlbi_skipped);
        None
    }

    /// Spins until this CPU holds the domain's lock bit; returns the word as locked.
    fn lock(&self) -> u64 {
        let mut w = self.word.load(Ordering::Relaxed);
        loop {
            if w & LOCK != 0 {
                spin_loop();
                w = self.word.load(Ordering::Relaxed);
                continue;
            }
            match self
                .word
                .compare_exchange_weak(w, w | LOCK, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return w | LOCK,
                Err(cur) => w = cur,
            }
        }
    }

    /// With the lock held: sets the state (and adds `epoch_add` to the epoch), keeping the lock
    /// bit if `keep_lock`. Count changes by the fast path are preserved.
    fn set_locked(&self, state: State, epoch_add: u64, keep_lock: bool) {
        let mut w = self.word.load(Ordering::Relaxed);
        loop {
            debug_assert!(w & LOCK != 0);
            let mut new = (w & !STATE_MASK).wrapping_add(epoch_add) | state.bits();
            if !keep_lock {
                new &= !LOCK;
            }
            match self
                .word
                .compare_exchange_weak(w, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(cur) => w = cur,
            }
        }
    }

    /// The slow path of `get`: the caller holds a count and saw the domain not active.
    #[cold]
    fn resume_slow(&self) -> Result<(), PowerError> {
        let w = self.lock();
        match State::of(w) {
            State::Active => {
                // Someone else resumed it (or a suspend failed to start) meanwhile.
                self.set_locked(State::Active, 0, false);
                Ok(())
            }
            State::Suspended => {
                self.set_locked(State::Resuming, 0, true);
                let t0 = self.ops.now();
                match self.ops.power_on() {
                    Ok(()) => {
                        let t1 = self.ops.now();
                        let c = &self.counters;
                        let cost = t1.wrapping_sub(t0);
                        c.resume_last.store(cost, Ordering::Relaxed);
                        c.resume_max.fetch_max(cost, Ordering::Relaxed);
                        c.resume_total.fetch_add(cost, Ordering::Relaxed);
                        let off = t0.wrapping_sub(c.off_since.load(Ordering::Relaxed));
                        c.off_ticks.fetch_add(off, Ordering::Relaxed);
                        Counters::bump(&c.power_ups);
                        self.set_locked(State::Active, 0, false);
                        Ok(())
                    }
                    Err(e) => {
                        Counters::bump(&self.counters.power_on_errors);
                        self.set_locked(State::Suspended, 0, false);
                        self.word.fetch_sub(ONE, Ordering::Release);
                        Err(e)
                    }
                }
            }
            // These two exist only while the lock bit is held, and we hold it.
            State::Suspending | State::Resuming => unreachable!("transient state without lock"),
        }
    }

    /// Suspends the domain now if it is active, unlocked and unused. Returns whether it did
    /// (a failed `power_off` still counts: the domain is off).
    pub fn suspend(&self) -> bool {
        // Keep the epoch as it is: compare against the current epoch with count 0, Active,
        // unlocked.
        let w = self.word.load(Ordering::Relaxed);
        let expect = (w & !(COUNT_MASK | STATE_MASK | LOCK)) | State::Active.bits();
        if self
            .word
            .compare_exchange(
                expect,
                expect | State::Suspending.bits() | LOCK,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return false;
        }
        let result = self.ops.power_off();
        let now = self.ops.now();
        let c = &self.counters;
        if result.is_err() {
            Counters::bump(&c.power_off_errors);
        }
        c.off_since.store(now, Ordering::Relaxed);
        Counters::bump(&c.power_downs);
        self.set_locked(State::Suspended, EPOCH_ONE, false);
        true
    }

    /// The EL2 timer tick: suspends the domain if it is unused and has been idle for the delay.
    /// Returns whether it suspended it.
    pub fn poll(&self, now: u64) -> bool {
        match self.next_deadline() {
            Some(d) if now >= d => self.suspend(),
            _ => false,
        }
    }

    /// When the domain will be due for autosuspend, if it is active and unused.
    pub fn next_deadline(&self) -> Option<u64> {
        let w = self.word.load(Ordering::Acquire);
        if State::of(w) != State::Active || count_of(w) != 0 || w & LOCK != 0 {
            return None;
        }
        Some(
            self.last_idle
                .load(Ordering::Relaxed)
                .saturating_add(self.delay),
        )
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            power_ups: r(&c.power_ups),
            power_downs: r(&c.power_downs),
            power_on_errors: r(&c.power_on_errors),
            power_off_errors: r(&c.power_off_errors),
            off_ticks: r(&c.off_ticks),
            tlbi_skipped: r(&c.tlbi_skipped),
            resume_last: r(&c.resume_last),
            resume_max: r(&c.resume_max),
            resume_total: r(&c.resume_total),
        }
    }
}

/// Busy-wait hint; yields under loom so a spinning thread lets the lock holder run.
#[inline]
fn spin_loop() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    core::hint::spin_loop();
}

#[cfg(test)]
#[path = "rpm_tests.rs"]
mod tests;
