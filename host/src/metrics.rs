//! Prometheus metrics of the running daemon (`--metrics-addr`).
//!
//! Why it is built this way:
//! - **`prometheus-client` for the model and the text format, `tiny_http`
//!   on its own thread for the endpoint**: no hand-written HTTP, and a slow
//!   scraper never delays a quantum (the quantum thread only takes the
//!   lock to update, once per quantum).
//! - **Off by default, loopback in the examples**: the series name every
//!   guest. A non-loopback address is the operator's explicit choice, and
//!   is logged as such.
//! - **Label values are escaped here** (`\`, `"`, newline), because the
//!   text encoder of `prometheus-client` 0.23 writes them as they are: a
//!   guest named `a"b` would otherwise break the whole exposition.
//! - **Counters mirror the pipeline's own counters** by deltas, so a slot
//!   swapped for a fresh one (counters from zero) never makes a counter go
//!   backwards.
//! - **Fleet series in OpenStack Watcher's shape** (`ceilometer_cpu` in ns
//!   of CPU time, `ceilometer_memory_usage` in MB, labels `resource` = the
//!   domain's UUID and `fqdn`) are opt-in (`fleet_metrics = true`): their
//!   names are Watcher's contract, not ours.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use vm_balancer_sdk::{Action, Outcome, Snapshot, Verdict};

use crate::policy::PolicySet;

/// Errors starting the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address could not be bound.
    #[error("cannot serve metrics on {addr}: {message}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The server's message.
        message: String,
    },
}

/// A label value, escaped for the text exposition format.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Text(pub String);

