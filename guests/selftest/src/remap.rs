//! Stage-2 changes while the guest runs: the hypervisor's test hypercalls unmap part of this VM's
//! RAM from its stage 2 and map it back. The guest checks that an access to an unmapped page takes
//! an abort at exactly that address (so the hypervisor really invalidated the CPU's TLBs, which
//! held the translation a moment before), that the rest of a split 2 MiB block stays mapped, and
//! that after the remap the page holds what it held before (same backing memory).

use core::ptr::{read_volatile, write_volatile};

use crate::checks::{expect_sea, probe_read};
use crate::dt::DtInfo;
use crate::psci::{self, Conduit};
use crate::report::{ensure, fail};

/// Vendor-specific hypervisor service calls (SMCCC owner 6, fast, SMC64).
const HYP_TEST_UNMAP: u32 = 0xc600_0001;
const HYP_TEST_MAP: u32 = 0xc600_0002;
const NOT_SUPPORTED: i32 = -1;
const INVALID_PARAMETERS: i32 = -2;
const BLOCK: usize = 2 << 20;
const PAGE: usize = 4096;

fn hypercall(fid: u32, ipa: usize, size: usize) -> i32 {
    // SAFETY: the call changes only this VM's stage 2 for RAM the checks below own (above the
    // image, nothing Rust uses); x0..x3 are declared clobbered by `call_raw`.
    psci::status(unsafe { psci::call_raw(Conduit::Hvc, fid, ipa as u64, size as u64, 0) })
}

/// Writes `seed ^ address` to every word, so any part can be verified on its own.
fn fill(addr: usize, len: usize, seed: u64) {
    for off in (0..len).step_by(8) {
        // SAFETY: `addr..addr+len` is this guest's RAM above its image, used only by this check.
        unsafe { write_volatile((addr + off) as *mut u64, seed ^ (addr + off) as u64) };
    }
}

fn verify(addr: usize, len: usize, seed: u64) -> Result<(), usize> {
    for off in (0..len).step_by(8) {
        // SAFETY: as in `fill`.
        let v = unsafe { read_volatile((addr + off) as *const u64) };
        if v != seed ^ (addr + off) as u64 {
            return Err(addr + off);
        }
    }
    Ok(())
}

/// Returns `Ok(true)` when the check ran, `Ok(false)` when the hypervisor does not offer the
/// test hypercalls (the check is then skipped).
pub fn stage2_remap(dt: &DtInfo) -> Result<bool, crate::report::Msg> {
    let Some((base, size)) = dt.ram else {
        fail!("no /memory region")
    };
    let (_, image_end) = crate::boot::image_range();
    // Two 2 MiB blocks well above the image and below the top of RAM.
    let block_a = (image_end + 2 * BLOCK).next_multiple_of(BLOCK);
    let block_b = block_a + BLOCK;
    ensure!(
        block_b + BLOCK <= base + size,
        "RAM too small for the remap check"
    );

    // Outside RAM: refused, or not offered at all.
    match hypercall(HYP_TEST_UNMAP, base + size, PAGE) {
        NOT_SUPPORTED => return Ok(false),
        INVALID_PARAMETERS => {}
        r => fail!("unmap outside RAM returned {r}, want INVALID_PARAMETERS"),
    }
    ensure!(
        hypercall(HYP_TEST_UNMAP, block_a + 1, PAGE) == INVALID_PARAMETERS,
        "an unaligned unmap was accepted"
    );

    fill(block_a, BLOCK, 0xa5a5_0000_1111_2222);
    fill(block_b, BLOCK, 0x5a5a_3333_0000_4444);

    // One page out of the middle of a block: the block is split, the page aborts, its
    // neighbours stay mapped.
    let page = block_a + 5 * PAGE;
    // Touch the page right before the unmap so the CPU's TLB holds its translation: the abort
    // below then proves the hypervisor invalidated it.
    ensure!(
        verify(page, PAGE, 0xa5a5_0000_1111_2222).is_ok(),
        "fill of {page:#x} did not stick"
    );
    ensure!(
        hypercall(HYP_TEST_UNMAP, page, PAGE) == 0,
        "unmap of one page failed"
    );
    expect_sea(probe_read(page as u64).0, page as u64)?;
    if let Err(at) = verify(page + PAGE, BLOCK - 6 * PAGE, 0xa5a5_0000_1111_2222).and(verify(
        block_a,
        5 * PAGE,
        0xa5a5_0000_1111_2222,
    )) {
        fail!("after the split, {at:#x} lost its contents");
    }
    ensure!(
        hypercall(HYP_TEST_MAP, page, PAGE) == 0,
        "remap of one page failed"
    );
    if let Err(at) = verify(block_a, BLOCK, 0xa5a5_0000_1111_2222) {
        fail!("after the remap, {at:#x} lost its contents");
    }

    // A whole block: unmapped entirely, every page aborts; remapped with its contents.
    for probe in [block_b, block_b + BLOCK / 2, block_b + BLOCK - PAGE] {
        ensure!(
            verify(probe, 8, 0x5a5a_3333_0000_4444).is_ok(),
            "fill of {probe:#x} did not stick"
        );
    }
    ensure!(
        hypercall(HYP_TEST_UNMAP, block_b, BLOCK) == 0,
        "unmap of a 2 MiB block failed"
    );
    for probe in [block_b, block_b + BLOCK / 2, block_b + BLOCK - PAGE] {
        expect_sea(probe_read(probe as u64).0, probe as u64)?;
    }
    if let Err(at) = verify(block_a, BLOCK, 0xa5a5_0000_1111_2222) {
        fail!("unmapping the next block changed {at:#x}");
    }
    ensure!(
        hypercall(HYP_TEST_MAP, block_b, BLOCK) == 0,
        "remap of the block failed"
    );
    ensure!(
        hypercall(HYP_TEST_MAP, block_b, BLOCK) != 0,
        "mapping over a mapped block was accepted"
    );
    if let Err(at) = verify(block_b, BLOCK, 0x5a5a_3333_0000_4444) {
        fail!("after the block remap, {at:#x} lost its contents");
    }
    Ok(true)
}
