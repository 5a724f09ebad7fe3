//! `smmu-irq`: the SMMU's wired interrupts reach this vCPU through the GIC. Under the
//! hypervisor these are the emulated SMMU's interrupts, raised as virtual SPIs of the VM's
//! vGIC at the INTIDs the guest DT's SMMU node names; on bare QEMU, QEMU's SMMUv3 and GICv3.
//!
//! Where it runs: after the hostile checks (`hostile.rs`, which end with `dma-after-hostile`),
//! so the edu's stream has its good stage-1 STE again, the command queue is empty with no error
//! active, and every earlier event was drained; after `gic-hostile` (`gic_hostile.rs`), which
//! hammered every GIC register and left the SMMU's SPIs disabled, idle and routed to this vCPU
//! (so this check also shows the hypervisor's physical event-queue interrupt survived that);
//! before `smmu-power-cycle`, which, like every check before this one, polls with the SMMU's
//! interrupts off. This check leaves them off again whatever happened.
//!
//! 1. The GIC (`gic.rs`): distributor, this vCPU's redistributor, CPU interface; the SMMU
//!    node's `eventq`, `gerror` and (where `interrupt-names` has it) `cmdq-sync` SPIs enabled,
//!    Group 1, routed to this vCPU (the DMA checks run on vCPU 0). PSTATE.I stays masked: the
//!    check polls ICC_IAR1_EL1 and ends each interrupt with ICC_EOIR1_EL1. Then
//!    SMMU_IRQ_CTRL = EVENTQ_IRQEN | GERROR_IRQEN; nothing may be pending yet (50 ms).
//! 2. eventq: as in `dma-unmap`, the destination IOVA's PTE is cleared, `CMD_TLBI_NH_VA` +
//!    `CMD_SYNC`, and the edu writes there. The eventq INTID must then come to ICC_IAR1_EL1
//!    within 2 s, and only after it is EOIed is the event queue read: it must hold
//!    `F_TRANSLATION`s for the edu's StreamID at that IOVA and nothing else. EVENTQ_PROD is not
//!    touched while waiting: a hypervisor that routes physical events into the guest's queue
//!    when the guest reads that register would otherwise pass without any interrupt path.
//!    Further eventq interrupts within 100 ms are allowed (an edge per batch of events); the
//!    queue is drained once more after them. The IOVA is mapped again.
//! 3. gerror: a valid command, an unknown opcode (0xff) and a `CMD_SYNC`, as in
//!    `smmu-garbage-cmdq`: the queue stops with GERROR.CMDQ_ERR toggled, and the gerror INTID
//!    must come within 2 s; then the error is recovered from as there and the queue works.
//! 4. cmdq-sync (only where the DT names it): a `CMD_SYNC` with CS = SIG_IRQ completes and the
//!    cmdq-sync INTID comes within 2 s.
//!
//! Any INTID other than the one waited for (the eventq one after a `CMD_SYNC`, the cmdq-sync one
//! after a plain `CMD_SYNC`, an SPI nobody enabled) fails the check, and after the last step
//! nothing may be pending (50 ms). Afterwards, pass or fail: IRQ_CTRL = 0, the SPIs disabled,
//! anything still pending acknowledged and ended, the IOVA mapped, a command error skipped.
//!
//! Console: `selftest: smmu-irq: GICD .., GICR ..; eventq INTID .., gerror INTID ..,
//! cmdq-sync INTID ..` before, and the wait for each interrupt (from the end of its stimulus)
//! after.

use fdt::Fdt;

use crate::arch::{Deadline, cntvct_el0};
use crate::console::println;
use crate::dma::{self, ASID, DST, Dma, FAULT_LEN, IOVA_DST, PAGE};
use crate::dt::DtInfo;
use crate::gic::{self, Gic, Irq};
use crate::report::{CheckResult, Msg, Report, ensure, fail};
use crate::smmu::{self, Cmd, Event, GERROR_CMDQ_ERR, QueueStop};

