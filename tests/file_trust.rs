//! Nothing a file can do makes the daemon run foreign code: compile-cache
//! entries that someone else owns, that others may write, or whose code
//! changed are recompiled, never loaded; policy files and directories owned
//! by somebody else, or below a directory others can write, are refused by
//! name; FIFOs, directories and dangling links named `*.wasm` are logged and
//! never opened; policy files and slots are bounded.
//!
//! The tests run as root (here and on CI), so they chown files to `nobody`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use vm_balancer::config::Config;
use vm_balancer::policy::builtin::Builtin;
use vm_balancer::policy::cache::{check_private_dir, CompileCache};
use vm_balancer::policy::dir::scan;
use vm_balancer::policy::file::{read_policy_file, FileRules};
use vm_balancer::policy::reload::Reloader;
use vm_balancer::policy::samples::samples;
use vm_balancer::policy::source::PolicySource;
use vm_balancer::policy::PolicySet;
use vm_balancer::sdk::encode_snapshot;

use crate::util::{policy_tempdir, quiet_cpu, relaxed_config, relaxed_limits, s, wait_until, Daemon};

const NOBODY: u32 = 65534;

fn chown_nobody(path: &Path) {
    std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).expect("the tests run as root");
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The cache's one `.cwasm` entry.
fn the_entry(dir: &Path) -> PathBuf {
    let entries: Vec<PathBuf> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "cwasm")).collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    entries[0].clone()
}

/// The file range of the ELF section `name` of a compiled artifact.
fn elf_section(elf: &[u8], name: &str) -> std::ops::Range<usize> {
    let u16_at = |at: usize| u16::from_le_bytes(elf[at..at + 2].try_into().unwrap()) as usize;
    let u32_at = |at: usize| u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) as usize;
    let u64_at = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap()) as usize;
    assert_eq!(&elf[..4], b"\x7fELF", "a compiled artifact is an ELF file");
    let (shoff, shentsize, shnum, shstrndx) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
    let header = |i: usize| shoff + i * shentsize;
    let strtab = u64_at(header(shstrndx) + 0x18);
    (0..shnum)
        .find_map(|i| {
            let at = strtab + u32_at(header(i));
            let end = at + elf[at..].iter().position(|b| *b == 0).unwrap();
            (&elf[at..end] == name.as_bytes()).then(|| {
                let (offset, size) = (u64_at(header(i) + 0x18), u64_at(header(i) + 0x20));
                offset..offset + size
            })
        })
        .unwrap_or_else(|| panic!("no {name} section"))
}

/// Fills a cache with the CPU policy, lets `spoil` do something to its
/// entry, loads again: the entry must be refused (counted by `counter`) and
/// recompiled, and the recompiled policy must decide as the native default
/// does. The rewritten entry is then trusted again.
fn spoiled_entry_is_recompiled(spoil: impl FnOnce(&Path), counter: fn(&vm_balancer::policy::cache::CacheStats) -> u64) {
    let state = tempfile::tempdir().unwrap();
    let cache = Arc::new(CompileCache::new(state.path(), 64 << 20).unwrap());
    cache.component("cpu", Builtin::Cpu.wasm()).unwrap();
    let entry = the_entry(state.path());
    spoil(&entry);
    let policy_dir = policy_tempdir();
    let file = policy_dir.path().join("10-cpu.wasm");
    std::fs::write(&file, Builtin::Cpu.wasm()).unwrap();
    let mut policy = PolicySet::new(&relaxed_limits()).with_cache(Some(cache.clone())).load_spec(s(&file)).expect("loads");
    let stats = cache.stats();
    assert_eq!(stats.hits.load(Ordering::Relaxed), 0, "the spoiled entry was loaded");
    assert_eq!(stats.misses.load(Ordering::Relaxed), 2, "recompiled");
    assert_eq!(stats.rejected.load(Ordering::Relaxed), 1);
    assert_eq!(counter(stats), 1, "{stats:?}");
    let (_, snapshot) = samples().into_iter().nth(1).unwrap();
    let wasm = policy.decide(&encode_snapshot(&snapshot)).expect("decides");
    let native = Builtin::Cpu.native().decide(&snapshot).unwrap();
    assert!(!native.is_empty(), "the sample makes the policy act");
    assert_eq!(format!("{wasm:?}"), format!("{native:?}"), "the recompiled policy decides correctly");
    let meta = std::fs::symlink_metadata(&entry).unwrap();
    assert!(meta.is_file(), "rewritten as a plain file");
    assert_eq!((std::os::unix::fs::MetadataExt::uid(&meta), meta.permissions().mode() & 0o777), (0, 0o600), "rewritten 0600, ours");
    cache.component("cpu", Builtin::Cpu.wasm()).unwrap();
    assert_eq!(stats.hits.load(Ordering::Relaxed), 1, "the rewritten entry is a hit");
}

