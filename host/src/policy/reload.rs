//! Hot swap: a drop-in directory watched with `notify`, policies compiled,
//! instantiated and validated **off the quantum thread**, swapped in at a
//! quantum boundary.
//!
//! Flow: filesystem event / SIGHUP / start → debounce (editors and `cp`
//! produce 2–12 events per save) → [`plan`]: scan the directory, keep every
//! slot whose file is unchanged (its instance and state live on), load the
//! changed and new files through the compile cache, and validate each (right
//! world, allowed imports, a trial `decide` on the last snapshot returning
//! decodable actions within the limits) → a [`Plan`] over a channel → the
//! quantum thread applies pending plans with [`Reloader::poll`] before it
//! decides.
//!
//! A broken file (half written, truncated, not wasm, wrong world, failing its
//! trial) changes nothing: the old policy of that name stays, and the reason
//! is logged with the file name. Removing a file removes its slot; an empty
//! or missing directory means the embedded defaults.
//!
//! Only create, modify-data, close-after-write and rename events on `*.wasm`
//! names trigger a rescan: notify reports the daemon's own reads as
//! `Access(Open)`/`Access(Close(Read))`, and reacting to those reloads in a
//! loop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{Event, EventKind, RecursiveMode, Watcher};

use super::cache::CompileCache;
use super::dir::{is_policy_name, scan, Note};
use super::file::{read_policy_file, FileRules, PolicyFileError};
use super::sandbox::{LoadedPolicy, PolicyError, Sandbox};
use super::slots::{LastSnapshot, PolicySet, Slot};
use crate::config::Config;

/// Why a policy file was refused; the file's previous version (if any) stays.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file was refused before compiling (owner, mode, type, size, header).
    #[error(transparent)]
    File(PolicyFileError),
    /// Not a usable component (not wasm, wrong world, forbidden import...).
    #[error(transparent)]
    Refused(PolicyError),
    /// It loaded, but its trial `decide` on the last snapshot failed.
    #[error("trial decide failed: {0}")]
    Trial(PolicyError),
}

/// What one slot of a plan is.
pub enum Planned {
    /// The slot of this file name stays as it is (file unchanged, or its new
    /// version was refused).
    Keep(String),
    /// A newly loaded and validated policy for this file name.
    Load(String, Box<LoadedPolicy>),
}

/// The slots the daemon should run next, in order. Empty = the defaults.
pub struct Plan {
    /// Slots in file-name order.
    pub slots: Vec<Planned>,
}

/// Why a reload was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Filesystem,
    Request,
}

/// Counters of the reloader (asserted by the tests, logged by the daemon).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadStats {
    /// Directory scans performed.
    pub scans: u64,
    /// Plans applied at a quantum boundary.
    pub swaps: u64,
    /// Files refused (the old policy, if any, stayed).
    pub refused: u64,
}

