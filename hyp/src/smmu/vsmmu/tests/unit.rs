//! Targeted tests: registers, shadowing, commands, events, trap counts.

use std::sync::atomic::Ordering;
use std::vec;
use std::vec::Vec;

use alloc::sync::Arc;

use super::*;
use crate::smmu::v3::cmd::{SYNC_CS_IRQ, TG_4K};
use crate::smmu::v3::event::EventId;
use crate::smmu::v3::regs::{CERROR_ABT, CERROR_ILL};
use crate::smmu::v3::ste::L1Desc;
use crate::trap::MmioError;

const SIDS: &[u32] = &[8, 9, 0x20];
const OTHER_SIDS: &[u32] = &[0x10, 0x11];

fn guest() -> Guest {
    Guest::new(0, 1, SIDS, &Arc::new(Recorder::default()))
}

/// Two VMs on one physical SMMU; the first is enabled.
fn two_guests() -> (Guest, Guest) {
    let rec = Arc::new(Recorder::default());
    let mut a = Guest::new(0, 1, SIDS, &rec);
    let b = Guest::new(1, 2, OTHER_SIDS, &rec);
    a.enable();
    (a, b)
}

fn check(a: &Guest, b: &Guest) {
    let log = a.rec.take_log();
    check_invariants(
        &a.rec,
        &[(a.vmid, a.s2, &a.sids), (b.vmid, b.s2, &b.sids)],
        &log,
    );
}

fn ids(events: &[Event]) -> Vec<(EventId, u32)> {
    events.iter().map(|e| (e.event_id(), e.sid)).collect()
}

fn cons_err(g: &Guest) -> u32 {
    g.r32(off::CMDQ_CONS) >> 24
}

#[test]
fn reset_state() {
    let g = guest();
    // ID registers: QEMU's minus stage 2 and VMID16, XNX.
    assert_eq!(g.r32(off::IDR0), 0x0d44_101b & !(1 | (1 << 18)));
    assert_eq!(g.r32(off::IDR1), 0x0273_0010);
    assert_eq!(g.r32(off::IDR2), 0);
    assert_eq!(g.r32(off::IDR3), 0x1404);
    assert_eq!(g.r32(off::IDR4), 0);
    assert_eq!(g.r32(off::IDR5), 0x72, "OAS = the VM's 40-bit IPA space");
    assert_eq!(g.r32(off::IIDR), 0x43b);
    assert_eq!(g.r32(off::AIDR), 1);
    for reg in [
        off::CR0,
        off::CR0ACK,
        off::CR1,
        off::CR2,
        off::IRQ_CTRL,
        off::IRQ_CTRLACK,
        off::GERROR,
        off::GERRORN,
        off::STRTAB_BASE_CFG,
        off::CMDQ_PROD,
        off::CMDQ_CONS,
        off::EVENTQ_PROD,
        off::EVENTQ_CONS,
        off::STATUSR,
    ] {
        assert_eq!(g.r32(reg), 0, "{reg:#x}");
    }
    assert_eq!(g.r32(off::GBPA), 0x1000);
    for reg in [off::STRTAB_BASE, off::CMDQ_BASE, off::EVENTQ_BASE] {
        assert_eq!(g.r64(reg), 0);
    }
    // Every stream starts stage-2 only (GBPA bypass with the SMMU disabled).
    for &sid in SIDS {
        assert_eq!(g.rec.ste(sid), Some(Ste::s2(1, &g.s2)));
    }
    assert_eq!(g.rec.stes.lock().unwrap().len(), SIDS.len());
    assert_eq!(g.vs.stats().stes_installed, 3);
    assert!(g.vs.owns(9) && !g.vs.owns(0x10));
    assert_eq!(g.vs.vmid(), 1);
    assert_eq!(g.vs.name(), "vsmmuv3");
}

#[test]
fn cr0_and_irq_ctrl_acks_follow_at_once() {
    let g = guest();
    g.w32(off::CR0, 0xffff_ffff);
    assert_eq!(g.r32(off::CR0), 0b1101, "PRIQEN, ATSCHK, VMW are RES0");
    assert_eq!(g.r32(off::CR0ACK), 0b1101);
    g.w32(off::CR0, regfile::CR0_CMDQEN);
    assert_eq!(g.r32(off::CR0ACK), regfile::CR0_CMDQEN);
    g.w32(off::IRQ_CTRL, 0xff);
    assert_eq!(g.r32(off::IRQ_CTRL), 0b101);
    assert_eq!(g.r32(off::IRQ_CTRLACK), 0b101);
    g.w32(off::CR2, 0xff);
    assert_eq!(g.r32(off::CR2), 0b110, "E2H is RES0 without HYP");
    g.w32(off::CR1, 0xffff_ffff);
    assert_eq!(g.r32(off::CR1), 0xfff);
    // ID registers are read-only.
    g.w32(off::IDR0, 0);
    assert_ne!(g.r32(off::IDR0), 0);
    // GERROR is read-only; GERRORN keeps the defined error bits.
    g.w32(off::GERROR, 1);
    assert_eq!(g.r32(off::GERROR), 0);
    g.w32(off::GERRORN, 0xffff_ffff);
    assert_eq!(g.r32(off::GERRORN), 0x3fd);
}