impl EncodeLabelValue for Text {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlotLabel {
    slot: Text,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlotKind {
    slot: Text,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindReason {
    kind: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CpuLabel {
    cpu: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DomainLabel {
    domain: Text,
    uuid: Text,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FleetLabel {
    resource: Text,
    fqdn: Text,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn decide_histogram() -> Histogram {
    // 10 µs .. about 2.6 s: a native policy's few µs to a deadline miss.
    Histogram::new(exponential_buckets(1e-5, 4.0, 10))
}

pub use crate::backend::Connection;

/// One quantum's figures beyond the snapshot and verdicts.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct QuantumTimes {
    /// The whole quantum, seconds.
    pub quantum_s: f64,
    /// Collection, seconds.
    pub collect_s: f64,
    /// The quantum's length, seconds (an overrun takes longer).
    pub period_s: f64,
}

/// The metric families and what their counters last mirrored.
pub struct Metrics {
    registry: Registry,
    quanta: Counter,
    skipped: Counter,
    overruns: Counter,
    quantum_duration: Histogram,
    collect_duration: Histogram,
    decide: HistogramFamily<SlotLabel>,
    failures: Family<SlotKind, Counter>,
    fallbacks: Family<SlotLabel, Counter>,
    disabled: Family<SlotLabel, Gauge>,
    reloads: Family<ResultLabel, Counter>,
    applied: Family<KindLabel, Counter>,
    clamped: Family<KindReason, Counter>,
    rejected: Family<KindReason, Counter>,
    cpu_load: Family<CpuLabel, FloatGauge>,
    balloon_target: Family<DomainLabel, Gauge>,
    usable_memory: Family<DomainLabel, Gauge>,
    vcpu_demand: Family<DomainLabel, FloatGauge>,
    host_available: Gauge,
    host_reserve: Gauge,
    reconnects: Counter,
    reconnect_backoff: FloatGauge,
    fleet: Option<Fleet>,
    /// Last mirrored value of each (slot, kind) failure counter, each slot's
    /// fallbacks and calls, and the reload counters.
    seen: HashMap<(String, String), u64>,
    last_failed_connects: u32,
}

struct Fleet {
    fqdn: String,
    cpu: Family<FleetLabel, FloatGauge>,
    memory: Family<FleetLabel, FloatGauge>,
    /// Cumulative CPU time per domain UUID, ns.
    cpu_ns: HashMap<String, f64>,
}

impl Metrics {
    /// The families; `fleet` adds Watcher's instance series labelled `fqdn`.
    pub fn new(fleet: Option<String>) -> Metrics {
        let mut registry = Registry::with_prefix("vm_balancer");
        let quanta = Counter::default();
        registry.register("quanta", "Quanta run", quanta.clone());
        let skipped = Counter::default();
        registry.register("quanta_skipped", "Quanta without an observation (the backend failed to collect)", skipped.clone());
        let overruns = Counter::default();
        registry.register("quantum_overruns", "Quanta that took longer than the quantum", overruns.clone());
        let quantum_duration = Histogram::new(exponential_buckets(1e-3, 2.0, 14));
        registry.register_with_unit(
            "quantum_duration",
            "Time of one quantum: collect, decide, guard, apply",
            Unit::Seconds,
            quantum_duration.clone(),
        );
        let collect_duration = Histogram::new(exponential_buckets(1e-4, 2.0, 16));
        registry.register_with_unit("collect_duration", "Time to collect one observation", Unit::Seconds, collect_duration.clone());
        let decide = HistogramFamily::<SlotLabel>::new_with_constructor(decide_histogram as fn() -> Histogram);
        registry.register_with_unit("policy_decide_duration", "Time of one policy decide call, by slot", Unit::Seconds, decide.clone());
        let failures = Family::default();
        registry.register("policy_failures", "Policy failures by slot and kind (trap, timeout, memory_limit, ...)", failures.clone());
        let fallbacks = Family::default();
        registry.register("policy_fallbacks", "Quanta the built-in default decided for a slot", fallbacks.clone());
        let disabled = Family::default();
        registry.register("policy_disabled", "1 while a slot's policy is disabled after failures", disabled.clone());
        let reloads = Family::default();
        registry.register("policy_reloads", "Policy directory plans by result (swapped, refused)", reloads.clone());
        let applied = Family::default();
        registry.register("actions_applied", "Actions applied by kind (pin, memory)", applied.clone());
        let clamped = Family::default();
        registry.register("actions_clamped", "Actions the guard applied with a changed value, by kind and reason", clamped.clone());
        let rejected = Family::default();
        registry.register("actions_rejected", "Actions the guard refused, by kind and reason", rejected.clone());
        let cpu_load = Family::default();
        registry.register_with_unit(
            "cpu_load",
            "Busy fraction of a host CPU over the last quantum",
            Unit::Other("ratio".into()),
            cpu_load.clone(),
        );
        let balloon_target = Family::default();
        registry.register_with_unit("domain_balloon_target", "Balloon target of a domain", Unit::Bytes, balloon_target.clone());
        let usable_memory = Family::default();
        registry.register_with_unit(
            "domain_usable_memory",
            "Memory a domain can still use (balloon stats)",
            Unit::Bytes,
            usable_memory.clone(),
        );
        let vcpu_demand = Family::default();
        registry.register_with_unit(
            "domain_vcpu_demand",
            "CPU demand (usage + steal) of a domain's vCPUs",
            Unit::Other("cpus".into()),
            vcpu_demand.clone(),
        );
        let host_available = Gauge::default();
        registry.register_with_unit("host_available_memory", "Host memory available", Unit::Bytes, host_available.clone());
        let host_reserve = Gauge::default();
        registry.register_with_unit("host_memory_reserve", "Host memory growing guests may never take", Unit::Bytes, host_reserve.clone());
        let reconnects = Counter::default();
        registry.register("libvirt_reconnect_attempts", "Failed libvirt connection attempts", reconnects.clone());
        let reconnect_backoff = FloatGauge::default();
        registry.register_with_unit(
            "libvirt_reconnect_backoff",
            "Wait before the next libvirt connection attempt (0: connected)",
            Unit::Seconds,
            reconnect_backoff.clone(),
        );
        let fleet = fleet.map(|fqdn| {
            // Watcher's names, outside our prefix.
            let cpu = Family::default();
            registry.register("ceilometer_cpu", "OpenStack Watcher: cumulative CPU time of an instance, ns", cpu.clone());
            let memory = Family::default();
            registry.register("ceilometer_memory_usage", "OpenStack Watcher: memory used by an instance, MB", memory.clone());
            Fleet { fqdn, cpu, memory, cpu_ns: HashMap::new() }
        });
        Metrics {
            registry,
            quanta,
            skipped,
            overruns,
            quantum_duration,
            collect_duration,
            decide,
            failures,
            fallbacks,
            disabled,
            reloads,
            applied,
            clamped,
            rejected,
            cpu_load,
            balloon_target,
            usable_memory,
            vcpu_demand,
            host_available,
            host_reserve,
            reconnects,
            reconnect_backoff,
            fleet,
            seen: HashMap::new(),
            last_failed_connects: 0,
        }
    }

    /// Mirrors a counter that the pipeline keeps (`now`, possibly reset by
    /// a slot swap) into a Prometheus counter, by its increase.
    fn mirror(seen: &mut HashMap<(String, String), u64>, key: (String, String), now: u64, counter: &Counter) {
        let last = seen.insert(key, now).unwrap_or(0);
        let delta = if now >= last { now - last } else { now };
        counter.inc_by(delta);
    }

    /// A quantum without an observation.
    pub fn skipped(&mut self, connection: Connection) {
        self.quanta.inc();
        self.skipped.inc();
        self.connection(connection);
    }

    fn connection(&mut self, connection: Connection) {
        if connection.failed_connects > self.last_failed_connects {
            self.reconnects.inc_by(u64::from(connection.failed_connects - self.last_failed_connects));
        }
        self.last_failed_connects = connection.failed_connects;
        self.reconnect_backoff.set(connection.backoff_s);
    }

    /// Reload counters of the policy directory (cumulative).
    pub fn reloads(&mut self, swapped: u64, refused: u64) {
        for (result, now) in [("swapped", swapped), ("refused", refused)] {
            let counter = self.reloads.get_or_create(&ResultLabel { result: result.into() }).clone();
            Self::mirror(&mut self.seen, ("reloads".into(), result.into()), now, &counter);
        }
    }

    /// One quantum: its snapshot, the guard's verdicts, the slots after it.
    pub fn quantum(
        &mut self,
        snapshot: &Snapshot,
        verdicts: &[Verdict],
        policies: &PolicySet,
        times: QuantumTimes,
        connection: Connection,
    ) {
        self.quanta.inc();
        self.quantum_duration.observe(times.quantum_s);
        self.collect_duration.observe(times.collect_s);
        if times.period_s > 0.0 && times.quantum_s > times.period_s {
            self.overruns.inc();
        }
        self.connection(connection);
        for v in verdicts {
            let kind = match v.action {
                Action::Pin { .. } => "pin",
                Action::SetMemory { .. } => "memory",
            };
            match v.outcome {
                Outcome::Accepted => {
                    self.applied.get_or_create(&KindLabel { kind: kind.into() }).inc();
                }
                Outcome::Clamped => {
                    self.applied.get_or_create(&KindLabel { kind: kind.into() }).inc();
                    let reason = v.rule.name().to_string();
                    self.clamped.get_or_create(&KindReason { kind: kind.into(), reason }).inc();
                }
                Outcome::Rejected => {
                    let reason = v.rule.name().to_string();
                    self.rejected.get_or_create(&KindReason { kind: kind.into(), reason }).inc();
                }
            }
        }
        self.disabled.clear();
        for slot in policies.slots() {
            let name = slot.name().to_string();
            let label = SlotLabel { slot: Text(name.clone()) };
            let stats = slot.stats();
            // A call of the slot's own policy this quantum: its time.
            let calls = stats.decided + stats.failures.values().sum::<u64>();
            let last_calls = self.seen.insert(("calls".into(), name.clone()), calls).unwrap_or(0);
            if calls != last_calls {
                if let Some(policy) = slot.policy() {
                    self.decide.get_or_create(&label).observe(policy.last_decide().as_secs_f64());
                }
            }
            for (kind, n) in &stats.failures {
                let counter = self.failures.get_or_create(&SlotKind { slot: label.slot.clone(), kind: kind.to_string() }).clone();
                Self::mirror(&mut self.seen, (format!("failures {kind}"), name.clone()), *n, &counter);
            }
            let counter = self.fallbacks.get_or_create(&label).clone();
            Self::mirror(&mut self.seen, ("fallbacks".into(), name.clone()), stats.fallbacks, &counter);
            self.disabled.get_or_create(&label).set(i64::from(slot.is_disabled(snapshot.quantum + 1)));
        }
        self.cpu_load.clear();
        for c in &snapshot.host.cpus {
            self.cpu_load.get_or_create(&CpuLabel { cpu: c.id.to_string() }).set(f64::from(c.usage));
        }
        self.balloon_target.clear();
        self.usable_memory.clear();
        self.vcpu_demand.clear();
        for d in &snapshot.domains {
            let label = DomainLabel { domain: Text(d.name.clone()), uuid: Text(d.uuid.clone()) };
            self.balloon_target.get_or_create(&label).set(bytes(d.memory.target_kib));
            if let Some(usable) = d.memory.usable_kib.or(d.memory.available_kib) {
                self.usable_memory.get_or_create(&label).set(bytes(usable));
            }
            let demand: f32 = d.vcpus.iter().map(|v| v.usage + v.steal.unwrap_or(0.0)).sum();
            self.vcpu_demand.get_or_create(&label).set(f64::from(demand));
        }
        self.host_available.set(bytes(snapshot.host.memory.available_kib));
        self.host_reserve.set(bytes(snapshot.host.memory.reserve_kib));
        if let Some(fleet) = &mut self.fleet {
            let quantum_ns = f64::from(snapshot.quantum_ms) * 1e6;
            fleet.cpu_ns.retain(|uuid, _| snapshot.domains.iter().any(|d| &d.uuid == uuid));
            fleet.cpu.clear();
            fleet.memory.clear();
            for d in &snapshot.domains {
                let label = FleetLabel { resource: Text(d.uuid.clone()), fqdn: Text(fleet.fqdn.clone()) };
                let used: f32 = d.vcpus.iter().map(|v| v.usage).sum();
                let total = fleet.cpu_ns.entry(d.uuid.clone()).or_default();
                *total += f64::from(used) * quantum_ns;
                fleet.cpu.get_or_create(&label).set(*total);
                if let Some(used_kib) = d.memory.used_kib() {
                    fleet.memory.get_or_create(&label).set(used_kib as f64 / 1024.0);
                }
            }
        }
    }

    /// The exposition text (OpenMetrics text, which Prometheus reads).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        // Watcher's series carry their own names: the registry's prefix
        // would make them `vm_balancer_ceilometer_*`.
        out.replace("vm_balancer_ceilometer_", "ceilometer_")
    }
}

fn bytes(kib: u64) -> i64 {
    i64::try_from(kib.saturating_mul(1024)).unwrap_or(i64::MAX)
}

/// Serves `GET /metrics` on `addr` from its own thread; returns the bound
/// address (port 0 picks a free one).
pub fn serve(addr: SocketAddr, metrics: Arc<Mutex<Metrics>>) -> Result<SocketAddr, MetricsError> {
    let server = tiny_http::Server::http(addr).map_err(|e| MetricsError::Bind { addr, message: e.to_string() })?;
    let bound = server.server_addr().to_ip().unwrap_or(addr);
    if !bound.ip().is_loopback() {
        tracing::warn!(addr = %bound, "metrics served beyond loopback, as configured: every guest's name is in them");
    }
    std::thread::Builder::new()
        .name("vmb-metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let response = if request.url() == "/metrics" || request.url().starts_with("/metrics?") {
                    let text = metrics.lock().unwrap_or_else(|p| p.into_inner()).encode();
                    let header =
                        tiny_http::Header::from_bytes("Content-Type", "application/openmetrics-text; version=1.0.0; charset=utf-8")
                            .expect("a valid header");
                    tiny_http::Response::from_string(text).with_header(header)
                } else {
                    tiny_http::Response::from_string("vm-balancer: metrics at /metrics\n").with_status_code(404)
                };
                let _ = request.respond(response);
            }
        })
        .map_err(|e| MetricsError::Bind { addr, message: e.to_string() })?;
    Ok(bound)
}

/// This host's name, for the fleet series' `fqdn` label.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "localhost".into())
}
