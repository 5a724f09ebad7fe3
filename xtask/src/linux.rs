//! The Linux guest payload: Debian bookworm's arm64 kernel with a busybox initramfs whose
//! `/init` checks that a virtio-blk disk works with its DMA translated by the (emulated) SMMU.
//!
//! Why Debian's kernel: it is a real distribution kernel with `arm-smmu-v3`, the generic PCI
//! host and the PL011 built in, so nothing has to be cross-compiled; see
//! `../shared/reference/qemu-virt.md` section 4 for what was verified about it.
//!
//! Fetching uses `apt-get download` with a private apt configuration under
//! `target/linux/apt/` (its own sources list, package lists, dpkg status file and archive
//! cache), so the host's apt and dpkg state is never changed and no `dpkg --add-architecture
//! arm64` is needed. The host's `/etc/apt/apt.conf.d` is still read, so a proxy configured there
//! keeps working. Packages are unpacked with `dpkg-deb -x`, which does not touch dpkg's
//! database. Everything is cached: delete `target/linux/` to fetch the current versions again.
//!
//! The initramfs holds a static busybox, the kernel modules that virtio-blk over PCI needs
//! (Debian builds `virtio_pci` and `virtio_blk` as modules), and a shell `/init`. What `/init`
//! does is chosen on the kernel command line (`linuxtest.mode=test|bench|shell`), so one
//! initramfs serves the system test, the benchmark and interactive use. It prints `LINUX-*`
//! markers on the console for the host to match (see [`init_script`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};

use crate::board::{BoardFile, Disk, LINUX_PAYLOAD, Region, Vm, VmSection};
use crate::cpio;
use crate::util::{self, human, rel};

/// The Debian release whose kernel we boot (the one the reference notes were verified with).
pub const SUITE: &str = "bookworm";
/// Metapackage whose dependency names the current kernel ABI (`linux-image-6.1.0-NN-arm64`).
const KERNEL_META: &str = "linux-image-arm64";
/// Statically linked busybox: the initramfs has no libc.
const BUSYBOX_PACKAGE: &str = "busybox-static";
/// Mirrors used when the host's apt sources name none for Debian.
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const DEFAULT_SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";
/// The archive key that signs the Debian mirrors (package `debian-archive-keyring`).
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Records what a completed fetch produced; written last, so it only exists for a whole fetch.
const STAMP: &str = "fetched.txt";

/// Modules `/init` needs for a virtio-blk disk on PCI; their dependencies are added.
pub const DISK_MODULES: &[&str] = &["virtio_pci", "virtio_blk"];
/// Size of the disk image [`disk_image`] makes by default: room for the test pattern and the
/// benchmark read. Sparse on the host, so it costs no space.
pub const DISK_BYTES: u64 = 64 << 20;
/// QEMU `-drive` id of the disk.
const DRIVE_ID: &str = "linuxdisk";

/// The busybox applets `/init` calls, as symlinks in `/bin`. The shell mode installs the rest
/// (`busybox --install -s`).
const APPLETS: &[&str] = &[
    "sh",
    "mount",
    "insmod",
    "dd",
    "sha256sum",
    "cat",
    "echo",
    "sync",
    "poweroff",
    "reboot",
    "sleep",
    "ls",
    "grep",
    "uname",
    "dmesg",
    "readlink",
    "rm",
    "setsid",
    "cttyhack",
];

/// What the fetched packages provide.
#[derive(Clone, Debug)]
pub struct LinuxPackages {
    /// Kernel release (`uname -r`), e.g. `6.1.0-56-arm64`.
    pub release: String,
    /// The kernel package and its Debian version, e.g. `linux-image-6.1.0-56-arm64 6.1.192-2`.
    pub kernel_package: String,
    /// The busybox package and its Debian version.
    pub busybox_package: String,
    /// Uncompressed arm64 `Image` (QEMU `-kernel`, or the hypervisor's payload).
    pub image: PathBuf,
    /// `lib/modules/<release>` of the unpacked kernel package.
    pub modules: PathBuf,
    /// The static aarch64 busybox binary.
    pub busybox: PathBuf,
}

/// Where [`fetch`] keeps its cache: `target/linux`.
pub fn default_cache() -> PathBuf {
    util::target_dir().join("linux")
}

// ---------------------------------------------------------------------------------------------
// Fetching

/// The mirrors to fetch from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirrors {
    /// Serves `bookworm` and `bookworm-updates`.
    pub main: String,
    /// Serves `bookworm-security` (where kernel updates land first).
    pub security: String,
}

/// Picks Debian mirror URLs from the host's apt sources (`(file name, text)` pairs, one-line
/// `.list` or deb822 `.sources`), so a host behind a local mirror keeps using it. A URI counts as
/// the main archive if it serves `bookworm` or its path ends in `/debian`, and as the security
/// archive if it serves `bookworm-security` or ends in `/debian-security`; the URL path test
/// keeps a non-Debian host (Ubuntu) from lending us an archive that has no bookworm.
pub fn debian_mirrors(sources: &[(String, String)]) -> Mirrors {
    let mut entries: Vec<(String, Vec<String>)> = Vec::new(); // (uri, suites)
    for (name, text) in sources {
        if name.ends_with(".sources") {
            for stanza in text.split("\n\n") {
                let mut types = "";
                let (mut uris, mut suites) = (Vec::new(), Vec::new());
                let mut enabled = true;
                for line in stanza.lines() {
                    let Some((k, v)) = line.split_once(':') else {
                        continue;
                    };
                    if line.starts_with('#') || line.starts_with(' ') {
                        continue;
                    }
                    match k.trim().to_ascii_lowercase().as_str() {
                        "types" => types = v,
                        "uris" => uris = v.split_whitespace().map(str::to_owned).collect(),
                        "suites" => suites = v.split_whitespace().map(str::to_owned).collect(),
                        "enabled" => enabled = v.trim() != "no",
                        _ => {}
                    }
                }
                if enabled && types.split_whitespace().any(|t| t == "deb") {
                    for u in uris {
                        entries.push((u, suites.clone()));
                    }
                }
            }
        } else {
            for line in text.lines() {
                let mut words = line.split_whitespace();
                if words.next() != Some("deb") {
                    continue;
                }
                let mut rest: Vec<&str> = words.collect();
                // Options: `[arch=amd64 signed-by=...]`, possibly several words.
                if rest.first().is_some_and(|w| w.starts_with('[')) {
                    let end = rest.iter().position(|w| w.ends_with(']')).unwrap_or(0);
                    rest.drain(..=end);
                }
                if let [uri, suite, ..] = rest[..] {
                    entries.push((uri.to_owned(), vec![suite.to_owned()]));
                }
            }
        }
    }
    let pick = |suite: &str, tail: &str, default: &str| {
        let serves = |(u, s): &&(String, Vec<String>)| {
            s.iter().any(|x| x == suite) || u.trim_end_matches('/').ends_with(tail)
        };
        entries
            .iter()
            .find(serves)
            .map_or(default.to_owned(), |(u, _)| {
                u.trim_end_matches('/').to_owned()
            })
    };
    Mirrors {
        main: pick(SUITE, "/debian", DEFAULT_MIRROR),
        security: pick(
            &format!("{SUITE}-security"),
            "/debian-security",
            DEFAULT_SECURITY_MIRROR,
        ),
    }
}

/// The private `sources.list`: bookworm, its updates and its security archive, arm64 only.
fn sources_list(m: &Mirrors, keyring: Option<&str>) -> String {
    let opts = match keyring {
        Some(k) => format!("[arch=arm64 signed-by={k}]"),
        None => "[arch=arm64]".to_owned(),
    };
    format!(
        "# Written by cargo xtask (xtask/src/linux.rs) for its private apt configuration.\n\
         deb {opts} {main} {SUITE} main\n\
         deb {opts} {main} {SUITE}-updates main\n\
         deb {opts} {sec} {SUITE}-security main\n",
        main = m.main,
        sec = m.security
    )
}

/// `-o` options that point apt at `dir` for all its state and make arm64 the only
/// architecture, so the host's package lists, dpkg status and preferences play no part.
fn apt_options(dir: &Path) -> Vec<String> {
    let d = |p: &str| dir.join(p).display().to_string();
    [
        ("Dir::State", d("state")),
        ("Dir::State::status", d("status")),
        ("Dir::Cache", d("cache")),
        ("Dir::Etc::SourceList", d("sources.list")),
        ("Dir::Etc::SourceParts", d("empty.d")),
        ("Dir::Etc::Preferences", d("preferences")),
        ("Dir::Etc::PreferencesParts", d("empty.d")),
        ("APT::Architecture", "arm64".into()),
        ("APT::Architectures", "arm64".into()),
        // Our lock files are private, and apt must not wait for the host's.
        ("Debug::NoLocking", "1".into()),
        // As root, apt downloads as `_apt`, which cannot write into our root-owned folders;
        // it would fall back with a warning. Ignored when not root.
        ("APT::Sandbox::User", "root".into()),
    ]
    .into_iter()
    .flat_map(|(k, v)| ["-o".to_owned(), format!("{k}={v}")])
    .collect()
}