#[test]
fn base_registers_read_only_while_enabled() {
    let mut g = guest();
    g.enable();
    let strtab = g.r64(off::STRTAB_BASE);
    let cfg = g.r32(off::STRTAB_BASE_CFG);
    let cmdq = g.r64(off::CMDQ_BASE);
    let evtq = g.r64(off::EVENTQ_BASE);
    g.w64(off::STRTAB_BASE, 0x9000_0000);
    g.w32(off::STRTAB_BASE + 4, 0x1);
    g.w32(off::STRTAB_BASE_CFG, 3);
    g.w64(off::CMDQ_BASE, 0x9000_0000);
    g.w32(off::CMDQ_CONS, 0x55);
    g.w64(off::EVENTQ_BASE, 0x9000_0000);
    g.w32(off::EVENTQ_PROD, 0x55);
    assert_eq!(g.r64(off::STRTAB_BASE), strtab);
    assert_eq!(g.r32(off::STRTAB_BASE_CFG), cfg);
    assert_eq!(g.r64(off::CMDQ_BASE), cmdq);
    assert_eq!(g.r32(off::CMDQ_CONS), g.prod);
    assert_eq!(g.r64(off::EVENTQ_BASE), evtq);
    assert_eq!(g.r32(off::EVENTQ_PROD), 0);
    // Each follows its own enable: with only SMMUEN cleared, the queue bases stay read-only.
    g.w32(off::CR0, regfile::CR0_CMDQEN | regfile::CR0_EVENTQEN);
    g.w32(off::STRTAB_BASE_CFG, 3);
    assert_eq!(g.r32(off::STRTAB_BASE_CFG), 3);
    g.w64(off::CMDQ_BASE, 0x9000_0000);
    assert_eq!(g.r64(off::CMDQ_BASE), cmdq);
    g.w32(off::CR0, regfile::CR0_EVENTQEN);
    g.w64(off::CMDQ_BASE, 0x9000_0000 | 4);
    assert_eq!(g.r64(off::CMDQ_BASE), 0x9000_0004);
    g.w64(off::EVENTQ_BASE, 0x9000_0000);
    assert_eq!(g.r64(off::EVENTQ_BASE), evtq);
    g.w32(off::CR0, 0);
    g.w64(off::EVENTQ_BASE, u64::MAX);
    assert_eq!(
        g.r64(off::EVENTQ_BASE),
        (1 << 62) | 0x000f_ffff_ffff_ffe0 | 0x1f,
        "reserved bits masked"
    );
}

#[test]
fn access_sizes_and_halves() {
    let g = guest();
    // 64-bit registers: whole or either 32-bit half.
    g.w32(off::STRTAB_BASE, 0x8000_1040);
    g.w32(off::STRTAB_BASE + 4, 0x4000_0001);
    assert_eq!(g.r64(off::STRTAB_BASE), 0x4000_0001_8000_1040);
    assert_eq!(g.r32(off::STRTAB_BASE + 4), 0x4000_0001);
    assert_eq!(g.r32(off::STRTAB_BASE), 0x8000_1040);
    // Bad sizes and alignments are rejected (the hypervisor injects an abort).
    assert_eq!(
        g.vs.read(0, off::CR0, 8),
        Err(MmioError::BadSize { size: 8 })
    );
    assert_eq!(
        g.vs.write(0, off::CMDQ_PROD, 8, 0),
        Err(MmioError::BadSize { size: 8 })
    );
    assert_eq!(
        g.vs.read(0, off::CR0, 2),
        Err(MmioError::BadSize { size: 2 })
    );
    assert_eq!(
        g.vs.write(0, off::GBPA, 1, 0),
        Err(MmioError::BadSize { size: 1 })
    );
    assert_eq!(
        g.vs.read(0, off::CR0 + 2, 4),
        Err(MmioError::BadOffset { offset: 0x22 })
    );
    assert_eq!(
        g.vs.read(0, off::STRTAB_BASE + 4, 8),
        Err(MmioError::BadOffset { offset: 0x84 })
    );
    // Unknown offsets: RAZ/WI. The page-0 aliases of the page-1 pointers are reserved.
    for offset in [0x30, 0xa8, 0xac, 0xfd0, 0x1_0000, 0x1_fffc] {
        g.w32(offset, 0xffff_ffff);
        assert_eq!(g.r32(offset), 0, "{offset:#x}");
    }
    g.w64(0x1_0000, u64::MAX);
    assert_eq!(g.r64(0x1_0000), 0);
    // MSI and PRI queue registers are not implemented.
    g.w64(off::GERROR_IRQ_CFG0, u64::MAX);
    g.w32(off::PRIQ_PROD, 5);
    assert_eq!(g.r64(off::GERROR_IRQ_CFG0), 0);
    assert_eq!(g.r32(off::PRIQ_PROD), 0);
    // The event queue pointers live in page 1.
    g.w32(off::EVENTQ_CONS, 3);
    assert_eq!(g.r32(off::EVENTQ_CONS), 3);
    let s = g.vs.stats();
    assert_eq!((s.prod_writes, s.cons_reads), (0, 0));
    assert!(s.other_reads >= 10 && s.other_writes >= 10, "{s:?}");
}

