//! The wasmtime sandbox, top to bottom in one place:
//! `Engine` → `Component` (checked: magic, imports, world) → `Linker` with the
//! host's `log` (and deny-all WASI) → `PolicyPre` → per-instance `Store` with a
//! memory limiter and an epoch deadline → `call_decide`.
//!
//! Why these choices:
//! - **Epoch interruption, not fuel**: both cost about 20 % per call here,
//!   but a deadline in milliseconds is what an operator can reason about. One
//!   process-wide ticker thread advances the epoch every [`TICK_MS`].
//! - **A custom limiter** records the size a policy tried to grow to, so a
//!   memory-limit trap is reported as exactly that, not as a generic trap.
//! - **A trap poisons the store.** The instance is dropped and the next call
//!   instantiates afresh from the `PolicyPre` (tens of microseconds), so a
//!   policy's in-memory state starts over after any failure.
//! - **Two worlds, one sandbox.** A component targets `policy` (MessagePack)
//!   or `policy-json` (JSON text); which one is found by type-checking its
//!   exports against each, and [`LoadedPolicy::encoding`] says which. JSON
//!   exists because interpreted languages parse it natively, while a
//!   MessagePack decoder interpreted in the guest cost them 20-65 ms per
//!   100-domain snapshot (Python, JavaScript), 10-100x the JSON parse.
//! - **No ambient authority.** WASI is linked only so that components built
//!   for `wasm32-wasip2` load; its context has no preopens, no environment,
//!   no arguments, no network. Any import other than `log` and the WASI
//!   interfaces in [`ALLOWED_WASI`] is refused at load, by name.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vm_balancer_sdk::Action;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

pub use super::answer::Encoding;
use crate::config::SlotLimits;

/// Host bindings generated from `wit/policy.wit`, world `policy` (MessagePack).
mod bindings {
    wasmtime::component::bindgen!({ world: "policy", path: "wit" });
}

/// The same for world `policy-json` (JSON text).
mod json_bindings {
    wasmtime::component::bindgen!({ world: "policy-json", path: "wit" });
}

pub use bindings::PolicyInfo;

/// Epoch ticker period. Deadlines are rounded up to whole ticks.
pub const TICK_MS: u64 = 5;
/// WASI interface prefixes a policy may import (all backed by a deny-all context).
pub const ALLOWED_WASI: &[&str] = &["wasi:io/", "wasi:clocks/", "wasi:random/", "wasi:cli/", "wasi:filesystem/"];
/// Log lines a policy may write per call; the rest are dropped and counted.
const MAX_LOG_LINES_PER_CALL: u32 = 64;
/// Longest log line kept, bytes.
const MAX_LOG_LINE_BYTES: usize = 1024;
/// Log lines a policy may write per [`LOG_WINDOW`], across calls: a policy
/// that logs a line per vCPU every quantum would otherwise fill the
/// journal. What is over is dropped, counted, and reported once per window.
pub const MAX_LOG_LINES_PER_WINDOW: u32 = 120;
/// The window of [`MAX_LOG_LINES_PER_WINDOW`].
pub const LOG_WINDOW: Duration = Duration::from_secs(60);

/// One policy's log rate limit, shared by its successive instances (a trap
/// starts a fresh store, not a fresh budget).
#[derive(Debug, Default)]
struct LogBudget {
    /// The policy's own name (from `describe`), carried by its log lines.
    policy: String,
    window_start: Option<std::time::Instant>,
    lines: u32,
    dropped: u64,
}

impl LogBudget {
    /// Starts a new window when the last one is over, reporting what it dropped.
    fn roll(&mut self, slot: &str) {
        let now = std::time::Instant::now();
        if self.window_start.is_some_and(|start| now.duration_since(start) < LOG_WINDOW) {
            return;
        }
        if self.dropped > 0 {
            tracing::warn!(
                target: "policy",
                slot,
                policy = %self.policy,
                dropped = self.dropped,
                limit = MAX_LOG_LINES_PER_WINDOW,
                window_s = LOG_WINDOW.as_secs(),
                "policy log lines over the rate limit were dropped"
            );
        }
        *self = LogBudget { policy: std::mem::take(&mut self.policy), window_start: Some(now), lines: 0, dropped: 0 };
    }