/// Watches a policy directory and hands validated plans to the quantum thread.
pub struct Reloader {
    requests: Sender<Trigger>,
    plans: Receiver<Plan>,
    stats: Arc<Mutex<ReloadStats>>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Reloader {
    /// Starts watching `dir` and plans the initial set at once, under
    /// `config`'s limits, file bounds and debounce.
    pub fn spawn(dir: &Path, config: &Config, cache: Option<Arc<CompileCache>>, last_snapshot: LastSnapshot) -> Reloader {
        let debounce = Duration::from_millis(config.reload_debounce_ms);
        let (requests, triggers) = mpsc::channel::<Trigger>();
        let (plan_tx, plans) = mpsc::channel::<Plan>();
        let stats = Arc::new(Mutex::new(ReloadStats::default()));
        let watcher = watch(dir, requests.clone());
        let loader = Loader::new(dir, config, cache, last_snapshot, stats.clone());
        std::thread::Builder::new()
            .name("policy-loader".into())
            .spawn(move || loader.run(triggers, plan_tx, debounce))
            .expect("spawning the policy loader thread");
        let _ = requests.send(Trigger::Request);
        Reloader { requests, plans, stats, _watcher: watcher }
    }

    /// Asks for a rescan (SIGHUP does this).
    pub fn request(&self) {
        let _ = self.requests.send(Trigger::Request);
    }

    /// Applies every plan that is ready. Call at a quantum boundary.
    /// Returns true if the slots changed.
    pub fn poll(&self, set: &mut PolicySet) -> bool {
        let mut changed = false;
        while let Ok(plan) = self.plans.try_recv() {
            apply_plan(set, plan);
            self.stats.lock().expect("stats lock").swaps += 1;
            changed = true;
        }
        changed
    }

    /// Waits up to `timeout` for a plan and applies it (for start-up and tests).
    pub fn wait_and_apply(&self, set: &mut PolicySet, timeout: Duration) -> bool {
        match self.plans.recv_timeout(timeout) {
            Ok(plan) => {
                apply_plan(set, plan);
                self.stats.lock().expect("stats lock").swaps += 1;
                self.poll(set);
                true
            }
            Err(_) => false,
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> ReloadStats {
        self.stats.lock().expect("stats lock").clone()
    }
}

fn relevant(event: &Event) -> bool {
    let kind = matches!(
        event.kind,
        EventKind::Create(_)
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Name(_) | ModifyKind::Any)
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    );
    kind && event.paths.iter().any(|p| is_policy_name(p))
}

fn watch(dir: &Path, requests: Sender<Trigger>) -> Option<notify::RecommendedWatcher> {
    let handler = move |result: notify::Result<Event>| match result {
        Ok(event) if relevant(&event) => {
            let _ = requests.send(Trigger::Filesystem);
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "policy directory watcher error"),
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(error) => {
            tracing::error!(%error, "cannot create a filesystem watcher; policies reload on SIGHUP only");
            return None;
        }
    };
    // Watch the directory, not the files: a file watch loses track after a
    // rename-over, which is how careful tools replace files.
    match watcher.watch(dir, RecursiveMode::NonRecursive) {
        Ok(()) => Some(watcher),
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "cannot watch the policy directory (missing?); reload with SIGHUP once it exists");
            None
        }
    }
}

struct Loader {
    dir: PathBuf,
    sandbox: Sandbox,
    cache: Option<Arc<CompileCache>>,
    last_snapshot: LastSnapshot,
    rules: FileRules,
    max_slots: usize,
    /// File name → content hash of what the last plan runs.
    known: HashMap<String, String>,
    /// What the last scan noted (symlinks, FIFOs...), logged once per path
    /// and change: rescans happen on every save, and a line per rescan
    /// would bury the log.
    noted: HashMap<PathBuf, Note>,
    stats: Arc<Mutex<ReloadStats>>,
}

impl Loader {
    fn new(
        dir: &Path,
        config: &Config,
        cache: Option<Arc<CompileCache>>,
        last_snapshot: LastSnapshot,
        stats: Arc<Mutex<ReloadStats>>,
    ) -> Self {
        Loader {
            dir: dir.to_path_buf(),
            sandbox: Sandbox::new(&config.limits),
            cache,
            last_snapshot,
            rules: FileRules::daemon(config),
            max_slots: config.policy_max_slots,
            known: HashMap::new(),
            noted: HashMap::new(),
            stats,
        }
    }