#[test]
fn gbpa_decides_while_disabled() {
    let mut g = guest();
    // ABORT with UPDATE: every stream aborts.
    g.w32(off::GBPA, (1 << 31) | (1 << 20));
    assert_eq!(g.r32(off::GBPA), 1 << 20, "UPDATE clears at once");
    for &sid in SIDS {
        assert_eq!(g.rec.ste(sid), Some(Ste::abort()));
    }
    // Without UPDATE the write is ignored.
    g.w32(off::GBPA, 0);
    assert_eq!(g.rec.ste(8), Some(Ste::abort()));
    g.w32(off::GBPA, 1 << 31);
    assert_eq!(g.rec.ste(8), Some(Ste::s2(1, &g.s2)));
    // Enabled, streams follow the table; disabled again with GBPA abort: abort.
    g.set_ste(8, Guest::bypass_ste());
    g.enable();
    assert_eq!(g.rec.ste(8), Some(Ste::s2(1, &g.s2)));
    assert_eq!(g.rec.ste(9), Some(Ste::abort()), "V = 0");
    g.w32(off::GBPA, (1 << 31) | (1 << 20));
    assert_eq!(
        g.rec.ste(8),
        Some(Ste::s2(1, &g.s2)),
        "GBPA does not matter while enabled"
    );
    g.w32(off::CR0, 0);
    for &sid in SIDS {
        assert_eq!(g.rec.ste(sid), Some(Ste::abort()));
    }
}

#[test]
fn linear_table_cfgi_ste_installs_nested() {
    let (mut a, b) = two_guests();
    let ste = Guest::s1_ste(CDS + 0x40);
    a.set_ste(9, ste);
    // Not live until invalidated (the SMMU may have the old STE cached).
    assert_eq!(a.rec.ste(9), Some(Ste::abort()));
    a.issue(&[Command::CfgiSte { sid: 9, leaf: true }, Command::sync()]);
    let phys = a.rec.ste(9).unwrap();
    assert_eq!(phys, a.nested(&ste));
    assert_eq!(phys.config(), SteConfig::Nested);
    assert_eq!(phys.s2_vmid(), 1);
    assert_eq!(phys.s2_ttb(), a.s2.ttb);
    assert_eq!(phys.s1_context_ptr(), CDS + 0x40, "the guest's IPA");
    assert_eq!((phys.s1_cir(), phys.s1_cor(), phys.s1_csh()), (1, 1, 3));
    assert_eq!(a.r32(off::CMDQ_CONS), a.prod);
    assert!(a.events().is_empty());
    // The STE write, then the stream's cached CDs dropped, then the guest's sync.
    let log = a.rec.take_log();
    let tail: Vec<&PhysOp> = log.iter().rev().take(3).rev().collect();
    assert_eq!(
        tail,
        [
            &PhysOp::Ste {
                tag: 0,
                sid: 9,
                ste: phys
            },
            &PhysOp::Cmds {
                tag: 0,
                cmds: vec![Command::CfgiCdAll { sid: 9 }.encode()]
            },
            &PhysOp::Sync { tag: 0 },
        ]
    );
    check_invariants(
        &a.rec,
        &[(a.vmid, a.s2, &a.sids), (b.vmid, b.s2, &b.sids)],
        &log,
    );
    // The other VM's streams are untouched.
    for &sid in OTHER_SIDS {
        assert_eq!(a.rec.ste(sid), Some(Ste::s2(2, &b.s2)));
    }
    check(&a, &b);
}

#[test]
fn two_level_table() {
    let mut g = guest();
    g.enable();
    // Rebuild the stream table as 2-level, SPLIT 8, 2^16 StreamIDs.
    g.w32(off::CR0, regfile::CR0_CMDQEN | regfile::CR0_EVENTQEN);
    g.w64(off::STRTAB_BASE, STRTAB);
    g.w32(off::STRTAB_BASE_CFG, (1 << 16) | (8 << 6) | 16);
    // L1[0] covers StreamIDs 0..256 with an L2 table of 2^(9-1) = 256 STEs.
    g.mem.poke_u64s(STRTAB, &[L1Desc::new(L2_TABLES, 9).0]);
    let s1 = Guest::s1_ste(CDS);
    g.mem.poke_u64s(L2_TABLES + 9 * 64, &s1.0);
    g.mem
        .poke_u64s(L2_TABLES + 0x20 * 64, &Guest::bypass_ste().0);
    g.w32(off::CR0, 0b1101);
    assert_eq!(g.rec.ste(9), Some(g.nested(&s1)));
    assert_eq!(g.rec.ste(0x20), Some(Ste::s2(1, &g.s2)));
    assert_eq!(g.rec.ste(8), Some(Ste::abort()));
    // A short L2 table (span 5: 16 STEs) no longer covers 0x20.
    g.mem.poke_u64s(STRTAB, &[L1Desc::new(L2_TABLES, 5).0]);
    g.issue(&[Command::CfgiAll, Command::sync()]);
    assert_eq!(g.rec.ste(9), Some(g.nested(&s1)));
    assert_eq!(g.rec.ste(0x20), Some(Ste::abort()));
    assert_eq!(ids(&g.events()), [(EventId::C_BAD_STREAMID, 0x20)]);
    // SPAN 0: no L2 table.
    g.mem.poke_u64s(STRTAB, &[L1Desc::invalid().0]);
    g.issue(&[Command::CfgiSte { sid: 9, leaf: true }, Command::sync()]);
    assert_eq!(g.rec.ste(9), Some(Ste::abort()));
    assert_eq!(ids(&g.events()), [(EventId::C_BAD_STREAMID, 9)]);
    // An L2 pointer into the hole: F_STE_FETCH with the STE's address.
    g.mem.poke_u64s(STRTAB, &[L1Desc::new(HOLE.0, 9).0]);
    g.issue(&[Command::CfgiSte { sid: 9, leaf: true }, Command::sync()]);
    let ev = g.events();
    assert_eq!(ids(&ev), [(EventId::F_STE_FETCH, 9)]);
    assert_eq!(ev[0].ipa, HOLE.0 + 9 * 64);
    // An L1 table outside the VM.
    g.w32(off::CR0, regfile::CR0_CMDQEN | regfile::CR0_EVENTQEN);
    g.w64(off::STRTAB_BASE, 0x1_0000_0000);
    g.w32(off::CR0, 0b1101);
    let ev = g.events();
    assert_eq!(ev.len(), 3);
    assert!(ev.iter().all(|e| e.event_id() == EventId::F_STE_FETCH));
    assert_eq!(ev[0].ipa, 0x1_0000_0000);
    for &sid in SIDS {
        assert_eq!(g.rec.ste(sid), Some(Ste::abort()));
    }
}