/// Creates the private apt tree.
fn apt_setup(dir: &Path) -> Result<()> {
    for sub in ["state/lists/partial", "cache/archives/partial", "empty.d"] {
        let p = dir.join(sub);
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
    }
    for f in ["status", "preferences"] {
        let p = dir.join(f);
        std::fs::write(&p, "").with_context(|| format!("writing {}", p.display()))?;
    }
    let mut sources = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let name = f
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if !(name.ends_with(".list") || name.ends_with(".sources")) {
            continue;
        }
        if let Ok(text) = std::fs::read_to_string(&f) {
            sources.push((name, text));
        }
    }
    let mirrors = debian_mirrors(&sources);
    let keyring = Path::new(DEBIAN_KEYRING)
        .is_file()
        .then_some(DEBIAN_KEYRING);
    let p = dir.join("sources.list");
    std::fs::write(&p, sources_list(&mirrors, keyring))
        .with_context(|| format!("writing {}", p.display()))?;
    eprintln!(
        "linux: mirrors {} and {} (from the host's apt sources, else deb.debian.org)",
        mirrors.main, mirrors.security
    );
    Ok(())
}

fn apt(tool: &str, dir: &Path) -> Command {
    let mut c = Command::new(tool);
    c.args(apt_options(dir))
        .env("DEBIAN_FRONTEND", "noninteractive");
    c
}

/// From `apt-cache show linux-image-arm64`, the kernel package it depends on.
pub fn kernel_package_from_meta(show: &str) -> Option<String> {
    let deps = show.lines().find_map(|l| l.strip_prefix("Depends:"))?;
    deps.split(',')
        .flat_map(|alt| alt.split('|'))
        .map(|d| d.split_whitespace().next().unwrap_or(""))
        .find(|n| n.starts_with("linux-image-") && n.ends_with("-arm64"))
        .map(str::to_owned)
}

/// `name_1%3a1.35.0-4_arm64.deb` → (`name`, `1:1.35.0-4`).
fn deb_name_version(file: &str) -> Option<(String, String)> {
    let stem = file.strip_suffix(".deb")?;
    let mut parts = stem.split('_');
    let (name, version) = (parts.next()?, parts.next()?);
    Some((name.to_owned(), version.replace("%3a", ":")))
}

/// The one `.deb` of `package` in `dir`.
fn find_deb(dir: &Path, package: &str) -> Result<PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if deb_name_version(&name).is_some_and(|(n, _)| n == package) {
            found.push(p);
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!("no {package} .deb in {}", dir.display()),
        _ => bail!("several {package} .debs in {}: {found:?}", dir.display()),
    }
}

/// `package version` from a .deb path, for messages.
fn describe_deb(deb: &Path) -> String {
    let name = deb.file_name().unwrap_or_default().to_string_lossy();
    deb_name_version(&name).map_or(name.to_string(), |(n, v)| format!("{n} {v}"))
}

/// `dpkg-deb -x` into a fresh `dest`. (dpkg-deb ships with apt on every host we can fetch on,
/// so unpacking ar + tar.xz ourselves would add code without adding hosts.)
fn unpack(deb: &Path, dest: &Path) -> Result<()> {
    if dest.exists() {
        std::fs::remove_dir_all(dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    util::output(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest))
        .with_context(|| format!("unpacking {}", deb.display()))?;
    Ok(())
}

/// The first of `lib/...` or `usr/lib/...` (bookworm ships `/lib`; merged-/usr releases ship
/// `/usr/lib`) that exists under `root`.
fn under_lib(root: &Path, rest: &str) -> Option<PathBuf> {
    ["lib", "usr/lib"]
        .iter()
        .map(|l| root.join(l).join(rest))
        .find(|p| p.exists())
}

/// Offset and value of the arm64 `Image` header magic ("ARM\x64", little-endian).
const IMAGE_MAGIC_AT: usize = 56;
const IMAGE_MAGIC: &[u8; 4] = b"ARM\x64";

/// Whether `head` starts an arm64 `Image`.
pub fn is_arm64_image(head: &[u8]) -> bool {
    head.get(IMAGE_MAGIC_AT..IMAGE_MAGIC_AT + 4) == Some(IMAGE_MAGIC)
}

fn read_head(p: &Path, n: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut buf = vec![0; n];
    let mut got = 0;
    while got < n {
        let k = f.read(&mut buf[got..])?;
        if k == 0 {
            break;
        }
        got += k;
    }
    buf.truncate(got);
    Ok(buf)
}

/// Makes sure `vmlinuz` is (or becomes, in `out`) an uncompressed arm64 Image, which is what
/// QEMU `-kernel` and the hypervisor's loader take. Bookworm's is already uncompressed (EFI
/// stub + Image header); some kernels install a gzipped Image instead.
fn uncompressed_image(vmlinuz: &Path, out: &Path) -> Result<PathBuf> {
    let head = read_head(vmlinuz, 64)?;
    if is_arm64_image(&head) {
        return Ok(vmlinuz.to_path_buf());
    }
    if head.starts_with(&[0x1f, 0x8b]) {
        let data = decompress("gzip", vmlinuz)?;
        ensure!(
            is_arm64_image(&data),
            "{} is gzip, but what it holds is no arm64 Image",
            vmlinuz.display()
        );
        std::fs::write(out, data).with_context(|| format!("writing {}", out.display()))?;
        return Ok(out.to_path_buf());
    }
    if head.starts_with(b"MZ") && head.get(4..8) == Some(b"zimg") {
        bail!(
            "{} is an EFI zboot image (CONFIG_EFI_ZBOOT), which cannot be booted as a raw Image",
            vmlinuz.display()
        );
    }
    bail!(
        "{} is not an arm64 Image (no \"ARM\\x64\" magic at offset {IMAGE_MAGIC_AT})",
        vmlinuz.display()
    )
}

/// `tool -dc file` (gzip, xz, zstd), for compressed kernels and modules; these tools come with
/// every Debian host, which saves xtask a decompression crate.
fn decompress(tool: &str, file: &Path) -> Result<Vec<u8>> {
    let out = Command::new(tool)
        .arg("-dc")
        .arg(file)
        .output()
        .with_context(|| {
            format!(
                "running `{tool} -dc` on {} (is {tool} installed?)",
                file.display()
            )
        })?;
    ensure!(
        out.status.success(),
        "`{tool} -dc {}` failed: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// Reads the stamp of a completed fetch and checks that what it names is still there.
fn cached(cache: &Path) -> Option<LinuxPackages> {
    let text = std::fs::read_to_string(cache.join(STAMP)).ok()?;
    let kv: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let get = |k: &str| kv.get(k).map(|v| v.to_string());
    let release = get("release")?;
    let kernel_deb = cache.join(get("kernel_deb")?);
    let busybox_deb = cache.join(get("busybox_deb")?);
    let pkgs = LinuxPackages {
        kernel_package: describe_deb(&kernel_deb),
        busybox_package: describe_deb(&busybox_deb),
        image: cache.join(get("image")?),
        modules: cache.join(get("modules")?),
        busybox: cache.join(get("busybox")?),
        release,
    };
    let ok = kernel_deb.is_file()
        && busybox_deb.is_file()
        && pkgs.busybox.is_file()
        && pkgs.modules.join("kernel").is_dir()
        && read_head(&pkgs.image, 64).is_ok_and(|h| is_arm64_image(&h));
    ok.then_some(pkgs)
}

/// The kernel Image of a completed fetch in `cache`, if there is one.
pub fn cached_image(cache: &Path) -> Option<PathBuf> {
    cached(cache).map(|p| p.image)
}

/// Downloads (or finds in `cache`, normally [`default_cache`]) Debian bookworm's arm64 kernel
/// and `busybox-static`, unpacks them and returns where the Image, modules and busybox are.
///
/// The kernel version is not pinned: it is whatever the `linux-image-arm64` metapackage depends
/// on in bookworm + bookworm-security when the cache is filled. A pin would break within weeks,
/// because the security archive keeps only the newest kernel ABI (the reference notes name
/// `6.1.0-56-arm64`, 6.1.192-2, current when they were written). The cache then keeps the
/// version fixed until `target/linux/` is deleted.
pub fn fetch(cache: &Path) -> Result<LinuxPackages> {
    if let Some(p) = cached(cache) {
        return Ok(p);
    }
    let start = Instant::now();
    eprintln!(
        "linux: fetching Debian {SUITE} arm64 kernel and busybox into {}",
        rel(cache)
    );
    let apt_dir = cache.join("apt");
    apt_setup(&apt_dir)?;
    util::run(apt("apt-get", &apt_dir).args(["-q", "update"])).context(
        "updating the private arm64 package lists (is a Debian mirror reachable, and is \
             debian-archive-keyring installed?)",
    )?;
    let show =
        util::output(apt("apt-cache", &apt_dir).args(["show", "--no-all-versions", KERNEL_META]))
            .with_context(|| format!("looking up {KERNEL_META}"))?;
    let kernel_pkg = kernel_package_from_meta(&show)
        .with_context(|| format!("{KERNEL_META} depends on no linux-image-*-arm64:\n{show}"))?;

    let debs = cache.join("debs");
    if debs.exists() {
        std::fs::remove_dir_all(&debs).with_context(|| format!("removing {}", debs.display()))?;
    }
    std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    util::run(
        apt("apt-get", &apt_dir)
            .args(["-q", "download", &kernel_pkg, BUSYBOX_PACKAGE])
            .current_dir(&debs),
    )
    .with_context(|| format!("downloading {kernel_pkg} and {BUSYBOX_PACKAGE}"))?;
    let kernel_deb = find_deb(&debs, &kernel_pkg)?;
    let busybox_deb = find_deb(&debs, BUSYBOX_PACKAGE)?;

    let kdir = cache.join("kernel");
    let bdir = cache.join("busybox");
    unpack(&kernel_deb, &kdir)?;
    unpack(&busybox_deb, &bdir)?;

    let release = kernel_pkg
        .strip_prefix("linux-image-")
        .expect("checked by kernel_package_from_meta")
        .to_owned();
    let vmlinuz = kdir.join("boot").join(format!("vmlinuz-{release}"));
    ensure!(
        vmlinuz.is_file(),
        "{} holds no boot/vmlinuz-{release}",
        kernel_deb.display()
    );
    let image = uncompressed_image(&vmlinuz, &cache.join("Image"))?;
    let modules = under_lib(&kdir, &format!("modules/{release}"))
        .with_context(|| format!("{} holds no lib/modules/{release}", kernel_deb.display()))?;
    let busybox = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| bdir.join(p))
        .find(|p| p.is_file())
        .with_context(|| format!("{} holds no bin/busybox", busybox_deb.display()))?;

    let r = |p: &Path| p.strip_prefix(cache).unwrap_or(p).display().to_string();
    let stamp = format!(
        "release={release}\nkernel_deb={}\nbusybox_deb={}\nimage={}\nmodules={}\nbusybox={}\n",
        r(&kernel_deb),
        r(&busybox_deb),
        r(&image),
        r(&modules),
        r(&busybox)
    );
    let tmp = cache.join(format!("{STAMP}.tmp"));
    std::fs::write(&tmp, stamp).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, cache.join(STAMP))
        .with_context(|| format!("writing {}", cache.join(STAMP).display()))?;

    let pkgs = cached(cache).context("the fetch finished, but its results do not check out")?;
    let size = std::fs::metadata(&pkgs.image).map_or(0, |m| m.len());
    eprintln!(
        "linux: {} and {} in {:.1} s; Image {} ({})",
        pkgs.kernel_package,
        pkgs.busybox_package,
        start.elapsed().as_secs_f64(),
        rel(&pkgs.image),
        human(size)
    );
    Ok(pkgs)
}

// ---------------------------------------------------------------------------------------------
// Kernel modules

/// A module's name from its file name: `virtio-rng.ko.xz` → `virtio_rng` (the kernel treats
/// `-` and `_` alike in module names and reports `_`).
pub fn module_name(file: &str) -> Option<String> {
    let base = file.rsplit('/').next()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|s| base.strip_suffix(s))?;
    Some(stem.replace('-', "_"))
}