    /// True if one more line may be written now.
    fn admit(&mut self, slot: &str) -> bool {
        self.roll(slot);
        self.lines += 1;
        if self.lines > MAX_LOG_LINES_PER_WINDOW {
            self.dropped += 1;
            return false;
        }
        true
    }
}

/// Why a policy could not be loaded or did not decide. Every variant names
/// the policy (file or slot) and the value that was over the line.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Not a WebAssembly binary at all.
    #[error("{source_name}: not a WebAssembly file (first bytes {magic:02x?}, expected 00 61 73 6d)")]
    NotWasm {
        /// File or builtin name.
        source_name: String,
        /// The first bytes found.
        magic: Vec<u8>,
    },
    /// A core module, not a component.
    #[error("{source_name}: is a core WebAssembly module, not a component; build it as a component (e.g. target wasm32-wasip2, or wit-component)")]
    CoreModule {
        /// File or builtin name.
        source_name: String,
    },
    /// Truncated or otherwise invalid component.
    #[error("{source_name}: invalid or truncated component ({size_bytes} bytes): {detail}")]
    Invalid {
        /// File or builtin name.
        source_name: String,
        /// Size of what was read.
        size_bytes: usize,
        /// wasmtime's reason.
        detail: String,
    },
    /// Imports something the sandbox does not provide.
    #[error("{source_name}: imports `{import}`, which the sandbox does not provide (allowed: `log`, and WASI {ALLOWED_WASI:?} with a deny-all context)")]
    ForbiddenImport {
        /// File or builtin name.
        source_name: String,
        /// The offending import.
        import: String,
    },
    /// Not the `vm-balancer:policy` world.
    #[error("{source_name}: is not a vm-balancer:policy@0.1.0 component (world `policy` or `policy-json`: needs exports `describe` and `decide`): {detail}")]
    WrongWorld {
        /// File or builtin name.
        source_name: String,
        /// wasmtime's reason.
        detail: String,
    },
    /// `decide` (or `describe`) ran past its deadline.
    #[error("policy {slot}: timed out after {timeout_ms} ms")]
    Timeout {
        /// Slot name.
        slot: String,
        /// The deadline.
        timeout_ms: u64,
    },
    /// Tried to grow memory past the limit.
    #[error("policy {slot}: tried to grow memory to {requested_bytes} bytes, over its limit of {limit_bytes} bytes")]
    MemoryLimit {
        /// Slot name.
        slot: String,
        /// What it asked for.
        requested_bytes: usize,
        /// The limit.
        limit_bytes: usize,
    },
    /// Any other trap (panic, unreachable, out-of-bounds).
    #[error("policy {slot}: trapped: {detail}")]
    Trap {
        /// Slot name.
        slot: String,
        /// wasmtime's description.
        detail: String,
    },
    /// `decide` returned `err(..)`.
    #[error("policy {slot}: returned an error: {message}")]
    Refused {
        /// Slot name.
        slot: String,
        /// The policy's message.
        message: String,
    },
    /// The answer is larger than allowed.
    #[error("policy {slot}: answer of {size_bytes} bytes is over the limit of {limit_bytes} bytes")]
    OutputTooLarge {
        /// Slot name.
        slot: String,
        /// Its size.
        size_bytes: usize,
        /// The limit.
        limit_bytes: usize,
    },
    /// The answer is not a `{ "actions": [...] }` map.
    #[error("policy {slot}: answer ({size_bytes} bytes, {format}) is not a decision: {detail}")]
    Undecodable {
        /// Slot name.
        slot: String,
        /// Its size.
        size_bytes: usize,
        /// MessagePack or JSON.
        format: &'static str,
        /// What is wrong, naming the action and field.
        detail: String,
    },
    /// The snapshot handed to a JSON-world policy is not UTF-8 text (a
    /// caller bug: [`Encoding::encode`] never produces that; an error, not
    /// a panic).
    #[error("policy {slot}: the snapshot handed to it is not in its encoding ({detail})")]
    WrongInput {
        /// Slot name.
        slot: String,
        /// What is wrong.
        detail: String,
    },
}