#[test]
fn a_cache_entry_owned_by_nobody_is_recompiled_never_loaded() {
    spoiled_entry_is_recompiled(chown_nobody, |s| s.untrusted.load(Ordering::Relaxed));
}

#[test]
fn a_cache_entry_with_mode_0666_is_recompiled_never_loaded() {
    spoiled_entry_is_recompiled(|entry| chmod(entry, 0o666), |s| s.untrusted.load(Ordering::Relaxed));
}

#[test]
fn a_cache_entry_that_is_a_symlink_is_recompiled_never_followed() {
    spoiled_entry_is_recompiled(
        |entry| {
            let real = entry.with_extension("real");
            std::fs::rename(entry, &real).unwrap();
            std::os::unix::fs::symlink(&real, entry).unwrap();
        },
        |s| s.untrusted.load(Ordering::Relaxed),
    );
}

#[test]
fn a_flipped_byte_in_a_cache_entrys_code_is_recompiled_never_loaded() {
    spoiled_entry_is_recompiled(
        |entry| {
            let mut bytes = std::fs::read(entry).unwrap();
            let text = elf_section(&bytes, ".text");
            let at = text.start + text.len() / 2;
            bytes[at] ^= 0xff;
            // In place: same owner, same mode, only the code differs.
            std::fs::OpenOptions::new().write(true).open(entry).and_then(|mut f| std::io::Write::write_all(&mut f, &bytes)).unwrap();
        },
        |s| s.corrupt.load(Ordering::Relaxed),
    );
}

#[test]
fn a_cache_entry_without_its_digest_is_recompiled_never_loaded() {
    spoiled_entry_is_recompiled(
        |entry| std::fs::remove_file(format!("{}.sha256", entry.display())).unwrap(),
        |s| s.corrupt.load(Ordering::Relaxed),
    );
}

#[test]
fn group_writable_or_foreign_cache_and_state_dirs_are_refused_by_name() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("compile-cache");
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o770);
    let e = CompileCache::new(&dir, 1 << 20).unwrap_err().to_string();
    assert!(e.contains(&dir.display().to_string()) && e.contains("0770") && e.contains("writable by group or others"), "{e}");
    assert!(CompileCache::open_or_warn(&dir, 1).is_none(), "refused = no cache");
    chmod(&dir, 0o700);
    chown_nobody(&dir);
    let e = CompileCache::new(&dir, 1 << 20).unwrap_err().to_string();
    assert!(e.contains(&dir.display().to_string()) && e.contains("owned by another user") && e.contains("65534"), "{e}");
    // The state directory's check: the same rule, and a missing one is made 0700.
    let state = home.path().join("state/vm-balancer");
    check_private_dir(&state).unwrap();
    assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o700);
    chmod(&state, 0o757);
    let e = check_private_dir(&state).unwrap_err().to_string();
    assert!(e.contains(&state.display().to_string()) && e.contains("0757"), "{e}");
}

#[test]
fn a_policy_file_owned_by_nobody_is_refused_naming_it() {
    let dir = policy_tempdir();
    let file = dir.path().join("10-cpu.wasm");
    std::fs::write(&file, Builtin::Cpu.wasm()).unwrap();
    chmod(&file, 0o644);
    chown_nobody(&file);
    let e = scan(dir.path(), 16).unwrap_err().to_string();
    assert!(e.contains(&file.display().to_string()) && e.contains("uid 65534"), "the directory is refused: {e}");
    // `run --policy FILE` reads with the daemon's rules.
    let daemon = PolicySet::new(&relaxed_limits()).with_file_rules(FileRules::daemon(&Config::default()));
    let e = daemon.load_spec(s(&file)).err().expect("refused").to_string();
    assert!(e.contains(&file.display().to_string()) && e.contains("uid 65534"), "{e}");
    // An author's offline `policy check` of a file is not the daemon's business.
    assert!(PolicySet::new(&relaxed_limits()).load_spec(s(&file)).is_ok());
}

