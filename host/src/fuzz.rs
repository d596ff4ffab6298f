//! Property tests of the decoders that take untrusted input: scenario
//! files and config files here, the policy's answer in
//! [`crate::policy::answer`]. Each feeds random and mutated inputs and
//! asserts that decoding never panics, and that what decodes also runs: a
//! scenario that loads simulates a few quanta, a config that loads runs
//! its guard on the simulator. Running it is what catches a value that
//! validation lets through and the model cannot take (`f64::clamp` with
//! min > max was one).
//!
//! Every case has its own seeded RNG, so a failure names its seed and case
//! and prints the input. The normal test run does a fixed number of cases
//! (a few seconds); `VMB_FUZZ_SECONDS=60` runs each test for that long
//! instead (CI does, after the test suite), with a fresh seed unless
//! `VMB_FUZZ_SEED` gives one; `VMB_FUZZ_CASE=N` replays one case of it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::sim::Scenario;
use crate::config::Config;
use crate::policy::{PolicySet, Slot};

/// Seed of the fixed-count run, so the normal test run is reproducible.
const DEFAULT_SEED: u64 = 0x5eed_0011;

/// How long a property test runs and from which seed.
pub(crate) struct Budget {
    name: &'static str,
    seed: u64,
    cases: Option<u64>,
    time: Option<Duration>,
    /// `VMB_FUZZ_CASE`: replay just this case of the seed.
    only: Option<u64>,
}

impl Budget {
    /// `default_cases` cases from [`DEFAULT_SEED`], or what the
    /// environment says (`VMB_FUZZ_SECONDS`, `VMB_FUZZ_SEED`).
    pub(crate) fn from_env(name: &'static str, default_cases: u64) -> Budget {
        let env = |key: &str| std::env::var(key).ok().filter(|v| !v.trim().is_empty());
        let time = env("VMB_FUZZ_SECONDS").map(|s| {
            Duration::from_secs_f64(s.trim().parse().unwrap_or_else(|_| panic!("VMB_FUZZ_SECONDS={s:?} is not a number of seconds")))
        });
        let seed = match env("VMB_FUZZ_SEED") {
            Some(s) => s.trim().parse().unwrap_or_else(|_| panic!("VMB_FUZZ_SEED={s:?} is not a u64")),
            // A timed run explores: a new seed each run, printed below.
            None if time.is_some() => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
            None => DEFAULT_SEED,
        };
        let only = env("VMB_FUZZ_CASE").map(|s| s.trim().parse().unwrap_or_else(|_| panic!("VMB_FUZZ_CASE={s:?} is not a case number")));
        Budget { name, seed, cases: if time.is_some() { None } else { Some(default_cases) }, time, only }
    }

    /// Runs `check` on `generate`d inputs until the budget is spent. On a
    /// panic, fails naming the seed and case and printing `describe(input)`.
    /// Returns how many cases ran.
    pub(crate) fn run<T>(self, mut generate: impl FnMut(&mut ChaCha8Rng) -> T, describe: impl Fn(&T) -> String, check: impl Fn(&T)) -> u64 {
        let start = Instant::now();
        let mut ran = 0u64;
        let (mut case, end) = match self.only {
            Some(only) => (only, Some(only + 1)),
            None => (0, self.cases),
        };
        while end.is_none_or(|n| case < n) && (self.only.is_some() || self.time.is_none_or(|t| start.elapsed() < t)) {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed.wrapping_add(case));
            let input = generate(&mut rng);
            if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
                panic!(
                    "fuzz {}: case {case} of seed {} panicked (replay: VMB_FUZZ_SEED={} VMB_FUZZ_CASE={case}); input:\n{}",
                    self.name,
                    self.seed,
                    self.seed,
                    describe(&input)
                );
            }
            case += 1;
            ran += 1;
        }
        println!("fuzz {}: {ran} cases in {:.1?}, seed {}", self.name, start.elapsed(), self.seed);
        ran
    }
}