/// Parses `modules.dep` (`kernel/a.ko: kernel/b.ko kernel/c.ko`) into name → direct-or-
/// transitive dependency names. Debian's package has no modules.dep (depmod makes it at
/// install time), so this is used only when a kernel tree has one.
pub fn parse_modules_dep(text: &str) -> Result<BTreeMap<String, Vec<String>>> {
    let mut map = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (module, deps) = line
            .split_once(':')
            .with_context(|| format!("modules.dep line {}: no ':' in {line:?}", i + 1))?;
        let name = module_name(module.trim())
            .with_context(|| format!("modules.dep line {}: {module:?} is no module", i + 1))?;
        let deps = deps
            .split_whitespace()
            .map(|d| module_name(d).with_context(|| format!("modules.dep: {d:?} is no module")))
            .collect::<Result<Vec<_>>>()?;
        map.insert(name, deps);
    }
    Ok(map)
}

/// The `key=value` strings of an ELF module's `.modinfo` section (`depends=a,b`, `name=x`, ...).
/// Read from the section headers of a 64-bit little-endian ELF, which every arm64 module is.
pub fn modinfo(elf: &[u8]) -> Result<Vec<(String, String)>> {
    ensure!(elf.starts_with(b"\x7fELF"), "not an ELF file");
    ensure!(
        elf.get(4) == Some(&2) && elf.get(5) == Some(&1),
        "not a 64-bit little-endian ELF"
    );
    let u16_at = |o: usize| -> Result<u64> {
        let b = elf.get(o..o + 2).context("truncated ELF")?;
        Ok(u16::from_le_bytes([b[0], b[1]]) as u64)
    };
    let u32_at = |o: usize| -> Result<u64> {
        let b = elf.get(o..o + 4).context("truncated ELF")?;
        Ok(u32::from_le_bytes(b.try_into().unwrap()) as u64)
    };
    let u64_at = |o: usize| -> Result<u64> {
        let b = elf.get(o..o + 8).context("truncated ELF")?;
        Ok(u64::from_le_bytes(b.try_into().unwrap()))
    };
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28)?, u16_at(0x3a)?, u16_at(0x3c)?, u16_at(0x3e)?);
    ensure!(shentsize >= 0x28, "ELF section headers are too small");
    // Section header i: (name offset in .shstrtab, file offset, size).
    let section = |i: u64| -> Result<(u64, usize, usize)> {
        let h = usize::try_from(shoff + i * shentsize)?;
        Ok((
            u32_at(h)?,
            usize::try_from(u64_at(h + 0x18)?)?,
            usize::try_from(u64_at(h + 0x20)?)?,
        ))
    };
    let bytes = |off: usize, size: usize| {
        elf.get(off..off.checked_add(size).context("ELF section overflows")?)
            .context("ELF section runs past the file")
    };
    let (_, stroff, strsize) = section(shstrndx)?;
    let strtab = bytes(stroff, strsize)?;
    for i in 0..shnum {
        let (name, off, size) = section(i)?;
        let name = strtab
            .get(name as usize..)
            .and_then(|s| s.split(|&b| b == 0).next())
            .unwrap_or_default();
        if name == b".modinfo" {
            return Ok(bytes(off, size)?
                .split(|&b| b == 0)
                .filter_map(|kv| {
                    let kv = std::str::from_utf8(kv).ok()?;
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_owned(), v.to_owned()))
                })
                .collect());
        }
    }
    bail!("ELF has no .modinfo section")
}

/// The modules a module needs loaded first, from `depends=` in its `.modinfo`.
pub fn modinfo_depends(elf: &[u8]) -> Result<Vec<String>> {
    Ok(modinfo(elf)?
        .into_iter()
        .filter(|(k, _)| k == "depends")
        .flat_map(|(_, v)| {
            v.split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.replace('-', "_"))
                .collect::<Vec<_>>()
        })
        .collect())
}

/// Load order for `wanted` and everything they depend on: each module after its dependencies,
/// each once, ties in the order given (a depth-first post-order). `deps_of` answers for one
/// module. Fails on a dependency cycle, which `insmod` could never satisfy.
pub fn load_order(
    wanted: &[&str],
    mut deps_of: impl FnMut(&str) -> Result<Vec<String>>,
) -> Result<Vec<String>> {
    fn visit(
        m: &str,
        deps_of: &mut dyn FnMut(&str) -> Result<Vec<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if done.contains(m) {
            return Ok(());
        }
        if path.iter().any(|p| p == m) {
            bail!("module dependency cycle: {} -> {m}", path.join(" -> "));
        }
        path.push(m.to_owned());
        for d in deps_of(m)? {
            visit(&d, deps_of, path, done, order)?;
        }
        path.pop();
        done.insert(m.to_owned());
        order.push(m.to_owned());
        Ok(())
    }
    let (mut path, mut done, mut order) = (Vec::new(), BTreeSet::new(), Vec::new());
    for w in wanted {
        visit(
            &w.replace('-', "_"),
            &mut deps_of,
            &mut path,
            &mut done,
            &mut order,
        )?;
    }
    Ok(order)
}