#[test]
fn invalid_guest_stes_abort_with_the_right_event() {
    let oas_limit = 1u64 << 40;
    let mut bad_cdmax = Guest::s1_ste(CDS);
    bad_cdmax.0[0] |= 1 << 59;
    let mut stalld = Guest::s1_ste(CDS);
    stalld.0[1] |= 1 << 27;
    let with_config = |c: u64| {
        let mut s = Guest::s1_ste(CDS);
        s.0[0] = (s.0[0] & !0b1110) | (c << 1);
        s
    };
    let cases: Vec<(&str, Ste, Option<EventId>)> = vec![
        ("V = 0", Ste::invalid(), None),
        (
            "V = 0 with S1",
            {
                let mut s = Guest::s1_ste(CDS);
                s.0[0] &= !1;
                s
            },
            None,
        ),
        ("config S2", with_config(0b110), Some(EventId::C_BAD_STE)),
        (
            "config nested",
            with_config(0b111),
            Some(EventId::C_BAD_STE),
        ),
        (
            "config reserved 1",
            with_config(0b001),
            Some(EventId::C_BAD_STE),
        ),
        (
            "config reserved 3",
            with_config(0b011),
            Some(EventId::C_BAD_STE),
        ),
        ("S1CDMax 1", bad_cdmax, Some(EventId::C_BAD_STE)),
        ("S1STALLD", stalld, Some(EventId::C_BAD_STE)),
        (
            "CD beyond OAS",
            Guest::s1_ste(oas_limit),
            Some(EventId::C_BAD_STE),
        ),
        (
            "CD in a hole",
            Guest::s1_ste(HOLE.0),
            Some(EventId::F_CD_FETCH),
        ),
        (
            "CD outside RAM",
            Guest::s1_ste(0x1000),
            Some(EventId::F_CD_FETCH),
        ),
        (
            "CD just past RAM",
            Guest::s1_ste(RAM + RAM_LEN as u64),
            Some(EventId::F_CD_FETCH),
        ),
    ];
    for (what, ste, event) in cases {
        let (mut a, b) = two_guests();
        // Start from a valid nested STE so the change is visible.
        a.set_ste(8, Guest::s1_ste(CDS));
        a.issue(&[Command::CfgiSte { sid: 8, leaf: true }]);
        assert_eq!(a.rec.ste(8).unwrap().config(), SteConfig::Nested, "{what}");
        let before = a.vs.stats().bad_stes;
        a.set_ste(8, ste);
        a.issue(&[Command::CfgiSte { sid: 8, leaf: true }, Command::sync()]);
        assert_eq!(a.rec.ste(8), Some(Ste::abort()), "{what}");
        assert_eq!(a.vs.stats().bad_stes, before + 1, "{what}");
        let ev = a.events();
        assert_eq!(
            ids(&ev),
            event.map(|e| (e, 8)).into_iter().collect::<Vec<_>>(),
            "{what}"
        );
        if event == Some(EventId::F_CD_FETCH) {
            assert_eq!(ev[0].ipa, ste.s1_context_ptr(), "{what}");
        }
        // The command queue carries on; the other VM is untouched.
        assert_eq!(a.r32(off::CMDQ_CONS), a.prod, "{what}");
        assert_eq!(a.r32(off::GERROR), 0, "{what}");
        for &sid in OTHER_SIDS {
            assert_eq!(a.rec.ste(sid), Some(Ste::s2(2, &b.s2)), "{what}");
        }
        check(&a, &b);
    }
}