    fn run(mut self, triggers: Receiver<Trigger>, plans: Sender<Plan>, debounce: Duration) {
        while let Ok(first) = triggers.recv() {
            // Debounce: wait for a quiet spell. A request (SIGHUP) still waits
            // for the same quiet, so a save in progress is not read half-way.
            let mut why = first;
            loop {
                match triggers.recv_timeout(debounce) {
                    Ok(t) => {
                        if t == Trigger::Request {
                            why = t;
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            tracing::debug!(?why, dir = %self.dir.display(), "rescanning policy directory");
            if let Some(plan) = self.plan() {
                if plans.send(plan).is_err() {
                    return;
                }
            }
        }
    }

    /// Builds the next plan, or None when nothing changed.
    fn plan(&mut self) -> Option<Plan> {
        self.stats.lock().expect("stats lock").scans += 1;
        let files = match scan(&self.dir, self.max_slots) {
            Ok(scan) => {
                let noted: HashMap<PathBuf, Note> = scan.notes.into_iter().collect();
                for (path, note) in &noted {
                    if self.noted.get(path) != Some(note) {
                        note.log(path);
                    }
                }
                self.noted = noted;
                scan.files
            }
            Err(error) => {
                tracing::error!(%error, "policy directory refused; the running policies stay");
                return None;
            }
        };
        let mut slots = Vec::new();
        let mut next_known = HashMap::new();
        let mut changed = files.len() != self.known.len();
        for path in files {
            let name = path.file_name().expect("scanned files have names").to_string_lossy().into_owned();
            let bytes = match read_policy_file(&path, &self.rules) {
                Ok(bytes) => bytes,
                Err(error) => {
                    let kept = self.known.get(&name).cloned();
                    if matches!(error, PolicyFileError::Read { .. }) {
                        tracing::warn!(file = %path.display(), error = %crate::error_chain(&error), kept_previous = kept.is_some(), "cannot read policy file");
                    } else {
                        self.stats.lock().expect("stats lock").refused += 1;
                        tracing::error!(file = %path.display(), error = %LoadError::File(error), kept_previous = kept.is_some(), "policy file refused; nothing changes for it");
                    }
                    if let Some(hash) = kept {
                        next_known.insert(name.clone(), hash);
                        slots.push(Planned::Keep(name));
                    }
                    continue;
                }
            };
            let hash = CompileCache::content_hash(&bytes);
            if self.known.get(&name) == Some(&hash) {
                next_known.insert(name.clone(), hash);
                slots.push(Planned::Keep(name));
                continue;
            }
            changed = true;
            match self.load(&name, &path, &bytes) {
                Ok(policy) => {
                    let info = policy.info();
                    tracing::info!(
                        file = %path.display(),
                        policy = %info.name,
                        version = %info.version,
                        replaced = self.known.contains_key(&name),
                        "policy loaded and validated; it decides from the next quantum"
                    );
                    next_known.insert(name.clone(), hash);
                    slots.push(Planned::Load(name, Box::new(policy)));
                }
                Err(error) => {
                    self.stats.lock().expect("stats lock").refused += 1;
                    let kept = self.known.get(&name).cloned();
                    tracing::error!(file = %path.display(), %error, kept_previous = kept.is_some(), "policy file refused; nothing changes for it");
                    if let Some(hash) = kept {
                        next_known.insert(name.clone(), hash);
                        slots.push(Planned::Keep(name));
                    }
                }
            }
        }
        for gone in self.known.keys().filter(|k| !next_known.contains_key(*k)) {
            tracing::info!(file = %gone, "policy removed");
        }
        changed |= next_known.keys().any(|k| !self.known.contains_key(k));
        self.known = next_known;
        changed.then_some(Plan { slots })
    }

    fn load(&self, name: &str, path: &Path, bytes: &[u8]) -> Result<LoadedPolicy, LoadError> {
        let source = path.display().to_string();
        let component = match &self.cache {
            Some(cache) => cache.component(&source, bytes),
            None => super::sandbox::compile(&source, bytes),
        }
        .map_err(LoadError::Refused)?;
        let mut policy = self.sandbox.load_compiled(name, &source, component).map_err(LoadError::Refused)?;
        let encoding = policy.encoding();
        let trial = match self.last_snapshot.latest().and_then(|bytes| encoding.reencode_msgpack(&bytes)) {
            Some(bytes) => bytes,
            None => encoding.encode(&super::samples::trial_snapshot()),
        };
        policy.decide(&trial).map_err(LoadError::Trial)?;
        Ok(policy)
    }
}

/// Applies a plan to the set: keeps named slots (with their instance, state
/// and failure counters), adds the new ones, drops the rest. An empty plan
/// means the embedded defaults. The only way the running slots change.
pub(super) fn apply_plan(set: &mut PolicySet, plan: Plan) {
    let mut old: HashMap<String, Slot> = set.take_slots().into_iter().map(|s| (s.name().to_string(), s)).collect();
    let mut slots = Vec::new();
    for planned in plan.slots {
        match planned {
            Planned::Keep(name) => match old.remove(&name) {
                Some(slot) => slots.push(slot),
                None => tracing::warn!(slot = %name, "planned to keep a slot that is not running; skipped"),
            },
            Planned::Load(name, policy) => slots.push(Slot::new(&name, *policy)),
        }
    }
    if slots.is_empty() {
        match PolicySet::defaults(set.limits()) {
            Ok(mut defaults) => slots = defaults.take_slots(),
            Err(error) => tracing::error!(%error, "embedded defaults failed to load"),
        }
        tracing::info!("no policy files: the embedded defaults decide");
    }
    let names: Vec<&str> = slots.iter().map(|s| s.name()).collect();
    tracing::info!(slots = ?names, "policy slots swapped at the quantum boundary");
    set.set_slots(slots);
}