/// The modules of one kernel: where each is, which are built in, and their dependencies.
struct ModuleTree {
    /// name → file under `lib/modules/<release>`.
    files: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
    /// From modules.dep when the tree has one; otherwise read from each module's `.modinfo`.
    dep: Option<BTreeMap<String, Vec<String>>>,
}

impl ModuleTree {
    fn open(dir: &Path) -> Result<Self> {
        let mut files = BTreeMap::new();
        let mut stack = vec![dir.join("kernel")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
                let e = e?;
                let p = e.path();
                if e.file_type()?.is_dir() {
                    stack.push(p);
                } else if let Some(n) = module_name(&p.to_string_lossy()) {
                    files.insert(n, p);
                }
            }
        }
        let builtin = std::fs::read_to_string(dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(module_name)
            .collect();
        let dep_file = dir.join("modules.dep");
        let dep = match std::fs::read_to_string(&dep_file) {
            Ok(t) => Some(parse_modules_dep(&t).with_context(|| dep_file.display().to_string())?),
            Err(_) => None,
        };
        Ok(ModuleTree {
            files,
            builtin,
            dep,
        })
    }

    /// A module's ELF, decompressed if the kernel ships them compressed.
    fn read(&self, name: &str) -> Result<Vec<u8>> {
        let p = self
            .files
            .get(name)
            .with_context(|| format!("kernel module {name} not found"))?;
        let s = p.to_string_lossy();
        let tool = [(".xz", "xz"), (".zst", "zstd"), (".gz", "gzip")]
            .iter()
            .find(|(ext, _)| s.ends_with(ext))
            .map(|(_, t)| *t);
        match tool {
            Some(t) => decompress(t, p),
            None => std::fs::read(p).with_context(|| format!("reading {}", p.display())),
        }
    }

    fn deps(&self, name: &str) -> Result<Vec<String>> {
        if let Some(dep) = &self.dep {
            return dep
                .get(name)
                .cloned()
                .with_context(|| format!("kernel module {name} is not in modules.dep"));
        }
        let elf = self.read(name)?;
        modinfo_depends(&elf).with_context(|| format!("reading .modinfo of module {name}"))
    }

    /// Modules to `insmod`, in order, for `wanted`; built-in ones are left out.
    fn plan(&self, wanted: &[&str]) -> Result<Vec<String>> {
        let wanted: Vec<String> = wanted.iter().map(|w| w.replace('-', "_")).collect();
        let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
        let missing: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|w| !self.files.contains_key(*w) && !self.builtin.contains(*w))
            .collect();
        ensure!(
            missing.is_empty(),
            "kernel has neither a module nor a built-in driver for {missing:?}"
        );
        let loadable: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|w| !self.builtin.contains(*w))
            .collect();
        load_order(&loadable, |m| self.deps(m))
    }
}

// ---------------------------------------------------------------------------------------------
// Initramfs

/// What `/init` does, chosen on the kernel command line with `linuxtest.mode=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Check the disk: write a random pattern, read it back with the cache dropped, compare.
    Test,
    /// Only time a sequential read of the disk.
    Bench,
    /// A shell on the console, for `cargo xtask run --guest linux`.
    Shell,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Test => "test",
            Mode::Bench => "bench",
            Mode::Shell => "shell",
        }
    }

    /// MiB the mode writes (test) or reads (bench, and test's timing line). The test needs
    /// at least 8 MiB in the guest's RAM for the pattern.
    pub fn mib(self) -> u32 {
        match self {
            Mode::Test | Mode::Shell => 8,
            Mode::Bench => 32,
        }
    }
}

/// Options for [`build_initramfs`].
#[derive(Clone, Debug)]
pub struct InitramfsOptions {
    /// Modules `/init` loads (their dependencies are added, built-in ones dropped).
    pub modules: Vec<String>,
}

impl Default for InitramfsOptions {
    fn default() -> Self {
        InitramfsOptions {
            modules: DISK_MODULES.iter().map(|m| m.to_string()).collect(),
        }
    }
}

/// The kernel command line for `mode`.
///
/// - `console=ttyAMA0`: the VM's PL011 (emulated by the hypervisor); `earlycon` with no
///   argument takes it from `/chosen/stdout-path`, so early crashes are visible too.
/// - `rdinit=/init`: run our script from the initramfs (the default, spelled out).
/// - `iommu.passthrough=0 iommu.strict=1`: DMA through the SMMU with its TLB invalidated on
///   every unmap. Debian already builds with IOMMU_DEFAULT_DMA_STRICT=y; saying it here keeps
///   the test meaningful on a kernel built otherwise (passthrough would bypass the SMMU, lazy
///   invalidation would hide missing TLB invalidations).
/// - `panic=-1`: reboot at once on a panic (PSCI SYSTEM_RESET, a failed run) instead of
///   hanging until the host's timeout; `oops=panic` makes an oops count too (not in shell mode).
/// - `quiet` in bench mode: every console byte traps to the hypervisor.
/// - `linuxtest.mode=` and `linuxtest.mib=`: read by `/init` from `/proc/cmdline`.
pub fn bootargs(mode: Mode) -> String {
    let mut s = String::from(
        "console=ttyAMA0 earlycon rdinit=/init iommu.passthrough=0 iommu.strict=1 panic=-1",
    );
    if mode != Mode::Shell {
        s += " oops=panic";
    }
    if mode == Mode::Bench {
        s += " quiet";
    }
    let _ = write!(
        s,
        " linuxtest.mode={} linuxtest.mib={}",
        mode.name(),
        mode.mib()
    );
    s
}

/// The `/init` script. `modules` are module names in load order; each is at
/// `/lib/modules/<name>.ko` in the initramfs.
///
/// Console markers, one per line:
/// - `LINUX-INIT release=<uname -r> mode=<mode>`: /init started;
/// - `LINUX-SMMU <dmesg line>`: the kernel's arm-smmu-v3 messages (test, shell);
/// - `LINUX-IOMMU group=<n> type=<type> devices=<bdf...>`: each IOMMU group (test, shell);
/// - `LINUX-DISK pci=<bdf> iommu_group=<n|none> type=<DMA|...|none> access_platform=<1|0>`:
///   where vda's PCI function is and whether the virtio device negotiated
///   VIRTIO_F_ACCESS_PLATFORM (test, shell); the test fails unless the type is DMA or DMA-FQ
///   (translated) and access_platform is 1 (the device's DMA really goes through the IOMMU);
/// - `LINUX-CHECK bytes=<n> sha256=<hex>`: the pattern written and read back matched (test);
/// - `LINUX-PASS` or `LINUX-FAIL <why>` (test; FAIL in any mode);
/// - `LINUX-READ bytes=<n> ns=<t>`: a timed sequential O_DIRECT read of the disk (test, bench);
/// - `LINUX-SHELL`: the shell starts (shell).
///
/// It ends with `poweroff -f` (PSCI SYSTEM_OFF: the hypervisor's exit 0) on success and
/// `reboot -f` (SYSTEM_RESET: exit 1) after a `LINUX-FAIL`.
pub fn init_script(modules: &[String]) -> String {
    let mut s = String::from(INIT_HEAD);
    let _ = writeln!(s, "MODULES=\"{}\"", modules.join(" "));
    s += INIT_BODY;
    s
}

const INIT_HEAD: &str = r#"#!/bin/sh
# /init of the hypervisor's Linux test guest, generated by cargo xtask (xtask/src/linux.rs).
# Kernel command line: linuxtest.mode=test|bench|shell, linuxtest.mib=<MiB to write/read>.
export PATH=/bin
"#;

const INIT_BODY: &str = r#"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

mode=test
mib=8
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    linuxtest.mode=*) mode="${arg#*=}" ;;
    linuxtest.mib=*) mib="${arg#*=}" ;;
    esac
done

# poweroff is PSCI SYSTEM_OFF (the hypervisor's exit status 0), reboot is SYSTEM_RESET (1).
# In shell mode a failure is only reported: the shell is still wanted.
fail() {
    echo "LINUX-FAIL $*"
    [ "$mode" = shell ] && return 1
    sync
    reboot -f
    sleep 10
    exit 1
}

