//! A writer (and a small reader) for the "newc" cpio format, which is what the Linux kernel
//! unpacks as an initramfs.
//!
//! We write the archive ourselves because the `cpio` tool is not installed by default on the
//! machines this project runs on, and the format is small: every entry is a 110-byte ASCII
//! header (`070701` and thirteen 8-digit hex fields), the NUL-terminated name padded so that
//! header + name is a multiple of 4 bytes, then the data padded to a multiple of 4. The archive
//! ends with an entry named `TRAILER!!!`.
//!
//! Output is deterministic (same input, same bytes): inode numbers count up from 1 in the order
//! entries are added, every entry is owned by root, and every mtime is [`MTIME`]. That keeps the
//! initramfs (and so a test run) reproducible, and lets a cache compare archives byte for byte.

use anyhow::{Context, Result, bail, ensure};

/// Magic of the newc format (no checksums; the "crc" format 070702 would need them).
const MAGIC: &[u8; 6] = b"070701";
/// Header length: the magic and 13 fields of 8 hex digits.
const HEADER_LEN: usize = 6 + 13 * 8;
/// Name of the entry that ends an archive.
const TRAILER: &str = "TRAILER!!!";
/// The mtime of every entry. Fixed so that archives are reproducible; the kernel copies it to
/// the unpacked files, where nothing looks at it.
pub const MTIME: u32 = 0;

/// File type bits of `mode` (as in `st_mode`).
const S_IFMT: u32 = 0o170_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File(Vec<u8>),
    /// The link target.
    Symlink(String),
    /// A character device: major, minor.
    CharDev(u32, u32),
}

/// One entry, as [`list`] reads it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the archive, without a leading `/` (`bin/busybox`).
    pub path: String,
    /// Permission bits only (`0o755`); the type is in `kind`.
    pub perm: u32,
    pub kind: Kind,
    pub ino: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
}

/// Builds a newc archive in memory.
pub struct Writer {
    out: Vec<u8>,
    next_ino: u32,
    names: std::collections::BTreeSet<String>,
}

impl Default for Writer {
    fn default() -> Self {
        Self::new()
    }
}

/// Appends zero bytes until `out.len()` is a multiple of 4 (newc aligns names and data to 4).
fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Checks a path and returns it without a leading `/`. The kernel creates entries in archive
/// order and does not make missing parents, so callers add directories first; `..` and empty
/// components are refused because they would escape or confuse the unpacked tree.
fn clean(path: &str) -> Result<String> {
    let p = path.trim_start_matches('/');
    ensure!(!p.is_empty(), "cpio: empty path {path:?}");
    ensure!(!p.contains('\0'), "cpio: path {path:?} contains a NUL");
    for c in p.split('/') {
        ensure!(
            !c.is_empty() && c != "." && c != "..",
            "cpio: path {path:?} has an empty, `.` or `..` component"
        );
    }
    ensure!(
        p != TRAILER,
        "cpio: {TRAILER:?} is reserved for the end marker"
    );
    Ok(p.to_owned())
}

impl Writer {
    pub fn new() -> Self {
        Writer {
            out: Vec::new(),
            next_ino: 1,
            names: Default::default(),
        }
    }