pub const CHECK: &str = "smmu-irq";

/// How long an interrupt may take after its stimulus.
const WAIT_MS: u64 = 2000;
/// How long further eventq interrupts may follow the first.
const SETTLE_MS: u64 = 100;
/// How long nothing may be pending where nothing was raised.
const QUIET_MS: u64 = 50;
/// Priority of the SMMU's SPIs (any value the priority mask lets through).
const PRIORITY: u8 = 0xa0;

/// The SMMU's interrupts, from the DT.
struct Lines {
    eventq: Irq,
    gerror: Irq,
    cmd_sync: Option<Irq>,
}

impl Lines {
    fn from_dt(fdt: &Fdt<'_>) -> Result<Self, Msg> {
        let Some(node) = fdt.find_compatible(&["arm,smmu-v3"]) else {
            fail!("no arm,smmu-v3 node in the DT");
        };
        let Some(eventq) = gic::named_irq(fdt, node, "eventq")? else {
            fail!("{}: no eventq in interrupt-names", node.name);
        };
        let Some(gerror) = gic::named_irq(fdt, node, "gerror")? else {
            fail!("{}: no gerror in interrupt-names", node.name);
        };
        let cmd_sync = gic::named_irq(fdt, node, "cmdq-sync")?;
        let distinct = eventq.intid != gerror.intid
            && cmd_sync.is_none_or(|c| c.intid != eventq.intid && c.intid != gerror.intid);
        ensure!(distinct, "{}: an INTID is named twice", node.name);
        Ok(Lines {
            eventq,
            gerror,
            cmd_sync,
        })
    }

    /// The interrupts the check enables.
    fn all(&self) -> impl Iterator<Item = Irq> {
        [Some(self.eventq), Some(self.gerror), self.cmd_sync]
            .into_iter()
            .flatten()
    }

    /// What INTID `i` is, for messages.
    fn name(&self, i: u32) -> &'static str {
        if i == self.eventq.intid {
            "eventq"
        } else if i == self.gerror.intid {
            "gerror"
        } else if self.cmd_sync.is_some_and(|c| c.intid == i) {
            "cmdq-sync"
        } else {
            "not enabled by this check"
        }
    }
}

/// Runs the check and records it.
pub fn run(report: &mut Report, dma: &mut Dma, dt: Option<&DtInfo>) {
    report.record(CHECK, check(dma, dt));
}

fn check(dma: &mut Dma, dt: Option<&DtInfo>) -> CheckResult {
    let Some(dt) = dt else {
        fail!("no usable DT");
    };
    // SAFETY: the DTB was validated by `dt::parse` at this address; it stays in place and
    // unmodified for the guest's lifetime.
    let fdt = match unsafe { Fdt::from_ptr(dt.addr as *const u8) } {
        Ok(f) => f,
        Err(e) => fail!("cannot parse DTB: {e:?}"),
    };
    let lines = Lines::from_dt(&fdt)?;
    let gic = Gic::init(&fdt)?;
    let trigger = |irq: Irq| if irq.edge { "edge" } else { "level" };
    match lines.cmd_sync {
        Some(c) => println!(
            "selftest: smmu-irq: GICD {:#x}, GICR {:#x}; eventq INTID {} ({}), gerror INTID {} \
             ({}), cmdq-sync INTID {} ({})",
            gic.dist(),
            gic.redist(),
            lines.eventq.intid,
            trigger(lines.eventq),
            lines.gerror.intid,
            trigger(lines.gerror),
            c.intid,
            trigger(c)
        ),
        None => println!(
            "selftest: smmu-irq: GICD {:#x}, GICR {:#x}; eventq INTID {} ({}), gerror INTID {} \
             ({}), no cmdq-sync in the DT",
            gic.dist(),
            gic.redist(),
            lines.eventq.intid,
            trigger(lines.eventq),
            lines.gerror.intid,
            trigger(lines.gerror)
        ),
    }
    let result = exercise(dma, &gic, &lines);
    let restored = restore(dma, &gic, &lines);
    result.and(restored)
}