/// The shipped scenarios, the seeds of the scenario corpus.
pub(crate) const SHIPPED: &[(&str, &str)] = &[
    ("all-on-one", include_str!("../../examples/scenarios/all-on-one.toml")),
    ("uneven", include_str!("../../examples/scenarios/uneven.toml")),
    ("phases", include_str!("../../examples/scenarios/phases.toml")),
    ("idle-reclaim", include_str!("../../examples/scenarios/idle-reclaim.toml")),
    ("filling", include_str!("../../examples/scenarios/filling.toml")),
    ("host-short", include_str!("../../examples/scenarios/host-short.toml")),
    ("churn", include_str!("../../examples/scenarios/churn.toml")),
    ("large", include_str!("../../examples/scenarios/large.toml")),
    ("latency", include_str!("../../examples/scenarios/latency.toml")),
    ("keep-free", include_str!("../../examples/scenarios/keep-free.toml")),
];

/// Every profile kind and every optional key, in one small scenario.
const EVERY_KIND: &str = r#"
name = "every-kind"
seed = 9
quanta = 10
quantum_ms = 500

[host]
cpus = 3
memory_mib = 8192
base_used_mib = 512
reserve_mib = 256
background = [0.1, 0.0, 0.5]

[[vm]]
name = "walk"
count = 2
vcpus = 2
max_mib = 1024
initial_mib = 512
swap_mib = 64
placement = "random"
spread = 0.3
stagger = 1
stop = 8
cpu = { kind = "random-walk", start = 0.5, step = 0.2, min = 0.1, max = 0.9 }
mem_mib = { kind = "phases", values = [100, 900], every = 2 }

[[vm]]
name = "wave"
placement = "unpinned"
balloon_stats = false
tags = ["latency"]
max_mib = 2048
cpu = { kind = "periodic", low = 0.1, high = 1.0, period = 3, offset = 1 }
mem_mib = { kind = "ramp", from = 100, to = 2000, start = 1, end = 4 }

[[vm]]
name = "steps"
placement = "first"
start = 1
max_mib = 512
cpu = { kind = "step", before = 0.0, after = 1.0, at = 2 }
mem_mib = { kind = "constant", value = 500 }
"#;

/// The README's configuration block: every key with its default.
fn readme_config() -> &'static str {
    let readme = include_str!("../../README.md");
    let section = &readme[readme.find("## Configuration").expect("README has a Configuration section")..];
    let start = section.find("```toml\n").expect("with a TOML block") + "```toml\n".len();
    &section[start..start + section[start..].find("```").expect("that ends")]
}

/// Config corpus: the README's, plus per-policy limits and odd params.
const CONFIG_EXTRA: &str = r#"
quantum_ms = 200
[limits]
decide_timeout_ms = 50
[limits.policy."30-web.wasm"]
decide_timeout_ms = 100
max_output_kib = 1
[guard]
reserved_cpus = [0, 7]
max_pins_per_quantum = 0
[exclude]
names = ["db-*", "?"]
[params]
cpu = { max_moves = 1 }
x = [1, "a", { b = 2.5 }, 1979-05-27T07:32:00Z]
"#;

/// Values that break code which trusts its input.
const EXTREMES: &[&str] = &[
    "-1",
    "0",
    "0.0",
    "-0.0",
    "1",
    "nan",
    "-nan",
    "inf",
    "-inf",
    "1e308",
    "-1e308",
    "5e-324",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "9223372036854775807",
    "-9223372036854775808",
    "1099511627776",
    "3600001",
    "{}",
    "[]",
    "\"\"",
    "true",
];

/// Lines worth inserting: tables, empty and repeated ones, odd keys.
const LINES: &[&str] = &[
    "[host]",
    "[[vm]]",
    "[guard]",
    "[limits]",
    "[limits.policy.\"a\"]",
    "[params]",
    "[exclude]",
    "x = {}",
    "cpu = {}",
    "mem_mib = { kind = \"phases\", values = [], every = 0 }",
    "cpu = { kind = \"random-walk\", start = 0.5, step = 1, min = 1.0, max = 0.0 }",
    "cpu = { kind = \"periodic\", low = 0, high = 1, period = 0, offset = 18446744073709551615 }",
    "background = []",
    "background = [2.0]",
    "reserved_cpus = [0, 1, 2, 3, 4, 5, 6, 7]",
    "name = \"all-0\"",
    "count = 100000",
    "stagger = 18446744073709551615",
    "quanta = 0",
    "max_mib = 0",
    "",
];