    /// Writes one header, name and data with the padding newc asks for.
    fn raw(
        &mut self,
        ino: u32,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        name: &str,
        data: &[u8],
    ) -> Result<()> {
        let size = u32::try_from(data.len())
            .with_context(|| format!("cpio: {name:?} is larger than 4 GiB"))?;
        let namesize = u32::try_from(name.len() + 1).context("cpio: name too long")?;
        // In header order: ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        // rdevmajor, rdevminor, namesize, check (check is only used by the "crc" format).
        let fields = [
            ino, mode, 0, 0, nlink, MTIME, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        self.out.extend_from_slice(MAGIC);
        for f in fields {
            self.out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        pad4(&mut self.out);
        self.out.extend_from_slice(data);
        pad4(&mut self.out);
        Ok(())
    }

    fn add(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<()> {
        let name = clean(path)?;
        if !self.names.insert(name.clone()) {
            bail!("cpio: {name:?} added twice");
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.raw(ino, mode, nlink, rdev, &name, data)
    }

    /// A directory with permission bits `perm` (e.g. `0o755`).
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<()> {
        self.add(path, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// A regular file with permission bits `perm` (e.g. `0o755` for a program).
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<()> {
        self.add(path, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// A symbolic link to `target` (stored as the entry's data, without a NUL).
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        ensure!(
            !target.is_empty(),
            "cpio: symlink {path:?} has an empty target"
        );
        self.add(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// A character device node (`rdevmajor`/`rdevminor` in the header), e.g. `/dev/console`
    /// 5:1, which the kernel opens for init's stdio before `/init` can mount devtmpfs.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<()> {
        self.add(path, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Ends the archive with the trailer and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        // The trailer is an empty entry: inode 0, one link, no data.
        self.raw(0, 0, 1, (0, 0), TRAILER, &[])
            .expect("the trailer always fits");
        self.out
    }
}

/// Reads one 8-digit hex field.
fn field(header: &[u8], i: usize) -> Result<u32> {
    let at = 6 + 8 * i;
    let text = std::str::from_utf8(&header[at..at + 8]).context("cpio: header is not ASCII")?;
    u32::from_str_radix(text, 16).with_context(|| format!("cpio: bad hex field {text:?}"))
}

/// Reads a newc archive back into its entries (the trailer excluded). Used by the tests, and
/// to list what an initramfs holds. Refuses anything this module would not write: other
/// formats, misaligned or truncated entries, and a missing trailer.
pub fn list(archive: &[u8]) -> Result<Vec<Entry>> {
    let mut at = 0;
    let mut entries = Vec::new();
    loop {
        ensure!(at % 4 == 0, "cpio: entry at {at} is not 4-byte aligned");
        let header = archive
            .get(at..at + HEADER_LEN)
            .with_context(|| format!("cpio: truncated header at {at} (no {TRAILER:?}?)"))?;
        ensure!(
            &header[..6] == MAGIC,
            "cpio: bad magic {:?} at {at}",
            String::from_utf8_lossy(&header[..6])
        );
        let f = |i| field(header, i);
        let (ino, mode, uid, gid, nlink, mtime, size) =
            (f(0)?, f(1)?, f(2)?, f(3)?, f(4)?, f(5)?, f(6)?);
        let (rmaj, rmin, namesize) = (f(9)?, f(10)?, f(11)? as usize);
        ensure!(namesize >= 1, "cpio: empty name at {at}");
        let name_at = at + HEADER_LEN;
        let name_bytes = archive
            .get(name_at..name_at + namesize)
            .with_context(|| format!("cpio: truncated name at {name_at}"))?;
        ensure!(
            name_bytes[namesize - 1] == 0,
            "cpio: name at {name_at} is not NUL-terminated"
        );
        let path = std::str::from_utf8(&name_bytes[..namesize - 1])
            .with_context(|| format!("cpio: name at {name_at} is not UTF-8"))?
            .to_owned();
        let data_at = (name_at + namesize).next_multiple_of(4);
        let size = size as usize;
        let data = archive
            .get(data_at..data_at + size)
            .with_context(|| format!("cpio: truncated data of {path:?}"))?;
        at = (data_at + size).next_multiple_of(4);
        if path == TRAILER {
            ensure!(
                archive
                    .get(at..)
                    .is_some_and(|rest| rest.iter().all(|&b| b == 0)),
                "cpio: data after {TRAILER:?}"
            );
            return Ok(entries);
        }
        let kind = match mode & S_IFMT {
            S_IFDIR => Kind::Dir,
            S_IFREG => Kind::File(data.to_vec()),
            S_IFLNK => Kind::Symlink(
                String::from_utf8(data.to_vec())
                    .with_context(|| format!("cpio: target of {path:?} is not UTF-8"))?,
            ),
            S_IFCHR => Kind::CharDev(rmaj, rmin),
            other => bail!("cpio: {path:?} has unsupported file type {other:#o}"),
        };
        entries.push(Entry {
            path,
            perm: mode & 0o7777,
            kind,
            ino,
            uid,
            gid,
            nlink,
            mtime,
        });
    }
}

/// One line per entry, like `ls -l` in short: `drwxr-xr-x dev`, `-rwxr-xr-x bin/busybox
/// (1.9 MiB)`, `lrwxrwxrwx bin/sh -> busybox`, `crw------- dev/console 5:1`.
pub fn listing(entries: &[Entry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| {
            let (t, tail) = match &e.kind {
                Kind::Dir => ('d', String::new()),
                Kind::File(d) => ('-', format!(" ({})", crate::util::human(d.len() as u64))),
                Kind::Symlink(t) => ('l', format!(" -> {t}")),
                Kind::CharDev(a, b) => ('c', format!(" {a}:{b}")),
            };
            let mut s = String::from(t);
            for shift in [6, 3, 0] {
                let bits = (e.perm >> shift) & 7;
                s.push(if bits & 4 != 0 { 'r' } else { '-' });
                s.push(if bits & 2 != 0 { 'w' } else { '-' });
                s.push(if bits & 1 != 0 { 'x' } else { '-' });
            }
            format!("{s} {}{tail}", e.path)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny independent reader for the tests: splits an archive at the documented offsets
    /// without sharing code with `list`, so a bug shared by writer and reader cannot hide.
    fn names_and_sizes(a: &[u8]) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            let hex = |i: usize| {
                usize::from_str_radix(std::str::from_utf8(&a[at + 6 + 8 * i..][..8]).unwrap(), 16)
                    .unwrap()
            };
            let (size, namesize) = (hex(6), hex(11));
            let name = String::from_utf8(a[at + 110..at + 110 + namesize - 1].to_vec()).unwrap();
            out.push((name.clone(), size));
            at = (at + 110 + namesize).div_ceil(4) * 4;
            at = (at + size).div_ceil(4) * 4;
            if name == TRAILER {
                assert_eq!(at, a.len());
                return out;
            }
        }
    }

    #[test]
    fn known_bytes() {
        // Checked by hand against the newc layout: 110-byte header; name "a" + NUL = 2 bytes,
        // 112 is a multiple of 4, so no name padding; data "hi" (2 bytes) padded with 2 NULs.
        let mut w = Writer::new();
        w.file("/a", 0o644, b"hi").unwrap();
        let a = w.finish();
        let mut want = Vec::new();
        want.extend_from_slice(b"070701");
        want.extend_from_slice(b"00000001"); // ino
        want.extend_from_slice(b"000081A4"); // mode 0100644
        want.extend_from_slice(b"00000000"); // uid
        want.extend_from_slice(b"00000000"); // gid
        want.extend_from_slice(b"00000001"); // nlink
        want.extend_from_slice(b"00000000"); // mtime
        want.extend_from_slice(b"00000002"); // filesize
        want.extend_from_slice(b"00000000"); // devmajor
        want.extend_from_slice(b"00000000"); // devminor
        want.extend_from_slice(b"00000000"); // rdevmajor
        want.extend_from_slice(b"00000000"); // rdevminor
        want.extend_from_slice(b"00000002"); // namesize
        want.extend_from_slice(b"00000000"); // check
        want.extend_from_slice(b"a\0");
        want.extend_from_slice(b"hi\0\0");
        assert_eq!(want.len(), 116);
        // Trailer: namesize 11, 110 + 11 = 121 -> 3 bytes of name padding -> 124.
        want.extend_from_slice(b"070701");
        for f in [0u32, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 11, 0] {
            want.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        want.extend_from_slice(b"TRAILER!!!\0\0\0\0");
        assert_eq!(a, want);
        assert_eq!(a.len(), 116 + 124);
    }

    #[test]
    fn round_trip() {
        let mut w = Writer::new();
        w.dir("bin", 0o755).unwrap();
        w.dir("/dev", 0o755).unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        w.file("bin/busybox", 0o755, &[0x7f, b'E', b'L', b'F', 1])
            .unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        w.file("empty", 0o600, b"").unwrap();
        let a = w.finish();
        assert_eq!(a.len() % 4, 0);

        let e = list(&a).unwrap();
        let paths: Vec<_> = e.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "bin",
                "dev",
                "dev/console",
                "bin/busybox",
                "bin/sh",
                "init",
                "empty"
            ]
        );
        assert_eq!(e[0].kind, Kind::Dir);
        assert_eq!((e[0].perm, e[0].nlink), (0o755, 2));
        assert_eq!(e[2].kind, Kind::CharDev(5, 1));
        assert_eq!(e[2].perm, 0o600);
        assert_eq!(e[3].kind, Kind::File(vec![0x7f, b'E', b'L', b'F', 1]));
        assert_eq!(e[4].kind, Kind::Symlink("busybox".into()));
        assert_eq!(e[6].kind, Kind::File(vec![]));
        // Deterministic metadata: inodes 1.., root-owned, fixed mtime.
        for (i, e) in e.iter().enumerate() {
            assert_eq!(e.ino, i as u32 + 1);
            assert_eq!((e.uid, e.gid, e.mtime), (0, 0, MTIME));
        }

        // The independent reader agrees on the boundaries.
        let n = names_and_sizes(&a);
        assert_eq!(n[3], ("bin/busybox".into(), 5));
        assert_eq!(n[4], ("bin/sh".into(), 7));
        assert_eq!(n.last().unwrap(), &(TRAILER.to_owned(), 0));

        assert_eq!(
            listing(&e[2..5]),
            [
                "crw------- dev/console 5:1",
                "-rwxr-xr-x bin/busybox (5 B)",
                "lrwxrwxrwx bin/sh -> busybox"
            ]
        );
    }

    #[test]
    fn every_name_and_data_length_pads_right() {
        // Names of 1..8 bytes and data of 0..8 bytes cover every padding remainder.
        let mut w = Writer::new();
        let mut want = Vec::new();
        for n in 1..=8 {
            for d in 0..=8 {
                let name = format!("{}{}", "n".repeat(n), d);
                let data = vec![d as u8; d];
                w.file(&name, 0o644, &data).unwrap();
                want.push((name, data));
            }
        }
        let a = w.finish();
        let got = list(&a).unwrap();
        assert_eq!(got.len(), want.len());
        for (e, (name, data)) in got.iter().zip(&want) {
            assert_eq!(&e.path, name);
            assert_eq!(e.kind, Kind::File(data.clone()));
        }
    }

    #[test]
    fn deterministic() {
        let build = || {
            let mut w = Writer::new();
            w.dir("x", 0o755).unwrap();
            w.file("x/y", 0o644, b"same").unwrap();
            w.finish()
        };
        assert_eq!(build(), build());
    }

    #[test]
    fn rejects_bad_paths_and_duplicates() {
        let mut w = Writer::new();
        assert!(w.file("", 0o644, b"").is_err());
        assert!(w.file("/", 0o644, b"").is_err());
        assert!(w.file("a/../b", 0o644, b"").is_err());
        assert!(w.file("a//b", 0o644, b"").is_err());
        assert!(w.file("TRAILER!!!", 0o644, b"").is_err());
        w.dir("a", 0o755).unwrap();
        assert!(w.dir("/a", 0o755).is_err());
        assert!(w.symlink("l", "").is_err());
    }

    #[test]
    fn reader_rejects_damage() {
        let mut w = Writer::new();
        w.file("f", 0o644, b"data").unwrap();
        let a = w.finish();
        // No trailer.
        assert!(list(&a[..116]).is_err());
        // Wrong magic ("crc" format).
        let mut b = a.clone();
        b[5] = b'2';
        assert!(list(&b).is_err());
        // Trailing zeroes are fine (the kernel allows padding after the trailer).
        let mut c = a.clone();
        c.extend_from_slice(&[0; 512]);
        assert_eq!(list(&c).unwrap().len(), 1);
    }
}