fn exercise(dma: &mut Dma, gic: &Gic, lines: &Lines) -> CheckResult {
    for irq in lines.all() {
        gic.enable_spi(irq, PRIORITY)?;
    }
    // Nothing left over from the checks before (this reads EVENTQ_PROD, before any stimulus).
    dma.no_events("the checks before")?;
    dma.smmu
        .set_irq_ctrl(smmu::IRQ_CTRL_EVENTQ | smmu::IRQ_CTRL_GERROR)?;
    quiet(lines, "before anything raised it")?;

    let (t_eventq, faults, extra) = eventq(dma, lines)?;
    let t_gerror = gerror(dma, lines)?;
    let t_sync = match lines.cmd_sync {
        Some(c) => Some(cmd_sync(dma, lines, c)?),
        None => None,
    };
    quiet(lines, "after the last step")?;
    println!(
        "selftest: smmu-irq: eventq after {t_eventq} us ({faults} F_TRANSLATION(s), {extra} \
         further eventq interrupt(s)), gerror after {t_gerror} us{}",
        match t_sync {
            Some(t) => Msg::new(format_args!(", cmdq-sync after {t} us")),
            None => Msg::new(format_args!("")),
        }
    );
    Ok(())
}

/// Microseconds since counter value `start`.
fn us_since(start: u64) -> u64 {
    cntvct_el0().saturating_sub(start) * 1_000_000 / Deadline::freq()
}

/// Waits for `want` at ICC_IAR1_EL1 and ends it; fails on a timeout or any other INTID.
/// Returns how long it waited, in microseconds.
fn wait_for(lines: &Lines, want: Irq, what: &str) -> Result<u64, Msg> {
    let start = cntvct_el0();
    match gic::wait_ack(&Deadline::after_ms(WAIT_MS)) {
        None => fail!(
            "no {what} interrupt (INTID {}) within {WAIT_MS} ms",
            want.intid
        ),
        Some(i) => {
            gic::eoi(i);
            ensure!(
                i == want.intid,
                "INTID {i} ({}) while waiting for {what} (INTID {})",
                lines.name(i),
                want.intid
            );
            Ok(us_since(start))
        }
    }
}

/// Fails if any interrupt is acknowledged within [`QUIET_MS`].
fn quiet(lines: &Lines, when: &str) -> CheckResult {
    if let Some(i) = gic::wait_ack(&Deadline::after_ms(QUIET_MS)) {
        gic::eoi(i);
        fail!("INTID {i} ({}) {when}", lines.name(i));
    }
    Ok(())
}

/// Counts the queued events that are the expected `F_TRANSLATION`s (a write by the edu's
/// stream to the unmapped IOVA) into `faults`; keeps the first other one in `other`.
fn take_faults(dma: &mut Dma, faults: &mut usize, other: &mut Option<Event>) {
    let sid = dma.sid;
    dma.smmu.drain_events(|e| {
        let hit = e.id() == smmu::F_TRANSLATION
            && e.sid() == sid
            && (IOVA_DST..IOVA_DST + FAULT_LEN as u64).contains(&e.addr())
            && !e.is_read();
        if hit {
            *faults += 1;
        } else {
            other.get_or_insert(*e);
        }
    });
}