#[test]
fn a_policy_dir_below_a_nobody_owned_or_world_writable_directory_is_refused_naming_it() {
    let base = policy_tempdir();
    let parent = base.path().join("parent");
    let dir = parent.join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("10-cpu.wasm"), Builtin::Cpu.wasm()).unwrap();
    assert!(scan(&dir, 16).is_ok());
    chown_nobody(&parent);
    let e = scan(&dir, 16).unwrap_err().to_string();
    assert!(e.contains(&format!("the directory {} above it is owned by uid 65534", parent.display())), "{e}");
    let daemon = PolicySet::new(&relaxed_limits()).with_file_rules(FileRules::daemon(&Config::default()));
    let e = daemon.load_spec(s(&dir.join("10-cpu.wasm"))).err().expect("refused").to_string();
    assert!(e.contains(&parent.display().to_string()), "a --policy file too: {e}");
    // A world-writable directory above: anyone could swap what lies below.
    let open = policy_tempdir();
    let opened = open.path().join("open");
    std::fs::create_dir(&opened).unwrap();
    std::fs::set_permissions(&opened, std::fs::Permissions::from_mode(0o777)).unwrap();
    let below = opened.join("policies");
    std::fs::create_dir(&below).unwrap();
    std::fs::write(below.join("10-cpu.wasm"), Builtin::Cpu.wasm()).unwrap();
    let e = scan(&below, 16).unwrap_err().to_string();
    assert!(e.contains(&format!("the directory {} above it has mode 0777", opened.display())), "{e}");
    // A symlink out of a good directory into it is refused when read.
    let good = policy_tempdir();
    std::os::unix::fs::symlink(below.join("10-cpu.wasm"), good.path().join("10-cpu.wasm")).unwrap();
    let e = read_policy_file(&good.path().join("10-cpu.wasm"), &FileRules::daemon(&Config::default())).unwrap_err().to_string();
    assert!(e.contains("above it has mode 0777"), "{e}");
    // /tmp is world-writable but sticky and root's: nobody else can rename
    // or remove the root-owned directory made in it, so that one is safe.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("10-cpu.wasm"), Builtin::Cpu.wasm()).unwrap();
    assert!(scan(tmp.path(), 16).is_ok(), "a root-owned 0700 directory in sticky /tmp");
    // Unless someone else owns the directory in it.
    chown_nobody(tmp.path());
    assert!(scan(tmp.path(), 16).is_err());
}

#[test]
fn an_oversized_policy_file_is_refused_without_being_read() {
    let dir = policy_tempdir();
    let file = dir.path().join("10-huge.wasm");
    std::fs::write(&file, b"\0asm\x0d\0\x01\0").unwrap();
    // Sparse: 16 GiB that cost nothing, and that no test machine could read whole.
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(16 << 30).unwrap();
    let e = read_policy_file(&file, &FileRules::daemon(&Config::default())).unwrap_err().to_string();
    assert!(e.contains(&file.display().to_string()) && e.contains("policy_max_file_mib = 64"), "{e}");
    let daemon = PolicySet::new(&relaxed_limits()).with_file_rules(FileRules::daemon(&Config::default()));
    let e = daemon.load_spec(s(&file)).err().expect("refused").to_string();
    assert!(e.contains("policy_max_file_mib"), "{e}");
    // A raised bound lets a file of that size through to the header check.
    let raised = Config { policy_max_file_mib: 1, ..Config::default() };
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(512 << 10).unwrap();
    let e = read_policy_file(&file, &FileRules::daemon(&raised));
    assert!(e.is_ok(), "within the bound, read (the compiler judges it): {e:?}");
}

#[test]
fn seventeen_policy_files_over_16_slots_refuse_the_directory_and_keep_the_running_slots() {
    let _quiet = quiet_cpu();
    // The policy directory is a symlink, switched from 2 files to 17 in one
    // rename: no scan can ever see a count in between.
    let base = policy_tempdir();
    let (two, seventeen, dir) = (base.path().join("two"), base.path().join("seventeen"), base.path().join("policies"));
    let name = |i: usize| format!("{:02}-p.wasm", 10 + i);
    for (at, n) in [(&two, 2), (&seventeen, 17)] {
        std::fs::create_dir(at).unwrap();
        for i in 0..n {
            std::fs::write(at.join(name(i)), Builtin::Cpu.wasm()).unwrap();
        }
    }
    std::os::unix::fs::symlink(&two, &dir).unwrap();
    let config = relaxed_config();
    let state = tempfile::tempdir().unwrap();
    let cache = Some(Arc::new(CompileCache::new(state.path(), 64 << 20).unwrap()));
    let mut set = PolicySet::new(&config.limits);
    let reloader = Reloader::spawn(&dir, &config, cache, set.last_snapshot());
    assert!(reloader.wait_and_apply(&mut set, Duration::from_secs(60)), "initial plan");
    assert_eq!(set.slots().len(), 2);
    let link = base.path().join(".policies.new");
    std::os::unix::fs::symlink(&seventeen, &link).unwrap();
    std::fs::rename(&link, &dir).unwrap();
    let scans = reloader.stats().scans;
    reloader.request();
    wait_until("a rescan", Duration::from_secs(60), || reloader.stats().scans > scans);
    std::thread::sleep(Duration::from_millis(500)); // a plan, if one were wrongly made, is sent right after its scan
    assert!(!reloader.poll(&mut set), "17 files: no plan");
    let names: Vec<&str> = set.slots().iter().map(|s| s.name()).collect();
    assert_eq!(names, ["10-p.wasm", "11-p.wasm"], "the running slots stay");
    // A start with 17 files is an error naming the count and the key.
    let e = PolicySource::start(&config, &[], &dir, None).err().expect("refused").to_string();
    assert!(e.contains("17 policy files") && e.contains("policy_max_slots = 16") && e.contains(&dir.display().to_string()), "{e}");
    let specs: Vec<String> = (0..17).map(|i| s(&seventeen.join(name(i))).to_string()).collect();
    let e = PolicySource::start(&config, &specs, &dir, None).err().expect("refused").to_string();
    assert!(e.contains("17 --policy specs") && e.contains("policy_max_slots = 16"), "{e}");
    // Back to 16: all of them run.
    std::fs::remove_file(seventeen.join(name(16))).unwrap();
    reloader.request();
    wait_until("16 slots", Duration::from_secs(120), || {
        reloader.poll(&mut set);
        set.slots().len() == 16
    });
}