# Centiseconds since boot, from /proc/uptime ("12.34 56.78"); 1$f - 100 avoids octal "09".
uptime_cs() {
    read -r up rest < /proc/uptime
    echo $(( ${up%.*} * 100 + 1${up#*.} - 100 ))
}

# Monotonic nanoseconds: "now at <ns> nsecs" from /proc/timer_list (busybox's date has no %N),
# else /proc/uptime (10 ms steps).
now_ns() {
    while read -r a b ns rest; do
        if [ "$a $b" = "now at" ]; then
            echo "$ns"
            return
        fi
    done < /proc/timer_list
    echo $(( $(uptime_cs) * 10000000 ))
}

wait_disk() {
    start=$(uptime_cs)
    while [ ! -b /dev/vda ]; do
        if [ $(( $(uptime_cs) - start )) -gt 3000 ]; then
            fail "no /dev/vda after 30 s"
            return 1
        fi
        sleep 0.1 2>/dev/null || sleep 1
    done
}

show_iommu() {
    for g in /sys/kernel/iommu_groups/*; do
        [ -d "$g" ] || continue
        devs=""
        for d in "$g"/devices/*; do devs="$devs ${d##*/}"; done
        echo "LINUX-IOMMU group=${g##*/} type=$(cat "$g/type" 2>/dev/null) devices=${devs# }"
    done
    dev=$(readlink -f /sys/block/vda/device/..)
    group=none
    type=none
    if [ -e "$dev/iommu_group" ]; then
        group=$(readlink -f "$dev/iommu_group")
        group=${group##*/}
        type=$(cat "/sys/kernel/iommu_groups/$group/type" 2>/dev/null)
    fi
    # Feature bit 33 is VIRTIO_F_ACCESS_PLATFORM. Without it the driver hands the device
    # physical addresses and QEMU's device bypasses the IOMMU, whatever the group type says.
    features=$(cat /sys/block/vda/device/features 2>/dev/null)
    platform=${features:33:1}
    echo "LINUX-DISK pci=${dev##*/} iommu_group=$group type=$type access_platform=${platform:-none}"
    case "$type" in
    DMA | DMA-FQ) ;;
    *) fail "the disk's DMA is not translated by an IOMMU (group $group, type $type)" ;;
    esac
    [ "$platform" = 1 ] ||
        fail "no VIRTIO_F_ACCESS_PLATFORM (QEMU iommu_platform=on): the disk bypasses the IOMMU"
}

check_disk() {
    out=$(dd if=/dev/urandom of=/tmp/pattern bs=1048576 count="$mib" 2>&1) ||
        { fail "cannot make a $mib MiB pattern in /tmp: $out"; return; }
    want=$(sha256sum < /tmp/pattern)
    want=${want%% *}
    out=$(dd if=/tmp/pattern of=/dev/vda bs=1048576 oflag=direct conv=fsync 2>&1) ||
        { fail "writing /dev/vda: $out"; return; }
    rm -f /tmp/pattern
    sync
    echo 3 > /proc/sys/vm/drop_caches
    got=$(dd if=/dev/vda bs=1048576 count="$mib" iflag=direct 2>/dev/null | sha256sum)
    got=${got%% *}
    if [ "$got" != "$want" ]; then
        fail "read back sha256 $got, wrote $want"
        return
    fi
    echo "LINUX-CHECK bytes=$(( mib * 1048576 )) sha256=$want"
}

read_bench() {
    t0=$(now_ns)
    out=$(dd if=/dev/vda of=/dev/null bs=1048576 count="$mib" iflag=direct 2>&1) ||
        { fail "reading /dev/vda: $out"; return; }
    t1=$(now_ns)
    echo "LINUX-READ bytes=$(( mib * 1048576 )) ns=$(( t1 - t0 ))"
}

echo "LINUX-INIT release=$(uname -r) mode=$mode"
if [ "$mode" != bench ]; then
    dmesg | grep -i 'arm-smmu-v3' | while read -r line; do echo "LINUX-SMMU $line"; done
fi
for m in $MODULES; do
    insmod "/lib/modules/$m.ko" || fail "insmod $m"
done
wait_disk

case "$mode" in
test)
    show_iommu
    check_disk
    echo LINUX-PASS
    read_bench
    ;;
bench)
    read_bench
    ;;
shell)
    [ -b /dev/vda ] && show_iommu
    /bin/busybox --install -s /bin
    echo "LINUX-SHELL (exit the shell to power off)"
    setsid cttyhack sh || sh
    ;;
*)
    fail "unknown linuxtest.mode=$mode"
    ;;
esac
sync
poweroff -f
"#;

/// The initramfs archive from its parts: `busybox` (the binary) and `modules` (name, ELF) in
/// load order. Separate from [`build_initramfs`] so it can be tested without a kernel.
pub fn initramfs_cpio(busybox: &[u8], modules: &[(String, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut w = cpio::Writer::new();
    for d in ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"] {
        w.dir(d, 0o755)?;
    }
    // The kernel opens /dev/console for init's stdio before /init runs. Debian's kernel has a
    // built-in initramfs with it, but a kernel without one would leave /init mute.
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.file("bin/busybox", 0o755, busybox)?;
    for a in APPLETS {
        w.symlink(&format!("bin/{a}"), "busybox")?;
    }
    for (name, elf) in modules {
        w.file(&format!("lib/modules/{name}.ko"), 0o644, elf)?;
    }
    let names: Vec<String> = modules.iter().map(|(n, _)| n.clone()).collect();
    w.file("init", 0o755, init_script(&names).as_bytes())?;
    Ok(w.finish())
}

/// Builds the initramfs (an uncompressed newc cpio, which the kernel takes as is) for the
/// fetched packages: busybox, the modules `opts` asks for with their dependencies, and `/init`.
pub fn build_initramfs(pkgs: &LinuxPackages, opts: &InitramfsOptions) -> Result<Vec<u8>> {
    let busybox = std::fs::read(&pkgs.busybox)
        .with_context(|| format!("reading {}", pkgs.busybox.display()))?;
    let tree = ModuleTree::open(&pkgs.modules)
        .with_context(|| format!("indexing the modules in {}", pkgs.modules.display()))?;
    let wanted: Vec<&str> = opts.modules.iter().map(String::as_str).collect();
    let order = tree
        .plan(&wanted)
        .with_context(|| format!("resolving modules {wanted:?} of kernel {}", pkgs.release))?;
    let modules = order
        .into_iter()
        .map(|m| Ok((m.clone(), tree.read(&m)?)))
        .collect::<Result<Vec<_>>>()?;
    initramfs_cpio(&busybox, &modules)
}

// ---------------------------------------------------------------------------------------------
// Disk

/// Creates (or empties) the raw disk image QEMU attaches: `size` bytes of zeroes, sparse.
pub fn disk_image(path: &Path, size: u64) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)
        .with_context(|| format!("sizing {} to {size} bytes", path.display()))?;
    Ok(())
}

/// QEMU arguments that attach `disk` as a virtio-blk PCI function at `addr` (`"03.0"`, on
/// pcie.0, so its StreamID is its requester ID: 00:03.0 → 0x18).
///
/// `iommu_platform=on` is what sends the device's DMA through the SMMU: without it QEMU's
/// virtio devices use the system address space directly and the guest's driver hands them
/// guest-physical addresses, bypassing the SMMU (and, under the hypervisor, stage 2 too).
/// QEMU refuses `iommu_platform` on a transitional device, and on the root bus virtio-pci is
/// transitional by default, hence `disable-legacy=on`.
pub fn qemu_disk_args(disk: &Path, addr: &str) -> Vec<String> {
    // QEMU option values escape a comma by doubling it.
    let file = disk.display().to_string().replace(',', ",,");
    vec![
        "-drive".into(),
        format!("if=none,id={DRIVE_ID},file={file},format=raw"),
        "-device".into(),
        format!("virtio-blk-pci,drive={DRIVE_ID},iommu_platform=on,disable-legacy=on,addr={addr}"),
    ]
}

// ---------------------------------------------------------------------------------------------
// The payload and the board variant

/// What a VM with `payload = "linux"` embeds: the kernel Image and the initramfs.
#[derive(Clone, Debug)]
pub struct Payload {
    pub packages: LinuxPackages,
    /// The initramfs (`<cache>/initramfs.cpio`).
    pub initrd: PathBuf,
}