/// Step 2: returns the wait (us), the `F_TRANSLATION`s read and the further eventq interrupts.
fn eventq(dma: &mut Dma, lines: &Lines) -> Result<(u64, usize, usize), Msg> {
    dma::unmap_dst();
    dma.smmu.submit(&[Cmd::TlbiNhVa {
        asid: ASID,
        va: IOVA_DST,
    }])?;
    dma::fill(DST, |_| 0x3c);
    // From here until the interrupt, nothing reads EVENTQ_PROD (see the module docs).
    dma.edu.buf_to_bus(0, IOVA_DST, FAULT_LEN as u64)?;
    let waited = wait_for(lines, lines.eventq, "eventq")?;
    if let Some((off, got)) = dma::mismatch(DST, 0..PAGE, |_| 0x3c) {
        fail!("the DMA to the unmapped IOVA {IOVA_DST:#x} landed (byte {off:#x} = {got:#x})");
    }
    let (mut faults, mut other) = (0, None);
    take_faults(dma, &mut faults, &mut other);
    ensure!(
        faults > 0,
        "eventq interrupt, but no F_TRANSLATION for SID {:#x} at {IOVA_DST:#x} in the queue{}",
        dma.sid,
        match other {
            Some(e) => Msg::new(format_args!("; first event: {e}")),
            None => Msg::new(format_args!(" (empty)")),
        }
    );
    // More events may come in later batches, each with its edge.
    let deadline = Deadline::after_ms(SETTLE_MS);
    let mut extra = 0;
    while let Some(i) = gic::wait_ack(&deadline) {
        gic::eoi(i);
        ensure!(
            i == lines.eventq.intid,
            "INTID {i} ({}) after the eventq interrupt",
            lines.name(i)
        );
        extra += 1;
    }
    take_faults(dma, &mut faults, &mut other);
    if let Some(e) = other {
        fail!("unexpected event besides the F_TRANSLATION(s): {e}");
    }
    dma::map_dst(DST);
    Ok((waited, faults, extra))
}

/// Step 3: returns the wait (us).
fn gerror(dma: &mut Dma, lines: &Lines) -> Result<u64, Msg> {
    let g0 = dma.smmu.gerror_raw();
    let good = Cmd::TlbiNhAsid { asid: 0x7e }.encode_raw();
    let sync = Cmd::Sync.encode_raw();
    match dma.smmu.submit_raw(&[good, [0xff, 0], sync]) {
        Ok(()) => fail!("opcode 0xff: consumed without an error"),
        Err(QueueStop::Timeout { cons }) => {
            fail!("opcode 0xff: neither consumed nor an error (CONS {cons:#x})")
        }
        Err(QueueStop::Error { .. }) => {}
    }
    let g1 = dma.smmu.gerror_raw();
    ensure!(
        (g0 ^ g1) & GERROR_CMDQ_ERR != 0,
        "opcode 0xff: GERROR {g0:#x} -> {g1:#x}, CMDQ_ERR did not toggle"
    );
    let waited = wait_for(lines, lines.gerror, "gerror")?;
    dma.smmu.skip_error()?;
    let gerror = dma.smmu.gerror();
    ensure!(gerror == 0, "GERROR {gerror:#x} after recovery");
    dma.smmu.submit(&[])?;
    Ok(waited)
}

/// Step 4: returns the wait (us).
fn cmd_sync(dma: &mut Dma, lines: &Lines, irq: Irq) -> Result<u64, Msg> {
    if let Err(stop) = dma.smmu.submit_raw(&[Cmd::SyncIrq.encode_raw()]) {
        fail!("CMD_SYNC with CS = SIG_IRQ: {stop}");
    }
    wait_for(lines, irq, "cmdq-sync")
}

/// Leaves the SMMU and the GIC as the other checks expect, whatever happened.
fn restore(dma: &mut Dma, gic: &Gic, lines: &Lines) -> CheckResult {
    let irq_off = dma.smmu.set_irq_ctrl(0);
    let mut spis = Ok(());
    for irq in lines.all() {
        if let Err(e) = gic.disable_spi(irq.intid) {
            spis = Err(e);
        }
    }
    // Whatever a failed step left pending or active.
    for _ in 0..64 {
        let i = gic::ack();
        if gic::is_special(i) {
            break;
        }
        gic::eoi(i);
    }
    dma::map_dst(DST);
    let cmdq = if dma.smmu.gerror() & GERROR_CMDQ_ERR != 0 {
        dma.smmu.skip_error()
    } else {
        Ok(())
    };
    irq_off.and(spis).and(cmdq)
}