impl PolicyError {
    /// A short, stable name of the failure kind, for counters and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            PolicyError::NotWasm { .. } => "not-wasm",
            PolicyError::CoreModule { .. } => "core-module",
            PolicyError::Invalid { .. } => "invalid",
            PolicyError::ForbiddenImport { .. } => "forbidden-import",
            PolicyError::WrongWorld { .. } => "wrong-world",
            PolicyError::Timeout { .. } => "timeout",
            PolicyError::MemoryLimit { .. } => "memory-limit",
            PolicyError::Trap { .. } => "trap",
            PolicyError::Refused { .. } => "refused",
            PolicyError::OutputTooLarge { .. } => "output-too-large",
            PolicyError::Undecodable { .. } => "undecodable",
            PolicyError::WrongInput { .. } => "wrong-input",
        }
    }
}

/// Epoch ticks of a deadline: +1 because the current tick is already partly over.
fn deadline_ticks(limits: &SlotLimits) -> u64 {
    limits.timeout_ms.div_ceil(TICK_MS) + 1
}

/// The process-wide engine, with its epoch ticker.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true).epoch_interruption(true);
        let engine = Engine::new(&config).expect("the engine configuration is static and valid");
        let ticker = engine.clone();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(TICK_MS));
                ticker.increment_epoch();
            })
            .expect("spawning the epoch ticker thread");
        engine
    })
}