/// Fetches the packages (cached) and builds the initramfs into `<cache>/initramfs.cpio` (its
/// listing in `initramfs.txt`), rewriting that file only when its bytes change, so that the hypervisor, which embeds it, is
/// not rebuilt for nothing. One initramfs serves every [`Mode`]: `/init` reads the mode from
/// the kernel command line ([`bootargs`]).
pub fn payload(cache: &Path) -> Result<Payload> {
    let packages = fetch(cache)?;
    let archive = build_initramfs(&packages, &InitramfsOptions::default())?;
    let initrd = cache.join("initramfs.cpio");
    let listing = initrd.with_extension("txt");
    if !listing.is_file() || !std::fs::read(&initrd).is_ok_and(|old| old == archive) {
        // Read it back before a boot depends on it, and leave its listing beside it.
        let entries = cpio::list(&archive).context("reading back the new initramfs")?;
        for want in ["init", "bin/busybox", "dev/console"] {
            ensure!(
                entries.iter().any(|e| e.path == want),
                "the new initramfs has no {want}"
            );
        }
        std::fs::write(&listing, cpio::listing(&entries).join("\n") + "\n")
            .with_context(|| format!("writing {}", listing.display()))?;
        std::fs::write(&initrd, &archive)
            .with_context(|| format!("writing {}", initrd.display()))?;
    }
    eprintln!(
        "linux: kernel {} ({}), initramfs {} ({})",
        packages.release,
        rel(&packages.image),
        rel(&initrd),
        human(archive.len() as u64)
    );
    Ok(Payload { packages, initrd })
}

/// Bytes from the start of an arm64 `Image` to the end of its memory footprint (`.bss`
/// included): the header's `image_size` (offset 16), or the file size when that is 0 (kernels
/// before 3.17).
pub fn image_size(path: &Path) -> Result<u64> {
    let head = read_head(path, 64)?;
    ensure!(
        is_arm64_image(&head),
        "{} is not an arm64 Image",
        path.display()
    );
    let size = u64::from_le_bytes(head[16..24].try_into().unwrap());
    if size != 0 {
        return Ok(size);
    }
    Ok(std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len())
}

/// The Linux VM's disk: PCI function on pcie.0 (so its StreamID is its requester ID).
pub const DISK_ADDR: &str = "03.0";
/// The same function as the board file names it.
pub const DISK_BDF: &str = "00:03.0";
/// Its StreamID: requester ID 00:03.0 = 3 << 3.
pub const DISK_STREAM_ID: u32 = 0x18;
/// The Linux VM's RAM: 512M at IPA 0x8000_0000, PA 0x5000_0000.
pub const VM_IPA: u64 = 0x8000_0000;
pub const VM_PA: u64 = 0x5000_0000;
pub const VM_SIZE: &str = "512M";
/// Where the selftest VM (vm1) moves to, above the Linux VM.
pub const SELFTEST_PA: u64 = 0x7000_0000;
pub const SELFTEST_SIZE: &str = "64M";
/// The PL011 the VM's console is emulated at (the same IPA as the host's PL011).
pub const CONSOLE_IPA: u64 = 0x0900_0000;
/// The QEMU `addr=` of vm0's edu in `qemu-virt`, which the variant drops.
const VM0_EDU_ADDR: &str = "01.0";

/// Where the variant's scratch disk for `mode` is: `target/linux/disk-<mode>.img` (one per
/// mode, so a shell and a test run do not share a disk).
pub fn disk_path(mode: Mode) -> PathBuf {
    default_cache().join(format!("disk-{}.img", mode.name()))
}

/// The `addr=` option of a QEMU `-device` value.
fn device_addr(device: &str) -> Option<&str> {
    device.split(',').find_map(|o| o.strip_prefix("addr="))
}

/// Turns the `qemu-virt` board into its Linux variant (for `--guest linux`, the `linux` system
/// test and the `linux` benchmark; no board file is copied):
///
/// - vm0 becomes `linux`: Debian's kernel with our initramfs on CPUs 0-1, 512M of RAM at IPA
///   0x8000_0000 / PA 0x5000_0000, the emulated PL011 at 0x0900_0000, the virtio-blk disk at
///   00:03.0 (StreamID 0x18), no power controller or votes, no test hypercalls, and
///   [`bootargs`]`(mode)`;
/// - vm1 stays the selftest guest on CPUs 2-3 with its edu at 00:02.0 (StreamID 0x10, active
///   through Bus Master Enable), moved to PA 0x7000_0000 (64M);
/// - QEMU: vm0's edu at 01.0 is dropped, the disk ([`qemu_disk_args`]) is added, created afresh
///   ([`DISK_BYTES`], zeroed) before each run at [`disk_path`]`(mode)`.
pub fn variant(file: &mut BoardFile, mode: Mode) -> Result<()> {
    ensure!(
        file.board.name == "qemu-virt",
        "the Linux guest runs on the qemu-virt board only (its variant has fixed addresses), \
         not on {:?}",
        file.board.name
    );
    ensure!(
        file.vm.len() >= 2,
        "qemu-virt has {} VM(s); the Linux variant needs its two",
        file.vm.len()
    );
    file.vm.truncate(2);
    let q = file
        .qemu
        .as_mut()
        .context("qemu-virt has no [qemu] section")?;
    let before = q.devices.len();
    q.devices.retain(|d| device_addr(d) != Some(VM0_EDU_ADDR));
    ensure!(
        q.devices.len() + 1 == before,
        "qemu-virt's qemu.devices has no single device at addr={VM0_EDU_ADDR} (vm0's edu) to \
         replace with the Linux disk: {:?}",
        q.devices
    );
    let disk = disk_path(mode);
    q.disks = vec![Disk {
        args: qemu_disk_args(&disk, DISK_ADDR),
        path: disk,
        size: DISK_BYTES,
    }];
    file.vm[0] = VmSection {
        name: "linux".into(),
        cpus: vec![0, 1],
        payload: LINUX_PAYLOAD.into(),
        bootargs: Some(bootargs(mode)),
        console: Some(CONSOLE_IPA),
        memory: vec![Region {
            ipa: VM_IPA,
            pa: VM_PA,
            size: VM_SIZE.into(),
        }],
        devices: vec![],
        pci: vec![DISK_BDF.into()],
        stream_ids: vec![DISK_STREAM_ID],
        test_services: false,
        power_controller: None,
        power_votes: vec![],
    };
    let vm1 = &mut file.vm[1];
    vm1.cpus = vec![2, 3];
    let ipa = vm1.memory.first().map_or(VM_IPA, |m| m.ipa);
    vm1.memory = vec![Region {
        ipa,
        pa: SELFTEST_PA,
        size: SELFTEST_SIZE.into(),
    }];
    Ok(())
}

