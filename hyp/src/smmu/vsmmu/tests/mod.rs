//! Host tests of the emulated SMMU against a fake guest memory (with holes) and a fake physical
//! SMMU that records every STE and command. [`fuzz`] drives it randomly and checks the isolation
//! invariants after every step.

extern crate std;

mod fuzz;
mod unit;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::vec;
use std::vec::Vec;

use alloc::sync::Arc;

use super::*;
use crate::smmu::v3::cmd::{Command, op};
use crate::smmu::v3::event::{EVENT_BYTES, Event};
use crate::smmu::v3::regs::off;
use crate::smmu::v3::ste::{S1Fields, S2Config, Ste, SteConfig};

/// QEMU 10 virt's nested SMMUv3 ID registers (shared/reference/qemu-virt.md §1).
pub(super) const QEMU_IDR: [u32; 6] = [0x0d44_101b, 0x0273_0010, 0, 0x1414, 0, 0x74];

/// A VM's RAM: `base..base + len`, minus the holes (unmapped in its stage 2).
pub(super) struct FakeMem {
    base: u64,
    bytes: Mutex<Vec<u8>>,
    holes: Vec<(u64, u64)>,
}

impl FakeMem {
    pub(super) fn new(base: u64, len: usize, holes: &[(u64, u64)]) -> Arc<FakeMem> {
        Arc::new(FakeMem {
            base,
            bytes: Mutex::new(vec![0; len]),
            holes: holes.to_vec(),
        })
    }

    /// Offset of `ipa..ipa + len` in the backing store, if it is all mapped.
    fn range(&self, ipa: u64, len: usize) -> Result<usize, GuestMemError> {
        let size = self.bytes.lock().unwrap().len() as u64;
        let end = ipa
            .checked_add(len as u64)
            .ok_or(GuestMemError::Unmapped { ipa })?;
        if ipa < self.base || end > self.base + size {
            return Err(GuestMemError::Unmapped { ipa });
        }
        if self.holes.iter().any(|&(s, e)| ipa < e && end > s) {
            return Err(GuestMemError::Unmapped { ipa });
        }
        Ok((ipa - self.base) as usize)
    }

    /// The guest CPU writing its memory (must be mapped).
    pub(super) fn poke(&self, ipa: u64, data: &[u8]) {
        let at = self.range(ipa, data.len()).expect("poke outside RAM");
        self.bytes.lock().unwrap()[at..at + data.len()].copy_from_slice(data);
    }

    pub(super) fn poke_u64s(&self, ipa: u64, words: &[u64]) {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        self.poke(ipa, &bytes);
    }

    pub(super) fn peek_u64s(&self, ipa: u64, n: usize) -> Vec<u64> {
        let at = self.range(ipa, n * 8).expect("peek outside RAM");
        let b = self.bytes.lock().unwrap();
        b[at..at + n * 8]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

impl GuestMemory for FakeMem {
    fn read(&self, ipa: u64, buf: &mut [u8]) -> Result<(), GuestMemError> {
        let at = self.range(ipa, buf.len())?;
        buf.copy_from_slice(&self.bytes.lock().unwrap()[at..at + buf.len()]);
        Ok(())
    }

    fn write(&self, ipa: u64, buf: &[u8]) -> Result<(), GuestMemError> {
        let at = self.range(ipa, buf.len())?;
        self.bytes.lock().unwrap()[at..at + buf.len()].copy_from_slice(buf);
        Ok(())
    }
}

/// What a fake physical SMMU was asked to do, by which VM (`tag`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum PhysOp {
    Ste { tag: usize, sid: u32, ste: Ste },
    Cmds { tag: usize, cmds: Vec<[u64; 2]> },
    Sync { tag: usize },
}

/// The state of the one physical SMMU that every fake handle shares.
#[derive(Default)]
pub(super) struct Recorder {
    pub stes: Mutex<BTreeMap<u32, Ste>>,
    pub log: Mutex<Vec<PhysOp>>,
    /// Make every call fail.
    pub fail: AtomicBool,
}

impl Recorder {
    pub(super) fn take_log(&self) -> Vec<PhysOp> {
        core::mem::take(&mut *self.log.lock().unwrap())
    }

    pub(super) fn ste(&self, sid: u32) -> Option<Ste> {
        self.stes.lock().unwrap().get(&sid).copied()
    }

