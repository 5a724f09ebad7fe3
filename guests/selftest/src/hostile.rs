//! Hostile-guest SMMU checks, run after the DMA checks (`dma.rs`) on the same SMMU and `edu`:
//! the guest writes nonsense to its SMMU and checks that it is contained, that it sees what
//! hardware would report (under the hypervisor: what the vSMMU's module docs promise), and that
//! its own DMA keeps working afterwards.
//!
//! * `smmu-foreign-sid`: STEs (bypass, then stage 1) for a StreamID this VM does not own (the
//!   other VM's: the edu's SID XOR 0x18) are invalidated with `CFGI_STE` + `CMD_SYNC`: the
//!   commands complete, no command error, no event. That the other VM is unaffected is shown by
//!   its own DMA checks, which run at the same time.
//! * `smmu-bad-ste`: the edu's STE with Config = stage 2 (none advertised), with a reserved
//!   Config and garbage in the other dwords, and all ones (Config = nested): each gives
//!   `C_BAD_STE` for the edu's StreamID (the hypervisor reports it when the `CFGI_STE` loads
//!   the STE, QEMU when a transaction uses it), and a DMA write through it does not land. QEMU
//!   treats the reserved Configs 0b001..0b011 as abort without an event, so on bare QEMU that
//!   variant may be silent; where the SMMU advertises stage 2 (IDR0.S2P: some QEMU versions,
//!   never the vSMMU) the S2 and nested STEs are legal and are not tried.
//! * `smmu-cd-outside`: a stage-1 STE whose S1ContextPtr leads to no memory of the VM gives
//!   `F_CD_FETCH` (not readable through stage 2, as the vSMMU documents; on bare QEMU a CD fetch
//!   from an address with no memory) and the DMA does not land. Under the hypervisor:
//!   0x4020_0000 (the hypervisor's image in host-physical terms), 0x7000_0000 (host RAM of no
//!   VM at that IPA) and the first address past the VM's RAM; on bare QEMU only the latter (the
//!   others are this guest's RAM there).
//! * `smmu-strtab-locked` (not with `selftest.bare`): with SMMUEN = 1, writes to STRTAB_BASE
//!   and STRTAB_BASE_CFG are ignored (the SMMUv3.2 rule the vSMMU implements; before v3.2, and
//!   QEMU's SMMU is v3.1, the architecture leaves them CONSTRAINED UNPREDICTABLE), and the
//!   stream table in use is still this guest's (a DMA through a freshly invalidated STE works).
//! * `smmu-garbage-cmdq`: an unknown opcode (0xff), then `CMD_TLBI_S2_IPA` (no stage 2
//!   advertised; not tried where IDR0.S2P = 1, as on bare QEMU 10), each after a valid command: CMDQ_CONS.ERR = `CERROR_ILL` with CONS at the bad
//!   command and GERROR.CMDQ_ERR toggled; recovered as Linux does (the command replaced by a
//!   `CMD_SYNC`, GERRORN acknowledged), the queue drains and a further `CMD_SYNC` completes.
//! * `dma-after-hostile`: the good stage-1 STE again, and the `dma-s1` round trip works.

use crate::console::println;
use crate::dma::{self, DST, Dma, FAULT_LEN, IOVA_DST, IOVA_SRC, OUTSIDE, PAGE, SRC};
use crate::report::{CheckResult, Report, ensure, fail};
use crate::smmu::{self, CERROR_ILL, Cmd, QueueStop};

/// The checks, in order (for recording them all as failed when the DMA setup failed).
pub const CHECKS: &[&str] = &[
    "smmu-foreign-sid",
    "smmu-bad-ste",
    "smmu-cd-outside",
    "smmu-strtab-locked",
    "smmu-garbage-cmdq",
    "dma-after-hostile",
];

/// A StreamID the VM with the edu at `sid` does not own: the other VM's (0x8 <-> 0x10).
pub fn foreign_sid(sid: u32) -> u32 {
    sid ^ 0x18
}

/// Runs the checks. `ram_end`: the first address past the VM's RAM (0 if unknown).
pub fn run(report: &mut Report, dma: &mut Dma, ram_end: u64, bare: bool) {
    report.record(CHECKS[0], foreign(dma));
    report.record(CHECKS[1], bad_ste(dma, bare));
    report.record(CHECKS[2], cd_outside(dma, ram_end, bare));
    if bare {
        report.skip(
            CHECKS[3],
            "selftest.bare: read-only STRTAB_BASE is an SMMUv3.2 rule, QEMU's is v3.1",
        );
    } else {
        report.record(CHECKS[3], strtab_locked(dma));
    }
    report.record(CHECKS[4], garbage_cmdq(dma));
    report.record(CHECKS[5], after(dma));
}