/// Checks that a Linux VM's first RAM region holds what the hypervisor puts there: the DTB at
/// its start, the kernel 2 MiB in (`kernel_size` bytes, `.bss` included) and the initramfs
/// after it. The hypervisor decides where exactly the initramfs goes; this only rules out a
/// region that cannot hold all three.
pub fn check_fits(vm: &Vm, kernel_size: u64, initrd_size: u64) -> Result<()> {
    let need = (2 << 20) + kernel_size.next_multiple_of(2 << 20) + initrd_size;
    let have = vm.memory.first().map_or(0, |m| m.size);
    ensure!(
        need <= have,
        "VM {:?}: its first memory region ({}) cannot hold the DTB, the kernel ({}) and the \
         initramfs ({}): {} needed",
        vm.name,
        human(have),
        human(kernel_size),
        human(initrd_size),
        human(need)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_from_host_sources() {
        let deb822 = "Types: deb\n\
                      # http://snapshot.debian.org/archive/debian/20250520T000000Z\n\
                      URIs: http://mirror.example/debian/\n\
                      Suites: bookworm bookworm-updates\n\
                      Components: main\n\n\
                      Types: deb\n\
                      URIs: http://mirror.example/debian-security\n\
                      Suites: bookworm-security\n\
                      Components: main\n";
        let list = "deb [arch=amd64] https://packages.cloud.google.com/apt cloud-sdk main\n";
        let m = debian_mirrors(&[
            ("x.list".into(), list.into()),
            ("debian.sources".into(), deb822.into()),
        ]);
        assert_eq!(m.main, "http://mirror.example/debian");
        assert_eq!(m.security, "http://mirror.example/debian-security");

        // One-line format with options; an Ubuntu host lends nothing.
        let m = debian_mirrors(&[(
            "sources.list".into(),
            "deb [signed-by=/k.gpg] http://ftp.de.debian.org/debian bookworm main\n\
             deb http://archive.ubuntu.com/ubuntu jammy main\n"
                .into(),
        )]);
        assert_eq!(m.main, "http://ftp.de.debian.org/debian");
        assert_eq!(m.security, DEFAULT_SECURITY_MIRROR);
        let m = debian_mirrors(&[(
            "sources.list".into(),
            "deb http://archive.ubuntu.com/ubuntu jammy main\n".into(),
        )]);
        assert_eq!(m.main, DEFAULT_MIRROR);
    }

    #[test]
    fn private_apt_config() {
        let o = apt_options(Path::new("/c/apt"));
        assert!(o.contains(&"Dir::State::status=/c/apt/status".to_owned()));
        assert!(o.contains(&"APT::Architectures=arm64".to_owned()));
        assert!(o.chunks(2).all(|p| p[0] == "-o"));
        let s = sources_list(
            &Mirrors {
                main: "http://m/debian".into(),
                security: "http://m/debian-security".into(),
            },
            Some("/k.gpg"),
        );
        assert!(s.contains("deb [arch=arm64 signed-by=/k.gpg] http://m/debian bookworm main\n"));
        assert!(s.contains("http://m/debian-security bookworm-security main\n"));
    }

    #[test]
    fn kernel_from_metapackage() {
        let show = "Package: linux-image-arm64\nSource: linux-signed-arm64 (6.1.192+2)\n\
                    Version: 6.1.192-2\n\
                    Depends: linux-image-6.1.0-56-arm64 (= 6.1.192-2)\n";
        assert_eq!(
            kernel_package_from_meta(show).as_deref(),
            Some("linux-image-6.1.0-56-arm64")
        );
        assert_eq!(kernel_package_from_meta("Package: x\n"), None);
        assert_eq!(
            deb_name_version("busybox-static_1%3a1.35.0-4+deb12u1+b1_arm64.deb"),
            Some(("busybox-static".into(), "1:1.35.0-4+deb12u1+b1".into()))
        );
    }

    #[test]
    fn image_magic() {
        let mut h = vec![0u8; 64];
        assert!(!is_arm64_image(&h));
        h[56..60].copy_from_slice(b"ARM\x64");
        assert!(is_arm64_image(&h));
        assert!(!is_arm64_image(&h[..59]));
    }

    #[test]
    fn module_names() {
        assert_eq!(
            module_name("kernel/drivers/block/virtio_blk.ko").as_deref(),
            Some("virtio_blk")
        );
        assert_eq!(
            module_name("virtio-rng.ko.xz").as_deref(),
            Some("virtio_rng")
        );
        assert_eq!(module_name("a/b.ko.zst").as_deref(), Some("b"));
        assert_eq!(module_name("modules.dep"), None);
    }

    #[test]
    fn modules_dep_order() {
        let dep = "kernel/drivers/block/virtio_blk.ko:\n\
                   kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko\n\
                   kernel/drivers/virtio/virtio_pci_modern_dev.ko:\n\
                   kernel/drivers/virtio/virtio_pci_legacy_dev.ko:\n\
                   kernel/fs/ext4/ext4.ko: kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko kernel/lib/crc16.ko\n\
                   kernel/fs/mbcache.ko:\n\
                   kernel/fs/jbd2/jbd2.ko:\n\
                   kernel/lib/crc16.ko:\n";
        let map = parse_modules_dep(dep).unwrap();
        let deps = |m: &str| map.get(m).cloned().context(m.to_owned());
        assert_eq!(
            load_order(&["virtio_pci", "virtio-blk"], deps).unwrap(),
            [
                "virtio_pci_legacy_dev",
                "virtio_pci_modern_dev",
                "virtio_pci",
                "virtio_blk"
            ]
        );
        // Shared dependencies come once, before their first user.
        let order = load_order(&["ext4", "jbd2", "virtio_blk"], deps).unwrap();
        assert_eq!(order, ["mbcache", "jbd2", "crc16", "ext4", "virtio_blk"]);
        assert!(load_order(&["nope"], deps).is_err());
        assert!(parse_modules_dep("no colon\n").is_err());
    }

    #[test]
    fn dependency_cycle_is_an_error() {
        let deps = |m: &str| {
            Ok(match m {
                "a" => vec!["b".to_owned()],
                "b" => vec!["c".to_owned()],
                _ => vec!["a".to_owned()],
            })
        };
        let e = load_order(&["a"], deps).unwrap_err().to_string();
        assert!(e.contains("a -> b -> c -> a"), "{e}");
    }

    /// A minimal ELF64 LE: null section, .shstrtab, .modinfo.
    fn fake_module(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let strtab_off = elf.len();
        elf.extend_from_slice(shstrtab);
        let modinfo_off = elf.len();
        elf.extend_from_slice(modinfo);
        while !elf.len().is_multiple_of(8) {
            elf.push(0);
        }
        let shoff = elf.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        sh(0, 0, 0);
        sh(1, strtab_off, shstrtab.len());
        sh(11, modinfo_off, modinfo.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        elf
    }

    #[test]
    fn modinfo_dependencies() {
        let elf = fake_module(
            b"license=GPL\0depends=virtio_pci_modern_dev,virtio-pci-legacy-dev\0name=virtio_pci\0",
        );
        assert_eq!(
            modinfo_depends(&elf).unwrap(),
            ["virtio_pci_modern_dev", "virtio_pci_legacy_dev"]
        );
        let elf = fake_module(b"depends=\0name=virtio_blk\0");
        assert!(modinfo_depends(&elf).unwrap().is_empty());
        assert!(modinfo(b"not an elf").is_err());
        assert!(modinfo(&fake_module(b"")[..100]).is_err());
    }

    #[test]
    fn module_tree_from_modinfo_skips_builtins() {
        let dir = std::env::temp_dir().join(format!("xtask-linux-mods-{}", std::process::id()));
        let virtio = dir.join("kernel/drivers/virtio");
        let block = dir.join("kernel/drivers/block");
        std::fs::create_dir_all(&virtio).unwrap();
        std::fs::create_dir_all(&block).unwrap();
        let put = |p: PathBuf, info: &[u8]| std::fs::write(p, fake_module(info)).unwrap();
        put(
            virtio.join("virtio_pci.ko"),
            b"depends=virtio_pci_modern_dev,virtio_pci_legacy_dev\0",
        );
        put(virtio.join("virtio_pci_modern_dev.ko"), b"depends=\0");
        put(virtio.join("virtio_pci_legacy_dev.ko"), b"depends=\0");
        put(block.join("virtio_blk.ko"), b"depends=\0");
        std::fs::write(
            dir.join("modules.builtin"),
            "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\n",
        )
        .unwrap();
        let tree = ModuleTree::open(&dir).unwrap();
        assert!(tree.dep.is_none());
        assert_eq!(
            tree.plan(&["virtio", "virtio-pci", "virtio_blk"]).unwrap(),
            [
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio_pci",
                "virtio_blk"
            ]
        );
        assert!(tree.read("virtio_blk").unwrap().starts_with(b"\x7fELF"));
        let e = tree.plan(&["virtio_scsi"]).unwrap_err().to_string();
        assert!(e.contains("virtio_scsi"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn script_loads_modules_in_order_and_has_markers() {
        let s = init_script(&["virtio_pci_modern_dev".into(), "virtio_blk".into()]);
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(s.contains("MODULES=\"virtio_pci_modern_dev virtio_blk\"\n"));
        for marker in [
            "LINUX-INIT release=",
            "LINUX-SMMU ",
            "LINUX-IOMMU group=",
            "LINUX-DISK pci=",
            "LINUX-CHECK bytes=",
            "LINUX-PASS",
            "LINUX-FAIL ",
            "LINUX-READ bytes=",
            "LINUX-SHELL",
            "iflag=direct",
            "echo 3 > /proc/sys/vm/drop_caches",
            "poweroff -f",
            "reboot -f",
        ] {
            assert!(s.contains(marker), "{marker} missing");
        }
        // Every command the script runs is an applet we link (or a shell builtin).
        for cmd in [
            "mount",
            "insmod",
            "dd",
            "sha256sum",
            "dmesg",
            "setsid",
            "cttyhack",
        ] {
            assert!(APPLETS.contains(&cmd), "{cmd}");
        }
    }

    #[test]
    fn initramfs_layout() {
        let mods = vec![
            ("virtio_pci_modern_dev".to_owned(), b"\x7fELF-a".to_vec()),
            ("virtio_blk".to_owned(), b"\x7fELF-b".to_vec()),
        ];
        let a = initramfs_cpio(b"\x7fELF-busybox", &mods).unwrap();
        let e = cpio::list(&a).unwrap();
        let find = |p: &str| {
            e.iter()
                .find(|e| e.path == p)
                .unwrap_or_else(|| panic!("{p}"))
        };
        assert_eq!(find("dev/console").kind, cpio::Kind::CharDev(5, 1));
        assert_eq!(find("bin/sh").kind, cpio::Kind::Symlink("busybox".into()));
        assert_eq!(find("bin/busybox").perm, 0o755);
        assert_eq!(
            find("lib/modules/virtio_blk.ko").kind,
            cpio::Kind::File(b"\x7fELF-b".to_vec())
        );
        let init = find("init");
        assert_eq!(init.perm, 0o755);
        let cpio::Kind::File(text) = &init.kind else {
            panic!("init is not a file")
        };
        assert!(
            String::from_utf8_lossy(text).contains("MODULES=\"virtio_pci_modern_dev virtio_blk\"")
        );
        // Parents come before their children (the kernel does not create missing folders).
        let pos = |p: &str| e.iter().position(|e| e.path == p).unwrap();
        for x in &e {
            if let Some((parent, _)) = x.path.rsplit_once('/') {
                assert!(pos(parent) < pos(&x.path), "{} before {parent}", x.path);
            }
        }
        let listing = cpio::listing(&e);
        assert!(listing.contains(&"lrwxrwxrwx bin/sh -> busybox".to_owned()));
    }

    #[test]
    fn bootargs_per_mode() {
        let t = bootargs(Mode::Test);
        for w in [
            "console=ttyAMA0",
            "rdinit=/init",
            "iommu.strict=1",
            "iommu.passthrough=0",
            "panic=-1",
            "oops=panic",
            "linuxtest.mode=test",
            "linuxtest.mib=8",
        ] {
            assert!(t.split(' ').any(|x| x == w), "{w} not in {t}");
        }
        assert!(bootargs(Mode::Bench).contains("linuxtest.mode=bench linuxtest.mib=32"));
        assert!(!bootargs(Mode::Shell).contains("oops=panic"));
    }

    #[test]
    fn disk_and_qemu_args() {
        let dir = std::env::temp_dir().join(format!("xtask-linux-disk-{}", std::process::id()));
        let p = dir.join("d,isk.img");
        disk_image(&p, 1 << 20).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        let a = qemu_disk_args(&p, "03.0");
        assert_eq!(a[0], "-drive");
        assert!(a[1].contains("d,,isk.img,format=raw"));
        assert_eq!(
            a[3],
            "virtio-blk-pci,drive=linuxdisk,iommu_platform=on,disable-legacy=on,addr=03.0"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn qemu_virt() -> (BoardFile, String) {
        crate::board::load(&util::root(), "qemu-virt").unwrap()
    }

    #[test]
    fn board_variant() {
        use crate::board::{Bdf, Window};
        let (mut file, source) = qemu_virt();
        variant(&mut file, Mode::Test).unwrap();
        let b = file
            .validate(&source, &util::root().join("guests"))
            .unwrap();
        assert_eq!(b.vms.len(), 2);
        let l = &b.vms[0];
        assert_eq!((l.name.as_str(), l.payload.as_str()), ("linux", "linux"));
        assert_eq!(l.cpus, [0, 1]);
        assert_eq!(
            l.memory,
            [Window {
                ipa: 0x8000_0000,
                pa: 0x5000_0000,
                size: 512 << 20
            }]
        );
        assert_eq!(l.console, Some(0x0900_0000));
        assert_eq!(
            l.pci,
            [Bdf {
                bus: 0,
                device: 3,
                function: 0
            }]
        );
        assert_eq!(l.stream_ids, [0x18]);
        assert_eq!(l.bootargs.as_deref(), Some(bootargs(Mode::Test).as_str()));
        assert!(l.devices.is_empty() && l.power_votes.is_empty());
        assert_eq!((l.power_controller, l.test_services), (None, false));

        // vm1: the selftest guest, moved above the Linux VM, keeping its edu and its config.
        let s = &b.vms[1];
        let (orig, _) = qemu_virt();
        assert_eq!((s.name.as_str(), s.payload.as_str()), ("vm1", "selftest"));
        assert_eq!(s.cpus, [2, 3]);
        assert_eq!(
            s.memory,
            [Window {
                ipa: 0x8000_0000,
                pa: 0x7000_0000,
                size: 64 << 20
            }]
        );
        assert_eq!(
            s.pci,
            [Bdf {
                bus: 0,
                device: 2,
                function: 0
            }]
        );
        assert_eq!(s.stream_ids, [0x10]);
        assert_eq!(s.bootargs, orig.vm[1].bootargs);
        assert_eq!(s.test_services, orig.vm[1].test_services);
        assert!(s.power_votes.is_empty());
        // Both VMs' RAM inside QEMU's 1G, clear of the hypervisor's reserved 256M.
        let ram_end = 0x4000_0000 + (1u64 << 30);
        assert!(
            b.vms
                .iter()
                .all(|v| v.memory[0].pa >= 0x5000_0000
                    && v.memory[0].pa + v.memory[0].size <= ram_end)
        );

        // QEMU: vm1's edu stays, vm0's goes, the disk comes in at 03.0 with its own drive.
        let q = b.qemu.as_ref().unwrap();
        assert_eq!(q.devices, ["edu,dma_mask=0xffffffffffffffff,addr=02.0"]);
        assert_eq!((q.smp, q.memory), (4, 1 << 30));
        assert_eq!(q.disks.len(), 1);
        let d = &q.disks[0];
        assert_eq!(d.path, disk_path(Mode::Test));
        assert!(d.path.ends_with("linux/disk-test.img"));
        assert_eq!(d.size, DISK_BYTES);
        assert_eq!(d.args, qemu_disk_args(&d.path, "03.0"));
        // The smmu_power section stays (vm1's edu is powered through Bus Master Enable).
        assert!(b.smmu_power.is_some());

        // Other modes differ only in bootargs and disk.
        let (mut bench, _) = qemu_virt();
        variant(&mut bench, Mode::Bench).unwrap();
        assert!(
            bench.vm[0]
                .bootargs
                .as_deref()
                .unwrap()
                .contains("linuxtest.mode=bench")
        );
        assert!(
            bench.qemu.as_ref().unwrap().disks[0]
                .path
                .ends_with("disk-bench.img")
        );
    }

    #[test]
    fn variant_needs_qemu_virt() {
        let (mut file, _) = qemu_virt();
        file.board.name = "other".into();
        let e = variant(&mut file, Mode::Test).unwrap_err().to_string();
        assert!(e.contains("qemu-virt board only"), "{e}");
        let (mut file, _) = qemu_virt();
        file.qemu.as_mut().unwrap().devices.clear();
        let e = variant(&mut file, Mode::Test).unwrap_err().to_string();
        assert!(e.contains("addr=01.0"), "{e}");
        let (mut file, _) = qemu_virt();
        file.vm.truncate(1);
        assert!(variant(&mut file, Mode::Test).is_err());
        assert_eq!(device_addr("edu,dma_mask=0xff,addr=01.0"), Some("01.0"));
        assert_eq!(device_addr("edu"), None);
    }

    #[test]
    fn kernel_and_initrd_must_fit() {
        let (mut file, source) = qemu_virt();
        variant(&mut file, Mode::Test).unwrap();
        let b = file
            .validate(&source, &util::root().join("guests"))
            .unwrap();
        // Debian's 6.1 Image (~33 MB, ~36 MB with .bss) and a ~2 MB initramfs fit in 512M.
        check_fits(&b.vms[0], 36 << 20, 2 << 20).unwrap();
        let e = check_fits(&b.vms[0], 500 << 20, 20 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("VM \"linux\""), "{e}");
    }

    #[test]
    fn image_size_from_header() {
        let dir = std::env::temp_dir().join(format!("xtask-linux-img-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("Image");
        let mut h = vec![0u8; 128];
        h[56..60].copy_from_slice(b"ARM\x64");
        std::fs::write(&p, &h).unwrap();
        assert_eq!(image_size(&p).unwrap(), 128, "no image_size: the file size");
        h[16..24].copy_from_slice(&0x240_0000u64.to_le_bytes());
        std::fs::write(&p, &h).unwrap();
        assert_eq!(image_size(&p).unwrap(), 0x240_0000);
        std::fs::write(&p, [0u8; 64]).unwrap();
        assert!(image_size(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Needs a Debian mirror: `cargo test -p xtask -- --ignored fetch_and_build`.
    #[test]
    #[ignore]
    fn fetch_and_build() {
        let pkgs = fetch(&default_cache()).unwrap();
        let head = read_head(&pkgs.image, 64).unwrap();
        assert!(is_arm64_image(&head));
        let a = build_initramfs(&pkgs, &InitramfsOptions::default()).unwrap();
        let e = cpio::list(&a).unwrap();
        for m in [
            "virtio_pci_modern_dev",
            "virtio_pci_legacy_dev",
            "virtio_pci",
            "virtio_blk",
        ] {
            let p = format!("lib/modules/{m}.ko");
            assert!(e.iter().any(|e| e.path == p), "{p} missing");
        }
        for l in cpio::listing(&e) {
            eprintln!("{l}");
        }
        // Left for booting by hand: qemu-system-aarch64 -kernel <Image> -initrd <this>.
        let out = default_cache().join("initramfs.cpio");
        std::fs::write(&out, &a).unwrap();
        eprintln!("initramfs: {} ({} bytes)", out.display(), a.len());
    }
}