#[test]
fn out_of_range_streamids() {
    let mut g = guest();
    g.enable();
    // A linear table of 16 STEs does not reach StreamID 0x20.
    g.w32(off::CR0, regfile::CR0_CMDQEN | regfile::CR0_EVENTQEN);
    g.w32(off::STRTAB_BASE_CFG, 4);
    g.set_ste(0x20, Guest::bypass_ste());
    g.w32(off::CR0, 0b1101);
    assert_eq!(g.rec.ste(0x20), Some(Ste::abort()));
    assert!(g.events().is_empty(), "enabling reports no C_BAD_STREAMID");
    g.issue(&[Command::CfgiSte {
        sid: 0x20,
        leaf: true,
    }]);
    assert_eq!(ids(&g.events()), [(EventId::C_BAD_STREAMID, 0x20)]);
    // Without CR2.RECINVSID: silent.
    g.w32(off::CR2, 0);
    g.issue(&[Command::CfgiSte {
        sid: 0x20,
        leaf: true,
    }]);
    assert!(g.events().is_empty());
    // LOG2SIZE above SIDSIZE behaves as SIDSIZE: all of the VM's StreamIDs are in range.
    g.w32(off::CR0, regfile::CR0_CMDQEN | regfile::CR0_EVENTQEN);
    g.w32(off::STRTAB_BASE_CFG, 63);
    g.w32(off::CR0, 0b1101);
    assert_eq!(g.rec.ste(0x20), Some(Ste::s2(1, &g.s2)));
}

#[test]
fn enabling_loads_every_stream_and_cfgi_while_disabled_does_nothing() {
    let mut g = guest();
    g.set_ste(8, Guest::s1_ste(CDS));
    g.set_ste(0x20, Guest::bypass_ste());
    g.w64(off::STRTAB_BASE, STRTAB);
    g.w32(off::STRTAB_BASE_CFG, STRTAB_LOG2);
    g.w64(off::CMDQ_BASE, CMDQ | u64::from(CMDQ_LOG2));
    g.w32(off::CR0, regfile::CR0_CMDQEN);
    g.rec.take_log();
    g.issue(&[Command::CfgiAll, Command::sync()]);
    assert!(
        g.rec.take_log().is_empty(),
        "nothing cached while disabled, and nothing forwarded"
    );
    assert_eq!(g.rec.ste(8), Some(Ste::s2(1, &g.s2)));
    g.w32(off::CR0, regfile::CR0_CMDQEN | regfile::CR0_SMMUEN);
    assert_eq!(g.rec.ste(8), Some(g.nested(&Guest::s1_ste(CDS))));
    assert_eq!(g.rec.ste(9), Some(Ste::abort()));
    assert_eq!(g.rec.ste(0x20), Some(Ste::s2(1, &g.s2)));
    // Changing the table without CFGI: the old configuration stays (as if cached).
    g.set_ste(0x20, Ste::abort());
    g.issue(&[Command::CfgiSte { sid: 8, leaf: true }]);
    assert_eq!(g.rec.ste(0x20), Some(Ste::s2(1, &g.s2)));
    // CFGI_STE_RANGE with Range 4: 2^5 StreamIDs, 0x20..0x40, so not 8 or 9.
    g.rec.take_log();
    g.issue(&[Command::CfgiSteRange {
        sid: 0x3f,
        range: 4,
    }]);
    assert_eq!(g.rec.ste(0x20), Some(Ste::abort()));
    let written: Vec<u32> = g
        .rec
        .take_log()
        .iter()
        .filter_map(|op| match op {
            PhysOp::Ste { sid, .. } => Some(*sid),
            _ => None,
        })
        .collect();
    assert_eq!(written, [0x20]);
}

#[test]
fn tlbi_and_cfgi_cd_forwarded_with_the_vms_ids() {
    let (mut a, b) = two_guests();
    a.rec.take_log();
    let va = Command::TlbiNhVa {
        vmid: 7,
        asid: 0x1234,
        addr: 0xffff_8000_1234_5000,
        leaf: true,
        ttl: 3,
        tg: TG_4K,
        num: 3,
        scale: 1,
    };
    a.issue(&[
        Command::TlbiNhAsid { vmid: 2, asid: 5 },
        va,
        Command::TlbiNhVaa {
            vmid: 0xffff,
            addr: 0x1000,
            leaf: false,
            ttl: 0,
            tg: 0,
            num: 0,
            scale: 0,
        },
        Command::TlbiNhAll { vmid: 2 },
        Command::TlbiNsnhAll,
        Command::CfgiCd {
            sid: 9,
            ssid: 3,
            leaf: true,
        },
        Command::CfgiCdAll { sid: 0x20 },
        // Another VM's StreamID and one nobody has: dropped.
        Command::CfgiCd {
            sid: 0x10,
            ssid: 0,
            leaf: true,
        },
        Command::CfgiCdAll { sid: 0x1234 },
        Command::sync(),
    ]);
    let log = a.rec.take_log();
    let cmds: Vec<Command> = Recorder::cmds(&log)
        .into_iter()
        .map(|c| Command::decode(c).unwrap())
        .collect();
    assert_eq!(
        cmds,
        [
            Command::TlbiNhAsid { vmid: 1, asid: 5 },
            Command::TlbiNhVa {
                vmid: 1,
                asid: 0x1234,
                addr: 0xffff_8000_1234_5000,
                leaf: true,
                ttl: 3,
                tg: TG_4K,
                num: 3,
                scale: 1,
            },
            Command::TlbiNhVaa {
                vmid: 1,
                addr: 0x1000,
                leaf: false,
                ttl: 0,
                tg: 0,
                num: 0,
                scale: 0,
            },
            Command::TlbiNhAll { vmid: 1 },
            Command::TlbiNhAll { vmid: 1 },
            Command::CfgiCd {
                sid: 9,
                ssid: 0,
                leaf: true
            },
            Command::CfgiCdAll { sid: 0x20 },
        ]
    );
    assert_eq!(
        log.last(),
        Some(&PhysOp::Sync { tag: 0 }),
        "sync after the batch"
    );
    let s = a.vs.stats();
    assert_eq!(s.foreign_dropped, 2);
    assert_eq!(a.r32(off::CMDQ_CONS), a.prod);
    check_invariants(
        &a.rec,
        &[(a.vmid, a.s2, &a.sids), (b.vmid, b.s2, &b.sids)],
        &log,
    );
    // A sync with nothing forwarded does not wait for the hardware.
    a.issue(&[Command::PrefetchConfig { sid: 8 }, Command::sync()]);
    assert!(a.rec.take_log().is_empty());
}