    /// Forwarded commands (not syncs or STE writes), in order.
    pub(super) fn cmds(log: &[PhysOp]) -> Vec<[u64; 2]> {
        log.iter()
            .flat_map(|op| match op {
                PhysOp::Cmds { cmds, .. } => cmds.clone(),
                _ => Vec::new(),
            })
            .collect()
    }
}

/// One VM's handle on the shared fake physical SMMU.
pub(super) struct FakePhys {
    pub tag: usize,
    pub idr: [u32; 6],
    pub rec: Arc<Recorder>,
}

impl FakePhys {
    fn check(&self) -> Result<(), PhysError> {
        if self.rec.fail.load(Ordering::Relaxed) {
            Err(PhysError::Timeout)
        } else {
            Ok(())
        }
    }
}

impl PhysSmmu for FakePhys {
    fn write_ste(&self, sid: u32, ste: Ste) -> Result<(), PhysError> {
        self.check()?;
        self.rec.stes.lock().unwrap().insert(sid, ste);
        self.rec.log.lock().unwrap().push(PhysOp::Ste {
            tag: self.tag,
            sid,
            ste,
        });
        Ok(())
    }

    fn submit(&self, cmds: &[[u64; 2]]) -> Result<(), PhysError> {
        self.check()?;
        self.rec.log.lock().unwrap().push(PhysOp::Cmds {
            tag: self.tag,
            cmds: cmds.to_vec(),
        });
        Ok(())
    }

    fn sync(&self) -> Result<(), PhysError> {
        self.check()?;
        self.rec
            .log
            .lock()
            .unwrap()
            .push(PhysOp::Sync { tag: self.tag });
        Ok(())
    }

    fn idr(&self) -> [u32; 6] {
        self.idr
    }

    fn iidr(&self) -> u32 {
        0x0000_043b
    }

    fn aidr(&self) -> u32 {
        1
    }
}

/// Counts interrupts.
#[derive(Default)]
pub(super) struct FakeIrq {
    pub eventq: AtomicUsize,
    pub gerror: AtomicUsize,
    pub cmd_sync: AtomicUsize,
}

impl VsmmuIrq for FakeIrq {
    fn eventq(&self) {
        self.eventq.fetch_add(1, Ordering::Relaxed);
    }
    fn gerror(&self) {
        self.gerror.fetch_add(1, Ordering::Relaxed);
    }
    fn cmd_sync(&self) {
        self.cmd_sync.fetch_add(1, Ordering::Relaxed);
    }
}

/// Guest RAM and where the test guest puts its structures.
pub(super) const RAM: u64 = 0x8000_0000;
pub(super) const RAM_LEN: usize = 4 << 20;
pub(super) const STRTAB: u64 = RAM;
pub(super) const L2_TABLES: u64 = RAM + 0x10_0000;
pub(super) const CMDQ: u64 = RAM + 0x20_0000;
pub(super) const EVTQ: u64 = RAM + 0x21_0000;
pub(super) const CDS: u64 = RAM + 0x30_0000;
/// Unmapped in the VM's stage 2.
pub(super) const HOLE: (u64, u64) = (RAM + 0x38_0000, RAM + 0x39_0000);
pub(super) const CMDQ_LOG2: u32 = 8;
pub(super) const EVTQ_LOG2: u32 = 4;
pub(super) const STRTAB_LOG2: u32 = 8;

/// The stage 2 of test VM `vmid`.
pub(super) fn s2_of(vmid: u16) -> S2Config {
    S2Config::for_table(0x4_0000_0000 + (u64::from(vmid) << 20), 40, 1, 44)
}

/// A test VM with its emulated SMMU, driven like a guest driver would.
pub(super) struct Guest {
    pub vmid: u16,
    pub s2: S2Config,
    pub sids: Vec<u32>,
    pub mem: Arc<FakeMem>,
    pub rec: Arc<Recorder>,
    pub irq: Arc<FakeIrq>,
    pub vs: VSmmu,
    /// The driver's copy of CMDQ_PROD and EVENTQ_CONS.
    pub prod: u32,
    pub ev_cons: u32,
}

impl Guest {
    pub(super) fn new(tag: usize, vmid: u16, sids: &[u32], rec: &Arc<Recorder>) -> Guest {
        Guest::with_idr(tag, vmid, sids, rec, QEMU_IDR)
    }

    pub(super) fn with_idr(
        tag: usize,
        vmid: u16,
        sids: &[u32],
        rec: &Arc<Recorder>,
        idr: [u32; 6],
    ) -> Guest {
        let mem = FakeMem::new(RAM, RAM_LEN, &[HOLE]);
        let irq = Arc::new(FakeIrq::default());
        let phys = Arc::new(FakePhys {
            tag,
            idr,
            rec: rec.clone(),
        });
        let s2 = s2_of(vmid);
        let vs = VSmmu::new(vmid, s2, sids, mem.clone(), phys, irq.clone());
        Guest {
            vmid,
            s2,
            sids: sids.to_vec(),
            mem,
            rec: rec.clone(),
            irq,
            vs,
            prod: 0,
            ev_cons: 0,
        }
    }