/// Start offsets and ends of the number literals in `text`.
fn numbers(text: &str) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let starts = bytes[i].is_ascii_digit() && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'));
        if starts {
            let begin = if i > 0 && bytes[i - 1] == b'-' { i - 1 } else { i };
            let mut end = i;
            while end < bytes.len() && (bytes[end].is_ascii_digit() || b".eE+-_".contains(&bytes[end])) {
                end += 1;
            }
            found.push((begin, end));
            i = end;
        } else {
            i += 1;
        }
    }
    found
}

/// One to four random edits of `text`: bytes, lines, numbers, values.
fn mutate(text: &str, rng: &mut ChaCha8Rng) -> String {
    let mut text = text.to_string();
    for _ in 0..rng.gen_range(1..=4) {
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        match rng.gen_range(0..9) {
            0 | 1 => {
                let spots = numbers(&text);
                if !spots.is_empty() {
                    let (a, b) = spots[rng.gen_range(0..spots.len())];
                    text.replace_range(a..b, EXTREMES[rng.gen_range(0..EXTREMES.len())]);
                }
                continue;
            }
            2 if !lines.is_empty() => {
                lines.remove(rng.gen_range(0..lines.len()));
            }
            3 if !lines.is_empty() => {
                let line = lines[rng.gen_range(0..lines.len())].clone();
                lines.insert(rng.gen_range(0..=lines.len()), line);
            }
            4 if lines.len() > 1 => {
                let (a, b) = (rng.gen_range(0..lines.len()), rng.gen_range(0..lines.len()));
                lines.swap(a, b);
            }
            5 => lines.insert(rng.gen_range(0..=lines.len()), LINES[rng.gen_range(0..LINES.len())].to_string()),
            6 if !lines.is_empty() => {
                // A value swapped for an empty table, list, string...
                let i = rng.gen_range(0..lines.len());
                if let Some(eq) = lines[i].find(" = ") {
                    let extreme = EXTREMES[rng.gen_range(0..EXTREMES.len())];
                    lines[i] = format!("{} = {extreme}", &lines[i][..eq]);
                }
            }
            7 => {
                let mut bytes = text.into_bytes();
                for _ in 0..rng.gen_range(1..4) {
                    if bytes.is_empty() {
                        break;
                    }
                    let at = rng.gen_range(0..bytes.len());
                    match rng.gen_range(0..3) {
                        0 => bytes[at] = rng.gen(),
                        1 => bytes.truncate(at),
                        _ => bytes.insert(at, rng.gen()),
                    }
                }
                text = String::from_utf8_lossy(&bytes).into_owned();
                continue;
            }
            _ => {
                let at = rng.gen_range(0..=text.len());
                if text.is_char_boundary(at) {
                    text.truncate(at);
                }
                continue;
            }
        }
        text = lines.join("\n");
    }
    text
}

/// Random bytes now and then, otherwise a mutated seed.
fn generate(seeds: &[&str], rng: &mut ChaCha8Rng) -> String {
    if rng.gen_ratio(1, 20) {
        let bytes: Vec<u8> = (0..rng.gen_range(0..200)).map(|_| rng.gen()).collect();
        return String::from_utf8_lossy(&bytes).into_owned();
    }
    mutate(seeds[rng.gen_range(0..seeds.len())], rng)
}

/// Runs `quanta` quanta of `scenario` under `config`, the native defaults
/// deciding (no wasm compile per case: thousands of cases a second).
fn simulate(scenario: &Scenario, config: &Config, quanta: u64) {
    let config = crate::simulate::scenario_config(scenario, config);
    let mut policies = PolicySet::new(&config.limits);
    policies.push(Slot::fallback_only("fuzz"));
    let mut pipeline = crate::simulate::pipeline_with(scenario, &config, policies);
    for _ in 0..quanta {
        pipeline.step().expect("the simulator always observes");
    }
    let report = crate::simulate::Report::build(scenario, &pipeline);
    let _ = report.to_string();
}