/// Records memory growth refused by the limit.
struct MemoryLimiter {
    max_bytes: usize,
    refused_bytes: Option<usize>,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.refused_bytes = Some(desired);
            wasmtime::bail!("memory limit of {} bytes reached", self.max_bytes);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// What a policy's store holds.
struct HostState {
    slot: Arc<str>,
    limiter: MemoryLimiter,
    wasi: WasiCtx,
    table: ResourceTable,
    log_lines: u32,
    log_budget: Arc<std::sync::Mutex<LogBudget>>,
}

impl bindings::PolicyImports for HostState {
    fn log(&mut self, level: bindings::Level, message: String) {
        self.log_lines += 1;
        if self.log_lines > MAX_LOG_LINES_PER_CALL {
            return;
        }
        let mut message = message;
        if message.len() > MAX_LOG_LINE_BYTES {
            let mut cut = MAX_LOG_LINE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let slot = &*self.slot;
        let mut budget = self.log_budget.lock().unwrap_or_else(|p| p.into_inner());
        if !budget.admit(slot) {
            return;
        }
        let policy = budget.policy.as_str();
        match level {
            bindings::Level::Trace => tracing::trace!(target: "policy", slot, policy, "{message}"),
            bindings::Level::Debug => tracing::debug!(target: "policy", slot, policy, "{message}"),
            bindings::Level::Info => tracing::info!(target: "policy", slot, policy, "{message}"),
            bindings::Level::Warn => tracing::warn!(target: "policy", slot, policy, "{message}"),
            bindings::Level::Error => tracing::error!(target: "policy", slot, policy, "{message}"),
        }
    }
}

impl json_bindings::PolicyJsonImports for HostState {
    fn log(&mut self, level: json_bindings::Level, message: String) {
        let level = match level {
            json_bindings::Level::Trace => bindings::Level::Trace,
            json_bindings::Level::Debug => bindings::Level::Debug,
            json_bindings::Level::Info => bindings::Level::Info,
            json_bindings::Level::Warn => bindings::Level::Warn,
            json_bindings::Level::Error => bindings::Level::Error,
        };
        bindings::PolicyImports::log(self, level, message)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// Loads components into the sandbox.
pub struct Sandbox {
    linker: Linker<HostState>,
    limits: crate::config::Limits,
}

impl Sandbox {
    /// A sandbox whose policies run under `limits` (each under its own
    /// `[limits.policy."NAME"]` override, if any).
    pub fn new(limits: &crate::config::Limits) -> Self {
        // Both worlds import the same `log: func(level, string)` (the enums
        // are structurally equal), so one linker definition serves both.
        let mut linker = Linker::new(engine());
        bindings::Policy::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .expect("linking `log` into a fresh linker cannot clash");
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).expect("linking WASI into a fresh linker cannot clash");
        Sandbox { linker, limits: limits.clone() }
    }

    /// The limits of the policy in slot `slot`.
    pub fn limits_for(&self, slot: &str) -> SlotLimits {
        self.limits.for_slot(slot)
    }

    /// Compiles and checks a component: magic, imports, world; then
    /// instantiates it and calls `describe`.
    pub fn load(&self, slot: &str, source_name: &str, bytes: &[u8]) -> Result<LoadedPolicy, PolicyError> {
        let component = compile(source_name, bytes)?;
        self.load_compiled(slot, source_name, component)
    }

    /// Like [`load`](Self::load) for an already compiled component.
    pub fn load_compiled(&self, slot: &str, source_name: &str, component: Component) -> Result<LoadedPolicy, PolicyError> {
        let ty = component.component_type();
        let imports: Vec<String> = ty.imports(engine()).map(|(name, _)| name.to_string()).collect();
        let exports: Vec<String> = ty.exports(engine()).map(|(name, _)| name.to_string()).collect();
        if let Some(bad) = imports.iter().find(|name| !import_allowed(name)) {
            return Err(PolicyError::ForbiddenImport { source_name: source_name.into(), import: bad.clone() });
        }
        let wrong_world = |e: wasmtime::Error| PolicyError::WrongWorld { source_name: source_name.into(), detail: error_chain(&e) };
        let pre = self.linker.instantiate_pre(&component).map_err(wrong_world)?;
        let pre = match bindings::PolicyPre::new(pre.clone()) {
            Ok(pre) => Pre::MessagePack(pre),
            Err(pack_error) => match json_bindings::PolicyJsonPre::new(pre) {
                Ok(pre) => Pre::Json(pre),
                Err(json_error) => {
                    return Err(PolicyError::WrongWorld {
                        source_name: source_name.into(),
                        detail: format!(
                            "as world `policy`: {}; as world `policy-json`: {}",
                            error_chain(&pack_error),
                            error_chain(&json_error)
                        ),
                    })
                }
            },
        };
        let mut policy = LoadedPolicy {
            slot: Arc::from(slot),
            source_name: source_name.to_string(),
            pre,
            limits: self.limits_for(slot),
            live: None,
            log_budget: Arc::default(),
            imports,
            exports,
            info: PolicyInfo { name: String::new(), version: String::new(), cpu: false, memory: false },
            instantiations: 0,
            last_decide: Duration::ZERO,
            strict: false,
            warnings: Vec::new(),
        };
        policy.info = policy.with_instance(|store, instance| match instance {
            Instance::MessagePack(i) => i.call_describe(store),
            Instance::Json(i) => {
                i.call_describe(store).map(|info| PolicyInfo { name: info.name, version: info.version, cpu: info.cpu, memory: info.memory })
            }
        })?;
        policy.log_budget.lock().unwrap_or_else(|p| p.into_inner()).policy = policy.info.name.clone();
        Ok(policy)
    }
}

/// Compiles a component, turning every way a file can be wrong into a
/// [`PolicyError`] that names it.
pub fn compile(source_name: &str, bytes: &[u8]) -> Result<Component, PolicyError> {
    check_header(source_name, bytes)?;
    Component::new(engine(), bytes).map_err(|e| PolicyError::Invalid {
        source_name: source_name.into(),
        size_bytes: bytes.len(),
        detail: error_chain(&e),
    })
}

/// Checks the magic number and the layer (component vs core module).
pub fn check_header(source_name: &str, bytes: &[u8]) -> Result<(), PolicyError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(PolicyError::NotWasm { source_name: source_name.into(), magic: bytes.iter().take(4).copied().collect() });
    }
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err(PolicyError::CoreModule { source_name: source_name.into() });
    }
    Ok(())
}

fn import_allowed(name: &str) -> bool {
    name == "log" || ALLOWED_WASI.iter().any(|prefix| name.starts_with(prefix))
}

/// wasmtime's error with its causes, `: `-separated (its alternate form).
fn error_chain(e: &wasmtime::Error) -> String {
    format!("{e:#}")
}

/// A component, ready to instantiate, in the world it targets.
enum Pre {
    MessagePack(bindings::PolicyPre<HostState>),
    Json(json_bindings::PolicyJsonPre<HostState>),
}

