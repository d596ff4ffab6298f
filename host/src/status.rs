//! What the running daemon is doing now, for people: the status that
//! `vm-balancer top` shows and `vm-balancer explain DOMAIN` answers from.
//!
//! Why it is built this way:
//! - **A read-only unix socket in the state dir** (`URI-KEY.status.sock`,
//!   mode 0600, so root only when the daemon runs as root). A client
//!   connects and gets one JSON [`Status`], then the daemon closes; what a
//!   client sends is discarded unread, so there is no command to send it.
//! - **One [`Status`] per quantum**, built by [`Recorder`] from the quantum's
//!   snapshot and verdicts; the socket thread serves the latest copy and
//!   never touches the pipeline.
//! - **The last actions per domain** are kept (applied, clamped and rejected,
//!   with the policy's reason and the guard's verdict): "why did my guest
//!   shrink?" has an answer on the host.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vm_balancer_sdk::{Action, Outcome, Snapshot, Verdict};

use crate::policy::PolicySet;

/// Actions remembered per domain.
pub const HISTORY_PER_DOMAIN: usize = 16;

/// Largest status a client reads, bytes (1,000 domains take about 1 MB).
const MAX_STATUS_BYTES: u64 = 64 << 20;

/// Errors of the status socket's clients.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// No daemon answers at the socket.
    #[error("cannot reach a running daemon at {path} (is `vm-balancer run` running with this state dir and URI? run as root?)")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The answer could not be read or decoded.
    #[error("bad status from the daemon at {path}")]
    Decode {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The domain is not managed by the daemon.
    #[error("no managed domain named {domain:?} (known: {known})")]
    NoDomain {
        /// What was asked for.
        domain: String,
        /// The domains it knows, comma-separated.
        known: String,
    },
}

/// The daemon's state after its last quantum (before the first one: only
/// `connect` and `quantum_ms`; missing fields read as empty, so an older or
/// newer daemon's status still shows).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    /// The URI it balances.
    pub connect: String,
    /// The last quantum's number.
    pub quantum: u64,
    /// Quanta skipped in a row because nothing could be collected (libvirt
    /// down or slower than the collection deadline); the rest of the status
    /// is from the last quantum that ran.
    pub skipped: u64,
    /// Quantum length, ms.
    pub quantum_ms: u32,
    /// How long the last quantum took, ms.
    pub took_ms: f64,
    /// Host memory available, MiB.
    pub host_available_mib: u64,
    /// Host memory total, MiB.
    pub host_total_mib: u64,
    /// The guard's host reserve, MiB.
    pub host_reserve_mib: u64,
    /// Host CPUs.
    pub cpus: Vec<CpuStatus>,
    /// Managed domains.
    pub domains: Vec<DomainStatus>,
    /// Policy slots, in order.
    pub policies: Vec<PolicyStatus>,
}

/// One host CPU.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuStatus {
    /// CPU id.
    pub id: u32,
    /// Busy fraction over the last quantum, 0..=1.
    pub load: f32,
    /// Online and not reserved.
    pub usable: bool,
    /// The vCPUs running on it, `domain/vcpu`.
    pub vcpus: Vec<String>,
}

/// One managed domain.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DomainStatus {
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: String,
    /// Balloon target, MiB.
    pub balloon_target_mib: u64,
    /// Max memory, MiB.
    pub max_mib: u64,
    /// Memory the guest can still use, MiB (balloon stats), if known.
    pub usable_mib: Option<u64>,
    /// vCPU demand (usage + steal) summed over its vCPUs, CPUs.
    pub vcpu_demand: f32,
    /// The last actions on it, oldest first.
    pub actions: Vec<ActionRecord>,
}

/// One action a policy asked for on a domain, and what became of it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ActionRecord {
    /// Quantum it was decided in.
    pub quantum: u64,
    /// The slot that asked.
    pub slot: String,
    /// The action, in words (as applied when clamped).
    pub action: String,
    /// `applied`, `clamped` or `rejected`.
    pub verdict: String,
    /// The policy's reason.
    pub reason: String,
    /// The guard's reason (clamped or rejected).
    pub guard: String,
}