#[test]
fn range_fields_dropped_without_ril_and_asid_cut_without_asid16() {
    let rec = Arc::new(Recorder::default());
    let mut idr = QEMU_IDR;
    idr[3] &= !(1 << 10); // RIL
    idr[0] &= !(1 << 12); // ASID16
    let mut g = Guest::with_idr(0, 3, SIDS, &rec, idr);
    g.enable();
    rec.take_log();
    g.issue(&[
        Command::TlbiNhVa {
            vmid: 0,
            asid: 0x1ff,
            addr: 0x4000,
            leaf: true,
            ttl: 2,
            tg: TG_4K,
            num: 9,
            scale: 2,
        },
        Command::sync(),
    ]);
    let cmds = Recorder::cmds(&rec.take_log());
    assert_eq!(
        Command::decode(cmds[0]).unwrap(),
        Command::TlbiNhVa {
            vmid: 3,
            asid: 0xff,
            addr: 0x4000,
            leaf: true,
            ttl: 2,
            tg: TG_4K,
            num: 0,
            scale: 0,
        }
    );
}

#[test]
fn nested_stes_disable_stalls_where_the_hardware_can_stall() {
    let rec = Arc::new(Recorder::default());
    let mut idr = QEMU_IDR;
    idr[0] &= !(0b11 << 24); // STALL_MODEL = 0b00: stall supported
    let mut g = Guest::with_idr(0, 4, SIDS, &rec, idr);
    assert_eq!(
        (g.r32(off::IDR0) >> 24) & 0b11,
        0b01,
        "the guest is still told: no stall"
    );
    g.enable();
    let ste = Guest::s1_ste(CDS);
    g.set_ste(8, ste);
    g.issue(&[Command::CfgiSte { sid: 8, leaf: true }]);
    let phys = g.rec.ste(8).unwrap();
    assert!(phys.s1_stalld());
    let mut want = g.nested(&ste);
    want.0[1] |= 1 << 27;
    assert_eq!(phys, want);
    // Without stall support (QEMU), S1STALLD stays 0 (it would be ILLEGAL).
    let mut q = guest();
    q.enable();
    q.set_ste(8, ste);
    q.issue(&[Command::CfgiSte { sid: 8, leaf: true }]);
    assert!(!q.rec.ste(8).unwrap().s1_stalld());
    check_invariants(&rec, &[(4, g.s2, SIDS)], &rec.take_log());
}

#[test]
fn illegal_commands_stop_the_queue_until_acknowledged() {
    let forbidden = [
        Command::TlbiS2Ipa {
            vmid: 1,
            addr: 0x1000,
            leaf: true,
            ttl: 0,
            tg: 0,
            num: 0,
            scale: 0,
        },
        Command::TlbiS12Vmall { vmid: 1 },
        Command::TlbiEl2All,
        Command::TlbiEl2Asid { asid: 1 },
        Command::AtcInv {
            sid: 8,
            ssid: None,
            global: false,
            addr: 0,
            size: 0,
        },
        Command::Resume {
            sid: 8,
            stag: 0,
            resp: 0,
        },
        Command::StallTerm { sid: 8 },
    ];
    for bad in forbidden {
        let (mut a, b) = two_guests();
        a.rec.take_log();
        let gerrors = a.irq.gerror.load(Ordering::Relaxed);
        let start = a.prod;
        a.issue(&[
            Command::TlbiNhAll { vmid: 0 },
            bad,
            Command::TlbiNhAsid { vmid: 0, asid: 1 },
            Command::sync(),
        ]);
        // Stopped at the bad command, CERROR_ILL, GERROR.CMDQ_ERR active.
        assert_eq!(
            a.r32(off::CMDQ_CONS),
            (start + 1) | (u32::from(CERROR_ILL) << 24),
            "{bad:?}"
        );
        assert_eq!(a.r32(off::GERROR) ^ a.r32(off::GERRORN), 1);
        assert_eq!(a.irq.gerror.load(Ordering::Relaxed), gerrors + 1);
        assert_eq!(a.vs.stats().commands_rejected, 1);
        // What came before was forwarded, nothing after.
        let cmds = Recorder::cmds(&a.rec.take_log());
        assert_eq!(cmds, [Command::TlbiNhAll { vmid: 1 }.encode()]);
        // More PROD writes do nothing while the error is active.
        a.issue(&[Command::sync()]);
        assert_eq!(cons_err(&a), u32::from(CERROR_ILL));
        assert_eq!(a.r32(off::CMDQ_CONS) & 0xfffff, start + 1);
        // Linux's recovery: replace the bad command with a CMD_SYNC, acknowledge in GERRORN.
        let q = Queue::from_base(CMDQ | u64::from(CMDQ_LOG2), 16, 19);
        a.mem
            .poke_u64s(q.entry_addr(start + 1), &Command::sync().encode());
        a.w32(off::GERRORN, a.r32(off::GERROR));
        assert_eq!(
            a.r32(off::CMDQ_CONS) & 0xfffff,
            a.prod,
            "resumed to the end"
        );
        let log = a.rec.take_log();
        assert_eq!(
            Recorder::cmds(&log),
            [Command::TlbiNhAsid { vmid: 1, asid: 1 }.encode()]
        );
        check_invariants(
            &a.rec,
            &[(a.vmid, a.s2, &a.sids), (b.vmid, b.s2, &b.sids)],
            &log,
        );
    }
}