    pub(super) fn r32(&self, offset: u64) -> u32 {
        self.vs.read(0, offset, 4).unwrap() as u32
    }

    pub(super) fn w32(&self, offset: u64, v: u32) {
        self.vs.write(0, offset, 4, v.into()).unwrap();
    }

    pub(super) fn r64(&self, offset: u64) -> u64 {
        self.vs.read(0, offset, 8).unwrap()
    }

    pub(super) fn w64(&self, offset: u64, v: u64) {
        self.vs.write(0, offset, 8, v).unwrap();
    }

    /// Programs a linear stream table of 2^STRTAB_LOG2 entries, the queues and the interrupts,
    /// and enables everything, in the order Linux does (commands issued on the way).
    pub(super) fn enable(&mut self) {
        self.w32(off::CR0, 0);
        self.w32(off::CR1, 0xd75);
        self.w32(off::CR2, 0b110);
        self.w64(off::STRTAB_BASE, STRTAB | (1 << 62));
        self.w32(off::STRTAB_BASE_CFG, STRTAB_LOG2);
        self.w64(off::CMDQ_BASE, CMDQ | u64::from(CMDQ_LOG2));
        self.w32(off::CMDQ_PROD, 0);
        self.w32(off::CMDQ_CONS, 0);
        self.prod = 0;
        self.w32(off::CR0, regfile::CR0_CMDQEN);
        self.issue(&[Command::CfgiAll, Command::sync()]);
        self.issue(&[Command::TlbiNsnhAll, Command::sync()]);
        self.w64(off::EVENTQ_BASE, EVTQ | u64::from(EVTQ_LOG2));
        self.w32(off::EVENTQ_PROD, 0);
        self.w32(off::EVENTQ_CONS, 0);
        self.ev_cons = 0;
        self.w32(off::CR0, regfile::CR0_CMDQEN | regfile::CR0_EVENTQEN);
        self.w32(off::IRQ_CTRL, 0b101);
        self.w32(
            off::CR0,
            regfile::CR0_CMDQEN | regfile::CR0_EVENTQEN | regfile::CR0_SMMUEN,
        );
    }

    /// Writes raw commands at PROD, then PROD.
    pub(super) fn issue_raw(&mut self, cmds: &[[u64; 2]]) {
        let q = Queue::from_base(CMDQ | u64::from(CMDQ_LOG2), 16, 19);
        for c in cmds {
            self.mem.poke_u64s(q.entry_addr(self.prod), c);
            self.prod = q.inc(self.prod);
        }
        self.w32(off::CMDQ_PROD, self.prod);
    }

    pub(super) fn issue(&mut self, cmds: &[Command]) {
        let raw: Vec<[u64; 2]> = cmds.iter().map(Command::encode).collect();
        self.issue_raw(&raw);
    }

    /// The STE slot of `sid` in the linear table.
    pub(super) fn set_ste(&self, sid: u32, ste: Ste) {
        self.mem.poke_u64s(STRTAB + u64::from(sid) * 64, &ste.0);
    }

    /// A guest stage-1 STE whose CD is at `cd`.
    pub(super) fn s1_ste(cd: u64) -> Ste {
        let mut ste = Ste::invalid();
        ste.0[0] = 1 | (u64::from(SteConfig::S1Trans.bits()) << 1) | (cd & 0x000f_ffff_ffff_ffc0);
        // S1CIR/S1COR = WBWA, S1CSH = ISH.
        ste.0[1] = 0b11_01_01 << 2;
        ste
    }

    pub(super) fn bypass_ste() -> Ste {
        let mut ste = Ste::invalid();
        ste.0[0] = 1 | (u64::from(SteConfig::Bypass.bits()) << 1);
        ste
    }

    /// The events the guest's queue holds, consumed.
    pub(super) fn events(&mut self) -> Vec<Event> {
        let q = Queue::from_base(EVTQ | u64::from(EVTQ_LOG2), EVENT_BYTES as u64, 19);
        let prod = self.r32(off::EVENTQ_PROD);
        let mut out = Vec::new();
        while !q.is_empty(prod, self.ev_cons) {
            let w = self.mem.peek_u64s(q.entry_addr(self.ev_cons), 4);
            out.push(Event::decode([w[0], w[1], w[2], w[3]]));
            self.ev_cons = q.inc(self.ev_cons);
        }
        self.w32(off::EVENTQ_CONS, self.ev_cons | (prod & Q_OVF));
        out
    }