/// Property: any scenario text loads or is refused with an error, never a
/// panic; one that loads simulates a few quanta without panicking.
#[test]
fn fuzz_scenario_files_load_or_fail_and_what_loads_simulates() {
    let mut seeds: Vec<&str> = SHIPPED.iter().map(|(_, text)| *text).collect();
    // The small ones more often than `large` (1,000 VMs a case).
    seeds.extend([EVERY_KIND; 4]);
    let counts = std::cell::Cell::new((0u64, 0u64));
    let ran = Budget::from_env("scenario", 20_000).run(
        |rng| generate(&seeds, rng),
        |text| text.clone(),
        |text| match Scenario::parse(text, Path::new("fuzz.toml")) {
            Ok(scenario) => {
                // Bounded so a mutated `count` does not make one case take minutes.
                let vcpus: u64 = scenario.vms.iter().map(|vm| u64::from(vm.count) * u64::from(vm.vcpus)).sum();
                if vcpus <= 20_000 {
                    simulate(&scenario, &Config::default(), 4);
                }
                let (l, r) = counts.get();
                counts.set((l + 1, r));
            }
            Err(error) => {
                let _ = crate::error_chain(&error);
                let (l, r) = counts.get();
                counts.set((l, r + 1));
            }
        },
    );
    let (loaded, refused) = counts.get();
    println!("scenarios: {loaded} loaded and simulated, {refused} refused");
    // (Not when replaying one case.)
    assert!(ran < 1000 || (loaded > 0 && refused > 0), "the mutations must reach both outcomes: {loaded} loaded, {refused} refused");
}

/// Property: any config text loads or is refused with an error, never a
/// panic; one that loads passes the host checks (or is refused by them)
/// and runs the guard and snapshot stages on the simulator.
#[test]
fn fuzz_config_files_load_or_fail_and_what_loads_runs() {
    let seeds = [readme_config(), CONFIG_EXTRA, ""];
    let scenario: Scenario = toml::from_str(EVERY_KIND).unwrap();
    let counts = std::cell::Cell::new((0u64, 0u64));
    let ran = Budget::from_env("config", 20_000).run(
        |rng| generate(&seeds, rng),
        |text| text.clone(),
        |text| match Config::parse(text, Path::new("fuzz.toml")) {
            Ok(config) => {
                let _ = config.limits.for_slot("30-web.wasm");
                let _ = config.policy_params();
                let _ = config.exclude.matches("web-1", "5151");
                let host = crate::simulate::host_facts(&scenario);
                let fits = crate::host_check::check(&config, &host).is_ok();
                let scenario_config = crate::simulate::scenario_config(&scenario, &config);
                if fits && scenario_config.validate_policy_limits().is_ok() {
                    simulate(&scenario, &config, 3);
                }
                let (l, r) = counts.get();
                counts.set((l + 1, r));
            }
            Err(error) => {
                let _ = crate::error_chain(&error);
                let (l, r) = counts.get();
                counts.set((l, r + 1));
            }
        },
    );
    let (loaded, refused) = counts.get();
    println!("configs: {loaded} loaded, {refused} refused");
    // (Not when replaying one case.)
    assert!(ran < 1000 || (loaded > 0 && refused > 0), "the mutations must reach both outcomes: {loaded} loaded, {refused} refused");
}

#[test]
fn the_corpus_seeds_are_valid() {
    for (name, text) in SHIPPED.iter().chain([&("every-kind", EVERY_KIND)]) {
        let scenario = Scenario::parse(text, Path::new(name)).unwrap_or_else(|e| panic!("{name}: {}", crate::error_chain(&e)));
        crate::simulate::check_host(&scenario, &Config::default()).unwrap();
    }
    for text in [readme_config(), CONFIG_EXTRA] {
        Config::parse(text, Path::new("seed.toml")).unwrap_or_else(|e| panic!("{}: {text}", crate::error_chain(&e)));
    }
    assert!(readme_config().contains("max_pins_per_quantum"), "{}", readme_config());
    assert_eq!(numbers("a = -1.5e3\nb_2 = [3, 4]"), vec![(4, 10), (18, 19), (21, 22)]);
}