/// One policy slot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// Slot name (file name or builtin).
    pub slot: String,
    /// The policy's own name, `-` when it could not be loaded.
    pub policy: String,
    /// Median decide time, µs.
    pub decide_median_us: u64,
    /// Slowest decide time, µs.
    pub decide_max_us: u64,
    /// Quanta the policy itself decided.
    pub decided: u64,
    /// Quanta the built-in fallback decided.
    pub fallbacks: u64,
    /// Failures by kind.
    pub failures: BTreeMap<String, u64>,
    /// Disabled (backing off) now.
    pub disabled: bool,
    /// Its last failure, in words.
    pub last_failure: Option<String>,
}

/// Builds each quantum's [`Status`] and remembers per-domain actions.
#[derive(Debug, Default)]
pub struct Recorder {
    history: HashMap<String, VecDeque<ActionRecord>>,
}

impl Recorder {
    /// The status after a quantum that saw `snapshot` and gave `verdicts`.
    pub fn record(&mut self, connect: &str, snapshot: &Snapshot, verdicts: &[Verdict], policies: &PolicySet, took: Duration) -> Status {
        for v in verdicts {
            let history = self.history.entry(v.action.domain().to_string()).or_default();
            if history.len() == HISTORY_PER_DOMAIN {
                history.pop_front();
            }
            history.push_back(ActionRecord {
                quantum: snapshot.quantum,
                slot: v.slot.clone(),
                action: describe(&v.action, snapshot),
                verdict: match v.outcome {
                    Outcome::Accepted => "applied",
                    Outcome::Clamped => "clamped",
                    Outcome::Rejected => "rejected",
                }
                .to_string(),
                reason: v.action.reason().to_string(),
                // An accepted verdict's reason is the policy's own.
                guard: if v.outcome == Outcome::Accepted { String::new() } else { v.reason.clone() },
            });
        }
        // Forget domains that are gone, so a long run does not grow.
        self.history.retain(|name, _| snapshot.domain(name).is_some());
        let mut cpus: Vec<CpuStatus> = snapshot
            .host
            .cpus
            .iter()
            .map(|c| CpuStatus { id: c.id, load: c.usage, usable: c.online && !c.reserved, vcpus: Vec::new() })
            .collect();
        for d in &snapshot.domains {
            for v in &d.vcpus {
                if let Some(cpu) = cpus.iter_mut().find(|c| c.id == v.cpu) {
                    cpu.vcpus.push(format!("{}/{}", d.name, v.id));
                }
            }
        }
        let domains = snapshot
            .domains
            .iter()
            .map(|d| DomainStatus {
                name: d.name.clone(),
                uuid: d.uuid.clone(),
                balloon_target_mib: d.memory.target_kib / 1024,
                max_mib: d.memory.max_kib / 1024,
                usable_mib: d.memory.usable_kib.or(d.memory.available_kib).map(|k| k / 1024),
                vcpu_demand: d.vcpus.iter().map(|v| v.usage + v.steal.unwrap_or(0.0)).sum(),
                actions: self.history.get(&d.name).map(|h| h.iter().cloned().collect()).unwrap_or_default(),
            })
            .collect();
        let policies = policies
            .slots()
            .iter()
            .map(|s| {
                let t = s.decide_times();
                PolicyStatus {
                    slot: s.name().to_string(),
                    policy: s.policy().map_or("-".to_string(), |p| p.info().name.clone()),
                    decide_median_us: t.median_us,
                    decide_max_us: t.max_us,
                    decided: s.stats().decided,
                    fallbacks: s.stats().fallbacks,
                    failures: s.stats().failures.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                    disabled: s.is_disabled(snapshot.quantum + 1),
                    last_failure: s.last_failure().map(str::to_string),
                }
            })
            .collect();
        let m = &snapshot.host.memory;
        Status {
            connect: connect.to_string(),
            quantum: snapshot.quantum,
            skipped: 0,
            quantum_ms: snapshot.quantum_ms,
            took_ms: took.as_secs_f64() * 1000.0,
            host_available_mib: m.available_kib / 1024,
            host_total_mib: m.total_kib / 1024,
            host_reserve_mib: m.reserve_kib / 1024,
            cpus,
            domains,
            policies,
        }
    }
}