#[test]
fn garbage_and_unreadable_command_queues() {
    let (mut a, b) = two_guests();
    // Reserved opcodes, SSec, CS = 0b11: all ILLEGAL.
    for raw in [
        [0u64, 0],
        [0xff, 0],
        [0x46 | (3 << 12), 0],
        [0x10 | (1 << 10), 0],
    ] {
        let start = a.r32(off::CMDQ_CONS) & 0xfffff;
        a.issue_raw(&[raw]);
        assert_eq!(cons_err(&a), u32::from(CERROR_ILL), "{raw:x?}");
        assert_eq!(a.r32(off::CMDQ_CONS) & 0xfffff, start);
        // Skip it: overwrite with a prefetch and acknowledge.
        let q = Queue::from_base(CMDQ | u64::from(CMDQ_LOG2), 16, 19);
        a.mem.poke_u64s(
            q.entry_addr(start),
            &Command::PrefetchConfig { sid: 0 }.encode(),
        );
        a.w32(off::GERRORN, a.r32(off::GERROR));
        assert_eq!(a.r32(off::CMDQ_CONS) & 0xfffff, a.prod);
    }
    // A command queue in a hole: CERROR_ABT.
    a.w32(off::CR0, regfile::CR0_SMMUEN);
    a.w64(off::CMDQ_BASE, HOLE.0 | 2);
    a.w32(off::CMDQ_CONS, 0);
    a.w32(off::CR0, regfile::CR0_SMMUEN | regfile::CR0_CMDQEN);
    a.w32(off::CMDQ_PROD, 1);
    assert_eq!(a.r32(off::CMDQ_CONS), u32::from(CERROR_ABT) << 24);
    // A PROD far from CONS on a tiny queue still terminates (two laps at most).
    a.w32(off::CR0, regfile::CR0_SMMUEN);
    a.w64(off::CMDQ_BASE, CMDQ | 1);
    a.w32(off::CMDQ_CONS, 0);
    a.w32(off::GERRORN, a.r32(off::GERROR));
    a.mem.poke_u64s(CMDQ, &[0x01, 0, 0x01, 0]);
    a.w32(off::CR0, regfile::CR0_SMMUEN | regfile::CR0_CMDQEN);
    a.w32(off::CMDQ_PROD, 0xf_ffff);
    assert_eq!(a.r32(off::CMDQ_CONS), 0b11);
    check(&a, &b);
}

#[test]
fn event_queue_overflow_and_abort() {
    let mut g = guest();
    g.enable();
    let size = 1u32 << EVTQ_LOG2;
    let irqs = g.irq.eventq.load(Ordering::Relaxed);
    for i in 0..size {
        assert!(g.vs.inject_event(Event::bad_ste(8)), "event {i}");
    }
    assert_eq!(g.irq.eventq.load(Ordering::Relaxed), irqs + size as usize);
    // Full: dropped, OVFLG toggles once.
    assert!(!g.vs.inject_event(Event::bad_ste(9)));
    assert!(!g.vs.inject_event(Event::bad_ste(9)));
    let prod = g.r32(off::EVENTQ_PROD);
    assert_eq!(prod, size | Q_OVF);
    let ev = g.events();
    assert_eq!(ev.len(), size as usize);
    assert!(ev.iter().all(|e| *e == Event::bad_ste(8)));
    // The guest acknowledged the overflow with OVACKFLG; the next overflow toggles it back.
    assert_eq!(g.r32(off::EVENTQ_CONS), size | Q_OVF);
    for _ in 0..size {
        assert!(g.vs.inject_event(Event::bad_streamid(0x20)));
    }
    assert!(!g.vs.inject_event(Event::bad_streamid(0x20)));
    assert_eq!(g.r32(off::EVENTQ_PROD) & Q_OVF, 0);
    let s = g.vs.stats();
    assert_eq!(
        (s.events_injected, s.events_dropped),
        (2 * u64::from(size), 3)
    );
    // Events for StreamIDs that are not the VM's, or with the queue or SMMU disabled: dropped.
    g.events();
    assert!(!g.vs.inject_event(Event::bad_ste(0x10)));
    g.w32(off::CR0, 0b1001);
    assert!(!g.vs.inject_event(Event::bad_ste(8)));
    // Queue memory not writable: GERROR.EVENTQ_ABT_ERR, once until acknowledged.
    g.w64(off::EVENTQ_BASE, HOLE.0 | 4);
    g.w32(off::CR0, 0b1101);
    let gerrors = g.irq.gerror.load(Ordering::Relaxed);
    assert!(!g.vs.inject_event(Event::bad_ste(8)));
    assert!(!g.vs.inject_event(Event::bad_ste(8)));
    assert_eq!(g.r32(off::GERROR) ^ g.r32(off::GERRORN), 1 << 2);
    assert_eq!(g.irq.gerror.load(Ordering::Relaxed), gerrors + 1);
}

