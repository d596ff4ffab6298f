//! Where the running policies come from, and the one path by which they
//! change: a [`Plan`] applied to the [`PolicySet`] at a quantum boundary.
//!
//! Two sources:
//! - **Specs** (`run --policy FILE|builtin:NAME ...`): a fixed list. At start
//!   a spec that cannot be loaded becomes a fallback-only slot, so the daemon
//!   always starts; on SIGHUP every spec is loaded again and the new slots
//!   replace the old only if all of them loaded (slots are ordered and settle
//!   conflicts, so a partial reload would silently change which policy wins).
//! - **Dir** (no `--policy`): the watched drop-in directory ([`Reloader`]):
//!   plans are made off the quantum thread; SIGHUP asks for a rescan.

use std::sync::Arc;
use std::time::Duration;

use super::cache::CompileCache;
use super::file::FileRules;
use super::reload::{apply_plan, Plan, Planned, Reloader};
use super::slots::{slot_name, PolicySet, SlotError};
use crate::config::Config;

/// The policies' origin.
pub enum PolicySource {
    /// A fixed list of files or builtins (never empty: no specs means the
    /// directory).
    Specs(Vec<String>),
    /// The watched drop-in directory.
    Dir(Reloader),
}

impl PolicySource {
    /// The source for `specs` (empty: the drop-in directory `dir`, watched,
    /// compiling through `cache`), and the slots to start with. A bad spec
    /// becomes a fallback-only slot (logged); with the directory, the
    /// embedded defaults run until its first plan is applied.
    pub fn start(
        config: &Config,
        specs: &[String],
        dir: &std::path::Path,
        cache: Option<Arc<CompileCache>>,
    ) -> Result<(PolicySource, PolicySet), SourceError> {
        if !specs.is_empty() {
            if specs.len() > config.policy_max_slots {
                return Err(SourceError::TooManySlots { count: specs.len(), max_slots: config.policy_max_slots });
            }
            let (set, failures) =
                PolicySet::new(&config.limits).with_cache(cache).with_file_rules(FileRules::daemon(config)).with_specs_lenient(specs);
            for (spec, error) in failures {
                tracing::error!(slot = %slot_name(&spec), spec, error = %crate::error_chain(&error), "policy cannot be loaded; the built-in defaults decide for this slot");
            }
            return Ok((PolicySource::Specs(specs.to_vec()), set));
        }
        super::dir::scan(dir, config.policy_max_slots)?;
        let set = PolicySet::defaults(&config.limits).map_err(SourceError::Defaults)?;
        let reloader = Reloader::spawn(dir, config, cache, set.last_snapshot());
        tracing::info!(dir = %dir.display(), "watching the policy directory");
        Ok((PolicySource::Dir(reloader), set))
    }

    /// Waits up to `timeout` for the directory's first plan (a warm-cache
    /// start then runs its policies from the first quantum; a cold compile
    /// does not hold the loop). Specs: nothing to wait for.
    pub fn wait_first(&self, set: &mut PolicySet, timeout: Duration) {
        if let PolicySource::Dir(reloader) = self {
            reloader.wait_and_apply(set, timeout);
        }
    }

    /// At a quantum boundary: applies what is ready. True if the slots changed.
    pub fn poll(&self, set: &mut PolicySet) -> bool {
        match self {
            PolicySource::Dir(reloader) => reloader.poll(set),
            PolicySource::Specs(_) => false,
        }
    }

    /// The drop-in directory's counters (scans, swaps, refused files).
    pub fn reload_stats(&self) -> Option<super::reload::ReloadStats> {
        match self {
            PolicySource::Dir(reloader) => Some(reloader.stats()),
            PolicySource::Specs(_) => None,
        }
    }

    /// SIGHUP: re-reads the policies (the directory: asks for a rescan,
    /// applied by a later [`poll`](Self::poll)).
    pub fn reload(&self, set: &mut PolicySet) {
        match self {
            PolicySource::Dir(reloader) => reloader.request(),
            PolicySource::Specs(specs) => {
                let mut loaded = Vec::new();
                for spec in specs {
                    match set.load_spec(spec) {
                        Ok(policy) => loaded.push(Planned::Load(slot_name(spec), Box::new(policy))),
                        Err(error) => {
                            tracing::error!(slot = %slot_name(spec), spec, error = %crate::error_chain(&error), "SIGHUP: policy cannot be reloaded; keeping the previous policies");
                            return;
                        }
                    }
                }
                apply_plan(set, Plan { slots: loaded });
                tracing::info!(slots = set.slots().len(), "SIGHUP: policies reloaded");
            }
        }
    }
}

/// Why the policies could not be set up at start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The built-in default policies could not be loaded.
    #[error("cannot load the built-in default policies")]
    Defaults(#[source] SlotError),
    /// The policy directory is unsafe or unreadable.
    #[error(transparent)]
    Dir(#[from] super::dir::DirError),
    /// More `--policy` specs than `policy_max_slots`.
    #[error("{count} --policy specs, over policy_max_slots = {max_slots} (raise policy_max_slots in the config)")]
    TooManySlots {
        /// Specs given.
        count: usize,
        /// The bound.
        max_slots: usize,
    },
}