/// A live instance, in the world it targets.
enum Instance {
    MessagePack(bindings::Policy),
    Json(json_bindings::PolicyJson),
}

/// A loaded policy: compiled, checked, with a live instance whose state
/// persists across quanta until a trap or a reload.
pub struct LoadedPolicy {
    slot: Arc<str>,
    source_name: String,
    pre: Pre,
    limits: SlotLimits,
    live: Option<(Store<HostState>, Instance)>,
    log_budget: Arc<std::sync::Mutex<LogBudget>>,
    imports: Vec<String>,
    exports: Vec<String>,
    info: PolicyInfo,
    instantiations: u64,
    last_decide: Duration,
    /// `policy check`: decode strictly and keep the warnings.
    strict: bool,
    warnings: Vec<String>,
}

/// Most strict-decoding warnings kept between two [`LoadedPolicy::take_warnings`].
const MAX_WARNINGS: usize = 100;

impl LoadedPolicy {
    /// What the policy said about itself.
    pub fn info(&self) -> &PolicyInfo {
        &self.info
    }

    /// The component's import names.
    pub fn imports(&self) -> &[String] {
        &self.imports
    }

    /// The component's export names.
    pub fn exports(&self) -> &[String] {
        &self.exports
    }

    /// Where it came from (a path or `builtin:NAME`).
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// How many instances have been created (1 + one per failure recovered).
    pub fn instantiations(&self) -> u64 {
        self.instantiations
    }

    /// Which world it targets: how its snapshot must be encoded.
    pub fn encoding(&self) -> Encoding {
        match self.pre {
            Pre::MessagePack(_) => Encoding::MessagePack,
            Pre::Json(_) => Encoding::Json,
        }
    }

    /// The limits it runs under (its own override, or `[limits]`).
    pub fn limits(&self) -> SlotLimits {
        self.limits
    }

    /// Wall time of the last `decide` call (instantiation included when the
    /// call made a fresh instance), whether it succeeded or not.
    pub fn last_decide(&self) -> Duration {
        self.last_decide
    }

    /// Runs `decide` under the limits and decodes the answer. `snapshot` is
    /// in the policy's [`encoding`](Self::encoding).
    pub fn decide(&mut self, snapshot: &[u8]) -> Result<Vec<Action>, PolicyError> {
        let bytes = self.call_decide(snapshot)?;
        if !self.strict {
            return super::answer::decode(self.encoding(), &bytes).map_err(|detail| self.undecodable(&bytes, detail));
        }
        let (actions, warnings) =
            super::answer::decode_strict(self.encoding(), &bytes).map_err(|detail| self.undecodable(&bytes, detail))?;
        let room = MAX_WARNINGS.saturating_sub(self.warnings.len());
        self.warnings.extend(warnings.into_iter().take(room));
        Ok(actions)
    }

    /// Decode every answer strictly from now on, keeping a warning for
    /// every key the daemon does not know (`policy check`: a misspelt
    /// optional field is otherwise silently ignored).
    pub fn set_strict(&mut self, strict: bool) {
        self.strict = strict;
    }

    /// The strict-decoding warnings since the last call.
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    fn undecodable(&self, bytes: &[u8], detail: String) -> PolicyError {
        PolicyError::Undecodable { slot: self.slot.to_string(), size_bytes: bytes.len(), format: self.encoding().format(), detail }
    }

    /// The raw answer, size-checked.
    fn call_decide(&mut self, snapshot: &[u8]) -> Result<Vec<u8>, PolicyError> {
        let limit = self.limits.max_output_bytes;
        let started = Instant::now();
        // The JSON world's input is borrowed as text, not copied: this runs
        // every quantum on snapshots of hundreds of KB.
        let text = match self.encoding() {
            Encoding::MessagePack => None,
            Encoding::Json => Some(std::str::from_utf8(snapshot).map_err(|e| PolicyError::WrongInput {
                slot: self.slot.to_string(),
                detail: format!("JSON world, input not UTF-8: {e}"),
            })?),
        };
        let answer = self.with_instance(|store, instance| match instance {
            Instance::MessagePack(i) => i.call_decide(store, snapshot),
            Instance::Json(i) => i.call_decide(store, text.unwrap_or_default()).map(|r| r.map(String::into_bytes)),
        });
        self.last_decide = started.elapsed();
        let bytes = answer?.map_err(|message| PolicyError::Refused { slot: self.slot.to_string(), message })?;
        if bytes.len() > limit {
            return Err(PolicyError::OutputTooLarge { slot: self.slot.to_string(), size_bytes: bytes.len(), limit_bytes: limit });
        }
        Ok(bytes)
    }