/// `smmu-foreign-sid`.
fn foreign(dma: &mut Dma) -> CheckResult {
    let other = foreign_sid(dma.sid);
    dma.events();
    let cd = dma.smmu.cd_addr();
    for (what, ste) in [
        ("bypass", smmu::ste_bypass()),
        ("stage-1", smmu::ste_s1(cd)),
        ("invalid", [0; 8]),
    ] {
        if let Err(e) = dma.smmu.set_ste(other, ste) {
            fail!("{what} STE for SID {other:#x}: {e}");
        }
    }
    dma.no_events("STEs for a foreign StreamID")
}

/// Fills the edu's buffer with a known pattern through the good stage-1 STE (a round trip that
/// must work), then installs `ste` for the edu's stream: a DMA write of that buffer to the
/// destination page, by IOVA and by IPA, must not land, and the events since the STE was
/// installed must be `want` for the edu's StreamID (at least one, unless `may_be_silent`).
fn contained(
    dma: &mut Dma,
    what: &str,
    ste: [u64; 8],
    want: u8,
    may_be_silent: bool,
) -> CheckResult {
    dma.set_s1()?;
    dma.round_trip(0x77, IOVA_SRC, IOVA_DST)?;
    dma.events();
    if let Err(e) = dma.smmu.set_ste(dma.sid, ste) {
        fail!("{what}: {e}");
    }
    dma::fill(DST, |_| 0x3c);
    dma.edu.buf_to_bus(0, IOVA_DST, FAULT_LEN as u64)?;
    dma.edu
        .buf_to_bus(0, dma::page(DST) as u64, FAULT_LEN as u64)?;
    if let Some((off, got)) = dma::mismatch(DST, 0..PAGE, |_| 0x3c) {
        fail!("{what}: a DMA write landed (byte {off:#x} = {got:#x})");
    }
    let sid = dma.sid;
    let mut found = 0;
    let mut other = None;
    let (n, _) = dma.smmu.drain_events(|e| {
        if e.id() == want && e.sid() == sid {
            found += 1;
        } else {
            other.get_or_insert(*e);
        }
    });
    if let Some(e) = other {
        fail!("{what}: {n} event(s), unexpected: {e}");
    }
    ensure!(
        found > 0 || may_be_silent,
        "{what}: no event {want:#x} for SID {sid:#x}"
    );
    let gerror = dma.smmu.gerror();
    ensure!(gerror == 0, "{what}: GERROR {gerror:#x}");
    Ok(())
}

/// `smmu-bad-ste`.
fn bad_ste(dma: &mut Dma, bare: bool) -> CheckResult {
    // Config = S2 and nested are ILLEGAL only without stage 2 (the vSMMU advertises none).
    // QEMU's SMMUv3 advertises it in some versions and then takes these STEs (and asserts on
    // S2AA64 = 0, hence S2AA64 = 1 below): there the two variants are not run.
    let s2p = dma.smmu.has_s2();
    ensure!(
        !s2p || bare,
        "the SMMU advertises stage 2 (IDR0.S2P) to a VM"
    );
    if s2p {
        println!(
            "selftest: smmu-bad-ste: IDR0.S2P = 1: Config = S2 and nested are legal, not tried"
        );
    } else {
        // Config = S2 (0b110), otherwise a plausible stage-1 STE, S2AA64 = 1.
        let mut s2 = smmu::ste_s1(dma.smmu.cd_addr());
        s2[0] = (s2[0] & !(0b111 << 1)) | (0b110 << 1);
        s2[2] |= 1 << 51;
        contained(dma, "Config = S2", s2, smmu::C_BAD_STE, false)?;
    }
    // Config = 0b010 (reserved), garbage elsewhere.
    let mut garbage = [
        0xdead_beef_f00d_cafe,
        0x0123_4567_89ab_cdef,
        0xffff_0000_ffff_0000,
        0x5a5a_5a5a_5a5a_5a5a,
        u64::MAX,
        0x8000_0000_0000_0001,
        0xa5a5_a5a5_a5a5_a5a5,
        0x7fff_ffff_ffff_fffe,
    ];
    garbage[0] = (garbage[0] & !0b1111) | (0b010 << 1) | 1;
    contained(dma, "reserved Config", garbage, smmu::C_BAD_STE, bare)?;
    if !s2p {
        // All ones: V = 1, Config = nested.
        contained(dma, "all-ones STE", [u64::MAX; 8], smmu::C_BAD_STE, false)?;
    }
    Ok(())
}