/// An action in words with its old value: `vcpu 0 [0] -> [1]`,
/// `memory 2048 -> 1843 MiB`.
pub fn describe(action: &Action, snapshot: &Snapshot) -> String {
    let domain = snapshot.domain(action.domain());
    match action {
        Action::Pin { vcpu, cpus, .. } => {
            let old = domain
                .and_then(|d| d.vcpus.iter().find(|v| v.id == *vcpu))
                .map_or("?".to_string(), |v| format!("{:?}", v.affinity.as_slice()));
            format!("vcpu {vcpu} {old} -> {cpus:?}")
        }
        Action::SetMemory { target_kib, .. } => {
            let old = domain.map_or("?".to_string(), |d| (d.memory.target_kib / 1024).to_string());
            format!("memory {old} -> {} MiB", target_kib / 1024)
        }
    }
}

/// The status socket of the daemon for `uri` in `state_dir`.
pub fn socket_path(state_dir: &Path, uri: &str) -> PathBuf {
    state_dir.join(format!("{}.status.sock", crate::persist::uri_key(uri)))
}

/// Serves `status` on a unix socket at `path` (mode 0600) from its own
/// thread. A stale socket file is replaced; one that a live daemon answers
/// on is left alone (and `None` is returned, logged).
pub fn serve(path: &Path, status: Arc<Mutex<Arc<String>>>) -> Option<std::thread::JoinHandle<()>> {
    if UnixStream::connect(path).is_ok() {
        tracing::warn!(socket = %path.display(), "another daemon serves this status socket; this one serves none");
        return None;
    }
    let _ = std::fs::remove_file(path);
    let listener = match UnixListener::bind(path) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::warn!(socket = %path.display(), %error, "cannot create the status socket; `top` and `explain` will not reach this daemon");
            return None;
        }
    };
    if let Err(error) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        tracing::warn!(socket = %path.display(), %error, "cannot make the status socket 0600; not serving it");
        let _ = std::fs::remove_file(path);
        return None;
    }
    tracing::info!(socket = %path.display(), "serving the read-only status socket");
    let handle = std::thread::Builder::new()
        .name("vmb-status".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let text = Arc::clone(&status.lock().unwrap_or_else(|p| p.into_inner()));
                // A slow client gets 2 s; it never blocks the quantum thread.
                let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
                let _ = stream.write_all(text.as_bytes());
                // Whatever a client sent is read and thrown away (closing
                // on unread bytes would reset the connection before the
                // client has read its status).
                let _ = stream.shutdown(std::net::Shutdown::Write);
                let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
                let _ = std::io::copy(&mut (&mut stream).take(64 << 10), &mut std::io::sink());
            }
        })
        .ok()?;
    Some(handle)
}

/// Reads the running daemon's status from its socket.
pub fn fetch(path: &Path) -> Result<Status, StatusError> {
    let stream = UnixStream::connect(path).map_err(|source| StatusError::Connect { path: path.into(), source })?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut text = String::new();
    stream.take(MAX_STATUS_BYTES).read_to_string(&mut text).map_err(|source| StatusError::Connect { path: path.into(), source })?;
    serde_json::from_str(&text).map_err(|source| StatusError::Decode { path: path.into(), source })
}

/// `vm-balancer explain DOMAIN`: the domain's figures and its last actions.
pub fn explain(status: &Status, domain: &str) -> Result<String, StatusError> {
    use std::fmt::Write as _;
    let Some(d) = status.domains.iter().find(|d| d.name == domain || d.uuid == domain) else {
        return Err(StatusError::NoDomain {
            domain: domain.to_string(),
            known: status.domains.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", "),
        });
    };
    let mut out = String::new();
    let usable = d.usable_mib.map_or("?".to_string(), |u| format!("{u} MiB"));
    let _ = writeln!(
        out,
        "{} ({}): balloon {} / max {} MiB, usable {usable}, vCPU demand {:.2} CPUs (quantum {})",
        d.name, d.uuid, d.balloon_target_mib, d.max_mib, d.vcpu_demand, status.quantum
    );
    if d.actions.is_empty() {
        let _ = writeln!(out, "no actions in the last {HISTORY_PER_DOMAIN} the daemon remembers: no policy has asked to change it");
    }
    for a in d.actions.iter().rev() {
        let guard = if a.guard.is_empty() { String::new() } else { format!("; guard: {}", a.guard) };
        let reason = if a.reason.is_empty() { "(no reason given)" } else { &a.reason };
        let _ = writeln!(out, "quantum {:>6}  {:<8} {}  by {}: {reason}{guard}", a.quantum, a.verdict, a.action, a.slot);
    }
    Ok(out)
}