    /// Calls into the instance (creating it if needed) under a fresh
    /// deadline; on a trap, drops the poisoned store and classifies the error.
    fn with_instance<R>(&mut self, call: impl FnOnce(&mut Store<HostState>, &Instance) -> wasmtime::Result<R>) -> Result<R, PolicyError> {
        if self.live.is_none() {
            let mut store = Store::new(
                engine(),
                HostState {
                    slot: self.slot.clone(),
                    limiter: MemoryLimiter { max_bytes: self.limits.max_memory_bytes, refused_bytes: None },
                    wasi: WasiCtxBuilder::new().allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false).build(),
                    table: ResourceTable::new(),
                    log_lines: 0,
                    log_budget: Arc::clone(&self.log_budget),
                },
            );
            store.limiter(|s| &mut s.limiter);
            store.epoch_deadline_trap();
            store.set_epoch_deadline(deadline_ticks(&self.limits));
            self.instantiations += 1;
            let instance = match &self.pre {
                Pre::MessagePack(pre) => pre.instantiate(&mut store).map(Instance::MessagePack),
                Pre::Json(pre) => pre.instantiate(&mut store).map(Instance::Json),
            };
            match instance {
                Ok(instance) => self.live = Some((store, instance)),
                Err(e) => return Err(self.classify(e, &store)),
            }
        }
        let (store, instance) = self.live.as_mut().expect("instantiated above");
        store.data_mut().log_lines = 0;
        store.set_epoch_deadline(deadline_ticks(&self.limits));
        match call(store, instance) {
            Ok(value) => {
                let dropped = store.data().log_lines.saturating_sub(MAX_LOG_LINES_PER_CALL);
                if dropped > 0 {
                    tracing::warn!(slot = &*self.slot, dropped, "policy log lines over the per-call limit were dropped");
                }
                self.log_budget.lock().unwrap_or_else(|p| p.into_inner()).roll(&self.slot);
                Ok(value)
            }
            Err(e) => {
                let (store, _) = self.live.take().expect("live instance");
                Err(self.classify(e, &store))
            }
        }
    }

    fn classify(&self, e: wasmtime::Error, store: &Store<HostState>) -> PolicyError {
        let slot = self.slot.to_string();
        if let Some(requested_bytes) = store.data().limiter.refused_bytes {
            return PolicyError::MemoryLimit { slot, requested_bytes, limit_bytes: self.limits.max_memory_bytes };
        }
        if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return PolicyError::Timeout { slot, timeout_ms: self.limits.timeout_ms };
        }
        PolicyError::Trap { slot, detail: error_chain(&e) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_logs_are_rate_limited_across_calls_and_the_drops_counted() {
        let mut budget = LogBudget { policy: "noisy".into(), ..LogBudget::default() };
        let admitted = (0..MAX_LOG_LINES_PER_WINDOW + 30).filter(|_| budget.admit("10-noisy.wasm")).count();
        assert_eq!(admitted, MAX_LOG_LINES_PER_WINDOW as usize);
        assert_eq!(budget.dropped, 30);
        // A call later in the same window: still over.
        budget.roll("10-noisy.wasm");
        assert!(!budget.admit("10-noisy.wasm"));
        assert_eq!(budget.dropped, 31);
        // The window is over: the drops are reported, and lines pass again.
        budget.window_start = std::time::Instant::now().checked_sub(LOG_WINDOW + Duration::from_secs(1));
        assert!(budget.admit("10-noisy.wasm"));
        assert_eq!((budget.lines, budget.dropped), (1, 0));
        assert_eq!(budget.policy, "noisy", "the policy's name survives the window");
    }
}