#[test]
fn cmd_sync_interrupt() {
    let mut g = guest();
    g.enable();
    let n = g.irq.cmd_sync.load(Ordering::Relaxed);
    g.issue(&[Command::Sync {
        cs: SYNC_CS_IRQ,
        msh: 0,
        msiattr: 0,
        msidata: 0,
        msiaddr: 0,
    }]);
    assert_eq!(g.irq.cmd_sync.load(Ordering::Relaxed), n + 1);
    g.issue(&[Command::sync()]);
    assert_eq!(g.irq.cmd_sync.load(Ordering::Relaxed), n + 1);
}

#[test]
fn a_tlbi_sync_batch_costs_one_prod_write_and_one_cons_read() {
    let mut g = guest();
    g.enable();
    let q = Queue::from_base(CMDQ | u64::from(CMDQ_LOG2), 16, 19);
    let before = g.vs.stats();
    for round in 0..300u64 {
        // A Linux-like driver: write the TLBIs and the sync, publish PROD once, poll CONS until
        // it has passed the sync.
        let cmds = [
            Command::TlbiNhVa {
                vmid: 0,
                asid: 1,
                addr: round << 12,
                leaf: true,
                ttl: 0,
                tg: 0,
                num: 0,
                scale: 0,
            },
            Command::TlbiNhVa {
                vmid: 0,
                asid: 1,
                addr: (round + 1) << 12,
                leaf: true,
                ttl: 0,
                tg: 0,
                num: 0,
                scale: 0,
            },
            Command::sync(),
        ];
        for c in cmds {
            g.mem.poke_u64s(q.entry_addr(g.prod), &c.encode());
            g.prod = q.inc(g.prod);
        }
        g.w32(off::CMDQ_PROD, g.prod);
        let mut polls = 0;
        loop {
            polls += 1;
            let cons = g.r32(off::CMDQ_CONS);
            if q.is_empty(g.prod, cons) {
                break;
            }
            assert!(polls < 10);
        }
    }
    let s = g.vs.stats();
    assert_eq!(s.prod_writes - before.prod_writes, 300);
    assert_eq!(s.cons_reads - before.cons_reads, 300);
    assert_eq!(s.other_reads, before.other_reads);
    assert_eq!(s.other_writes, before.other_writes);
    assert_eq!(s.commands_forwarded - before.commands_forwarded, 600);
    assert_eq!(s.phys_syncs - before.phys_syncs, 300);
}

#[test]
fn physical_failures_are_counted_not_fatal() {
    let mut g = guest();
    g.enable();
    g.rec.fail.store(true, Ordering::Relaxed);
    g.issue(&[Command::TlbiNhAll { vmid: 0 }, Command::sync()]);
    g.issue(&[Command::CfgiSte { sid: 8, leaf: true }]);
    assert_eq!(g.r32(off::CMDQ_CONS), g.prod);
    assert_eq!(g.vs.stats().phys_errors, 3);
    g.rec.fail.store(false, Ordering::Relaxed);
}

#[test]
fn a_new_cmdq_base_is_only_used_once_the_queue_is_enabled() {
    let mut g = guest();
    g.enable();
    g.issue(&[Command::TlbiNhAll { vmid: 0 }]);
    // Disabled: PROD writes are stored, nothing runs; enabling runs what is there.
    g.w32(off::CR0, regfile::CR0_SMMUEN);
    let cons = g.r32(off::CMDQ_CONS);
    g.rec.take_log();
    g.issue(&[Command::TlbiNhAsid { vmid: 0, asid: 9 }]);
    assert_eq!(g.r32(off::CMDQ_CONS), cons);
    assert!(g.rec.take_log().is_empty());
    g.w32(off::CR0, regfile::CR0_SMMUEN | regfile::CR0_CMDQEN);
    assert_eq!(g.r32(off::CMDQ_CONS), g.prod);
    assert_eq!(
        Recorder::cmds(&g.rec.take_log()),
        [Command::TlbiNhAsid { vmid: 1, asid: 9 }.encode()]
    );
}

#[test]
fn reset_returns_to_gbpa_bypass() {
    let mut g = guest();
    g.enable();
    g.set_ste(8, Guest::s1_ste(CDS));
    g.issue(&[
        Command::CfgiSte { sid: 8, leaf: true },
        Command::TlbiNhAll { vmid: 0 },
    ]);
    assert_eq!(g.rec.ste(8).unwrap().config(), SteConfig::Nested);
    g.rec.take_log();
    g.vs.reset();
    let log = g.rec.take_log();
    assert_eq!(
        log[0],
        PhysOp::Sync { tag: 0 },
        "outstanding work completed first"
    );
    for &sid in SIDS {
        assert_eq!(g.rec.ste(sid), Some(Ste::s2(1, &g.s2)));
    }
    assert_eq!(g.r32(off::CR0), 0);
    assert_eq!(g.r32(off::GBPA), 0x1000);
    assert_eq!(g.r64(off::STRTAB_BASE), 0);
    assert_eq!(g.r32(off::CMDQ_CONS), 0);
}