/// The daemon on a directory with a FIFO, a directory and a dangling link
/// named `*.wasm`, and a symlink to a good policy: one log line each, the
/// link followed (its target named), the scan never blocked; rescans (two
/// SIGHUPs and a dropped-in file) log none of them again.
#[test]
fn odd_entries_are_logged_once_each_and_a_symlink_is_followed_naming_its_target() {
    let _quiet = quiet_cpu();
    let base = policy_tempdir();
    let dir = base.path().join("policies");
    std::fs::create_dir(&dir).unwrap();
    let real = base.path().join("real-cpu.wasm");
    std::fs::write(&real, Builtin::Cpu.wasm()).unwrap();
    std::os::unix::fs::symlink(&real, dir.join("20-link.wasm")).unwrap();
    let mkfifo = std::process::Command::new("mkfifo").arg(dir.join("x.wasm")).status().expect("mkfifo runs");
    assert!(mkfifo.success());
    std::fs::create_dir(dir.join("y.wasm")).unwrap();
    std::os::unix::fs::symlink(base.path().join("nowhere.wasm"), dir.join("z.wasm")).unwrap();
    let state = tempfile::tempdir().unwrap();
    let config = format!("state_dir = {:?}\n[limits]\ndecide_timeout_ms = {}\n", state.path(), crate::util::RELAXED_TIMEOUT_MS);
    let scenario = crate::util::root().join("examples/scenarios/all-on-one.toml");
    let connect = format!("sim:{}", scenario.display());
    let run = ["--connect", connect.as_str(), "--quantum", "100ms", "--policy-dir", s(&dir)];
    let mut daemon = Daemon::start("odd-entries", "info", Some(&config), &run);
    let minutes = Duration::from_secs(120);
    let lines = |d: &Daemon, words: &[&str]| d.log().lines().filter(|l| words.iter().all(|w| l.contains(w))).count();
    wait_until("the link to load", minutes, || lines(&daemon, &["policy loaded and validated", "20-link.wasm"]) == 1);
    for _ in 0..2 {
        let seen = lines(&daemon, &["SIGHUP: re-reading policies"]);
        daemon.signal(libc::SIGHUP);
        wait_until("the SIGHUP", minutes, || lines(&daemon, &["SIGHUP: re-reading policies"]) > seen);
    }
    let tmp = dir.join(".30.tmp");
    std::fs::write(&tmp, Builtin::Classic.wasm()).unwrap();
    std::fs::rename(&tmp, dir.join("30-classic.wasm")).unwrap();
    wait_until("a later scan to load a new file", minutes, || lines(&daemon, &["policy loaded and validated", "30-classic.wasm"]) == 1);
    daemon.signal(libc::SIGTERM);
    daemon.assert_clean_exit(minutes);
    let log = daemon.log();
    let target = real.display().to_string();
    assert_eq!(lines(&daemon, &["symlink; following it", "20-link.wasm", &target]), 1, "{log}");
    assert_eq!(lines(&daemon, &["not a regular file", "x.wasm", "FIFO"]), 1, "{log}");
    assert_eq!(lines(&daemon, &["not a regular file", "y.wasm", "directory"]), 1, "{log}");
    assert_eq!(lines(&daemon, &["dangling symlink", "z.wasm"]), 1, "{log}");
}