/// `smmu-cd-outside`.
fn cd_outside(dma: &mut Dma, ram_end: u64, bare: bool) -> CheckResult {
    ensure!(ram_end != 0, "the VM's RAM is unknown");
    let hyp_only: &[u64] = if bare { &[] } else { &[OUTSIDE, 0x7000_0000] };
    for &ptr in hyp_only.iter().chain(&[ram_end]) {
        contained(
            dma,
            "S1ContextPtr outside RAM",
            smmu::ste_s1(ptr),
            smmu::F_CD_FETCH,
            false,
        )
        .map_err(|e| crate::report::Msg::new(format_args!("{ptr:#x}: {e}")))?;
    }
    Ok(())
}

/// `smmu-strtab-locked`.
fn strtab_locked(dma: &mut Dma) -> CheckResult {
    let (base, cfg) = dma.smmu.strtab_regs();
    // Another (64-byte aligned) address of this guest's RAM, and another size.
    let new_base = (base & !0xfff) ^ 0x10_0000;
    let new_cfg = cfg ^ 1;
    // SAFETY: the SMMU is enabled; if it did take the writes, the stream table would be
    // whatever is at `new_base`, which the check then reports (and restores below) before any
    // DMA.
    unsafe { dma.smmu.write_strtab_regs(new_base, new_cfg) };
    let (base2, cfg2) = dma.smmu.strtab_regs();
    if (base2, cfg2) != (base, cfg) {
        // SAFETY: restores the stream table this driver set up.
        unsafe { dma.smmu.write_strtab_regs(base, cfg) };
        fail!("with SMMUEN = 1, STRTAB_BASE/CFG {base:#x}/{cfg:#x} became {base2:#x}/{cfg2:#x}");
    }
    // The table in use is still this one: a freshly loaded STE translates.
    dma.set_s1()?;
    dma.round_trip(0x88, IOVA_SRC, IOVA_DST)
}

/// Submits `good`, `bad` and a `CMD_SYNC`; checks the error the SMMU reports for `bad`, recovers
/// and checks the queue works again.
fn bad_command(dma: &mut Dma, what: &str, bad: [u64; 2]) -> CheckResult {
    let gerror_before = dma.smmu.gerror();
    ensure!(
        gerror_before == 0,
        "{what}: GERROR {gerror_before:#x} before"
    );
    let g0 = dma.smmu.gerror_raw();
    let good = Cmd::TlbiNhAsid { asid: 0x7e }.encode_raw();
    let sync = Cmd::Sync.encode_raw();
    let start = dma.smmu.cmdq_prod();
    let at = (start + 1) & smmu::CMDQ_WRAP;
    match dma.smmu.submit_raw(&[good, bad, sync]) {
        Ok(()) => fail!("{what}: consumed without an error"),
        Err(QueueStop::Timeout { cons }) => {
            fail!("{what}: neither consumed nor an error (CONS {cons:#x})")
        }
        Err(QueueStop::Error { cons, code }) => {
            let g1 = dma.smmu.gerror_raw();
            let toggled = (g0 ^ g1) & smmu::GERROR_CMDQ_ERR != 0;
            if code != CERROR_ILL || cons != at || !toggled {
                // Leave the queue usable for the checks that follow.
                let _ = dma.smmu.skip_error();
                fail!(
                    "{what}: CONS.ERR {code:#x} at {cons:#x}, want {CERROR_ILL:#x} at {at:#x}; \
                     GERROR {g0:#x} -> {g1:#x}"
                );
            }
        }
    }
    dma.smmu.skip_error()?;
    let gerror = dma.smmu.gerror();
    ensure!(gerror == 0, "{what}: GERROR {gerror:#x} after recovery");
    dma.smmu.submit(&[])?;
    dma.no_events(what)
}

/// `smmu-garbage-cmdq`.
fn garbage_cmdq(dma: &mut Dma) -> CheckResult {
    bad_command(dma, "opcode 0xff", [0xff, 0])?;
    // Legal where the SMMU has stage 2 (bare QEMU 10 advertises it; the vSMMU never does).
    if dma.smmu.has_s2() {
        println!("selftest: smmu-garbage-cmdq: IDR0.S2P = 1: CMD_TLBI_S2_IPA is legal, not tried");
        return Ok(());
    }
    // CMD_TLBI_S2_IPA, VMID 0, an address of this guest's RAM.
    bad_command(
        dma,
        "CMD_TLBI_S2_IPA",
        [0x2a, dma::page(SRC) as u64 & !0xfff],
    )
}

/// `dma-after-hostile`.
fn after(dma: &mut Dma) -> CheckResult {
    dma.set_s1()?;
    dma.round_trip(0x99, IOVA_SRC, IOVA_DST)
}