    /// The nested physical STE a valid guest S1 STE of this VM becomes.
    pub(super) fn nested(&self, guest: &Ste) -> Ste {
        let mut s1 = S1Fields::from_guest(guest);
        s1.fmt = 0;
        s1.cd_max = 0;
        s1.dss = 0;
        Ste::nested(self.vmid, &self.s2, &s1)
    }
}

/// The isolation invariant: every physical STE is abort, stage 2 only or nested, and a
/// translating one carries its owner's VMID and stage 2; STEs and commands come only from the
/// VM that owns the StreamID; no forwarded command has a forbidden opcode or another VMID.
/// `vms[tag]` = (VMID, stage 2, StreamIDs) of the VM whose fake handle has that tag.
pub(super) fn check_invariants(rec: &Recorder, vms: &[(u16, S2Config, &[u32])], log: &[PhysOp]) {
    let owner = |sid: u32| vms.iter().position(|(_, _, sids)| sids.contains(&sid));
    for (&sid, ste) in rec.stes.lock().unwrap().iter() {
        let tag = owner(sid).unwrap_or_else(|| panic!("STE for unowned StreamID {sid:#x}"));
        check_ste(ste, vms[tag].0, &vms[tag].1);
    }
    for op in log {
        match op {
            PhysOp::Ste { tag, sid, ste } => {
                assert_eq!(
                    owner(*sid),
                    Some(*tag),
                    "STE of {sid:#x} written by VM {tag}"
                );
                check_ste(ste, vms[*tag].0, &vms[*tag].1);
            }
            PhysOp::Cmds { tag, cmds } => {
                for raw in cmds {
                    let cmd = Command::decode(*raw).expect("forwarded command decodes");
                    assert_eq!(cmd.encode(), *raw, "forwarded command is canonical");
                    let vmid = vms[*tag].0;
                    match cmd {
                        Command::CfgiCd { sid, ssid, .. } => {
                            assert_eq!(owner(sid), Some(*tag), "{cmd:?}");
                            assert_eq!(ssid, 0);
                        }
                        Command::CfgiCdAll { sid } => assert_eq!(owner(sid), Some(*tag), "{cmd:?}"),
                        Command::TlbiNhAll { vmid: v }
                        | Command::TlbiNhAsid { vmid: v, .. }
                        | Command::TlbiNhVa { vmid: v, .. }
                        | Command::TlbiNhVaa { vmid: v, .. } => assert_eq!(v, vmid, "{cmd:?}"),
                        other => panic!("forbidden command forwarded: {other:?}"),
                    }
                }
            }
            PhysOp::Sync { .. } => {}
        }
    }
}

fn check_ste(ste: &Ste, vmid: u16, s2: &S2Config) {
    if *ste == Ste::abort() {
        return;
    }
    assert!(ste.valid(), "{ste:x?}");
    let s2_only = Ste::s2(vmid, s2);
    match ste.config() {
        SteConfig::S2Trans => assert_eq!(*ste, s2_only),
        SteConfig::Nested => {
            assert_eq!(ste.s2_vmid(), vmid);
            assert_eq!(ste.s2_ttb(), s2.ttb);
            assert_eq!(ste.s2_config(), *s2);
            // Everything but the stage-1 fields is the stage-2-only STE's.
            assert_eq!(ste.0[2..], s2_only.0[2..]);
            // Dword 1: stage-1 CD fetch attributes and S1STALLD may differ.
            assert_eq!(ste.0[1] & !0xff & !(1 << 27), s2_only.0[1] & !0xff);
            assert_eq!(ste.s1_cd_max(), 0);
            assert_eq!(ste.s1_fmt(), 0);
            let mut rebuilt = Ste::nested(vmid, s2, &ste.s1_fields());
            rebuilt.0[1] |= ste.0[1] & (1 << 27);
            assert_eq!(rebuilt, *ste);
        }
        other => panic!("physical STE with Config {other:?}: {ste:x?}"),
    }
}

/// Opcodes the guest may issue that are never forwarded as they are.
pub(super) const FORBIDDEN: &[u8] = &[
    op::TLBI_EL2_ALL,
    op::TLBI_EL2_ASID,
    op::TLBI_EL2_VA,
    op::TLBI_EL2_VAA,
    op::TLBI_S12_VMALL,
    op::TLBI_S2_IPA,
    op::TLBI_NSNH_ALL,
    op::ATC_INV,
    op::PRI_RESP,
    op::RESUME,
    op::STALL_TERM,
];
