//! Benchmark: memory-policy quality on families of generated scenarios, for
//! the defaults and `classic`, side by side in one run.
//! Run: `cargo bench --bench memory` (`VMB_MEMORY_SEEDS=N` seeds a family,
//! default 3).
//!
//! Each scenario runs through the real simulate pipeline (wasm policies,
//! guard, simulator), as `vm-balancer simulate` does. Families:
//! - `idle, plenty`: idle 8 GiB guests using 1 GiB on a roomy host;
//! - `idle, soft pressure`: idle guests at their max on a host left with
//!   about 10 % available (MOM's "shrink" zone);
//! - `filling`: guests whose use grows each quantum by less than 20 % of it
//!   (within the default headroom);
//! - `bursts`: guests jumping by 1 GiB every 20 quanta;
//! - `shortage, identical`: four identical guests whose use fits the host
//!   but whose use plus headroom does not;
//! - `shortage, weighted`: the same with two `shares=2` guests and two
//!   `shares=1` guests;
//! - `overcommitted`: four guests whose use alone is more than the host
//!   can give above its reserve (pressure cannot be avoided; OOM can);
//! - `late arrivals`: two guests grown to their need spend the pool, then
//!   two more start and push the host below its reserve.
//!
//! Columns: idle excess (free above a reference headroom of
//! `max(64 MiB, 20 % of use)`) reclaimed after 10 quanta (idle families);
//! guest pressure
//! quanta (balloon below use) and OOM quanta; spread of balloon targets
//! among identical guests at the end (`(max - min) / mean`); for the
//! weighted family, the `shares=2` guests' target over the `shares=1`
//! guests'; lowest host available memory, and the quanta below the reserve
//! (summed over seeds); free memory left in guests at the
//! end; memory reclaimed and given.

use std::collections::BTreeMap;
use std::path::Path;

use vm_balancer::backend::sim::Scenario;
use vm_balancer::config::Config;
use vm_balancer::simulate::simulate_observed;

const MIB: u64 = 1024;
const FAMILIES: [&str; 8] = [
    "idle, plenty",
    "idle, soft pressure",
    "filling",
    "bursts",
    "shortage, identical",
    "shortage, weighted",
    "overcommitted",
    "late arrivals",
];

/// A family's scenario for `seed` (the seed jitters sizes and rates by a
/// few percent, so a tuned constant does not pass by luck).
fn scenario(family: &str, seed: u64) -> Scenario {
    let j = |base: u64, pct: u64| base + (seed.wrapping_mul(2654435761) % (pct * base / 100 + 1));
    let head = |mem: u64, reserve: u64| {
        format!("name = \"{family}\"\nseed = {seed}\nquanta = 60\n[host]\ncpus = 4\nmemory_mib = {mem}\nreserve_mib = {reserve}\n")
    };
    let vm = |name: &str, count: u32, max: u64, initial: u64, mem: &str, tags: &str| {
        format!(
            "[[vm]]\nname = \"{name}\"\ncount = {count}\nmax_mib = {max}\ninitial_mib = {initial}\nswap_mib = 256\ntags = [{tags}]\ncpu = {{ kind = \"constant\", value = 0.1 }}\nmem_mib = {mem}\n"
        )
    };
    let text = match family {
        "idle, plenty" => {
            let used = j(1024, 10);
            head(65536, 1024) + &vm("idle", 4, 8192, 8192, &format!("{{ kind = \"constant\", value = {used} }}"), "")
        }
        "idle, soft pressure" => {
            let used = j(512, 20);
            head(4 * 4096 + 1800, 512) + &vm("idle", 4, 4096, 4096, &format!("{{ kind = \"constant\", value = {used} }}"), "")
        }
        "filling" => {
            let end = j(3072, 10);
            head(32768, 1024)
                + &vm("fill", 4, 4096, 1024, &format!("{{ kind = \"ramp\", from = 512, to = {end}, start = 0, end = 50 }}"), "")
        }
        "bursts" => {
            let low = j(512, 20);
            head(32768, 1024)
                + &vm(
                    "burst",
                    4,
                    4096,
                    2048,
                    &format!("{{ kind = \"periodic\", low = {low}, high = {}, period = 20, offset = 10 }}", low + 1024),
                    "",
                )
        }
        "shortage, identical" => {
            let used = j(1600, 5);
            head(7168 + 1024, 1024)
                + &vm("same", 4, 4096, 1024, &format!("{{ kind = \"ramp\", from = 512, to = {used}, start = 0, end = 20 }}"), "")
        }
        "shortage, weighted" => {
            let used = j(1600, 5);
            let ramp = format!("{{ kind = \"ramp\", from = 512, to = {used}, start = 0, end = 20 }}");
            head(7168 + 1024, 1024)
                + &vm("heavy", 2, 4096, 1024, &ramp, "\"shares=2\"")
                + &vm("light", 2, 4096, 1024, &ramp, "\"shares=1\"")
        }
        "late arrivals" => {
            let used = j(1700, 5);
            let late = j(600, 10);
            head(5120, 512)
                + &vm("big", 2, 2048, 512, &format!("{{ kind = \"constant\", value = {used} }}"), "")
                + &vm("late", 2, 1024, 512, &format!("{{ kind = \"constant\", value = {late} }}"), "")
                + "start = 20\n"
        }
        _ => {
            let used = j(2048, 10);
            head(8192 + 1024, 1024)
                + &vm("over", 4, 4096, 1024, &format!("{{ kind = \"ramp\", from = 512, to = {used}, start = 0, end = 20 }}"), "")
        }
    };
    Scenario::parse(&text, Path::new("memory.toml")).expect("the generated scenario is valid")
}

/// One run's figures.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    reclaimed_at10_pct: f64,
    pressure: u64,
    oom: u64,
    spread_pct: f64,
    weighted_ratio: f64,
    lowest_avail_mib: u64,
    below_reserve: u64,
    final_free_mib: u64,
    reclaimed_mib: u64,
    given_mib: u64,
}

fn run(sc: &Scenario, specs: &[String]) -> Run {
    let config = Config::default();
    let mut excess = Vec::new();
    let mut last_targets: BTreeMap<String, u64> = BTreeMap::new();
    let report = simulate_observed(sc, specs, &config, None, None, |_, sim| {
        let mut total = 0;
        last_targets.clear();
        for d in &sim.last_quantum().domains {
            let target = sim.target_kib(&d.name).unwrap_or(0);
            let headroom = (64 * MIB).max(d.used_kib / 5);
            total += target.saturating_sub(d.used_kib + headroom);
            last_targets.insert(d.name.clone(), target);
        }
        excess.push(total);
        Ok(())
    })
    .expect("the scenario runs");
    let mean_of = |prefix: &str| {
        let xs: Vec<u64> = last_targets.iter().filter(|(n, _)| n.starts_with(prefix)).map(|(_, t)| *t).collect();
        xs.iter().sum::<u64>() as f64 / xs.len().max(1) as f64
    };
    let first = excess.first().copied().unwrap_or(0);
    let at10 = excess.get(10).copied().unwrap_or(0);
    Run {
        reclaimed_at10_pct: if sc.name.starts_with("idle") && first > 0 { 100.0 * (1.0 - at10 as f64 / first as f64) } else { f64::NAN },
        pressure: report.memory.pressure_events,
        oom: report.memory.oom_events,
        spread_pct: report.memory.final_group_spread_pct,
        weighted_ratio: if sc.name == "shortage, weighted" { mean_of("heavy") / mean_of("light").max(1.0) } else { f64::NAN },
        lowest_avail_mib: report.memory.lowest_host_available_mib,
        below_reserve: report.memory.below_reserve_quanta,
        final_free_mib: report.memory.final_guest_free_mib,
        reclaimed_mib: report.memory.reclaimed_mib,
        given_mib: report.memory.given_mib,
    }
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = xs.filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seeds: u64 = std::env::var("VMB_MEMORY_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    let policies: [(&str, Vec<String>); 2] = [("default", Vec::new()), ("classic", vec!["builtin:classic".to_string()])];
    println!("Memory families, {seeds} seed(s) each, 60 quanta; means over seeds (worst in brackets where it matters).");
    println!(
        "| family | policy | idle excess reclaimed after 10 quanta | pressure (OOM) quanta | identical guests' spread at end | shares=2 / shares=1 target | lowest host available [quanta below the reserve] | free in guests at end | reclaimed / given |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for family in FAMILIES {
        for (name, specs) in &policies {
            let runs: Vec<Run> = (1..=seeds).map(|seed| run(&scenario(family, seed), specs)).collect();
            let worst_pressure = runs.iter().map(|r| r.pressure).max().unwrap_or(0);
            let worst_spread = runs.iter().map(|r| r.spread_pct).fold(0.0, f64::max);
            let pct = |x: f64| if x.is_nan() { "–".to_string() } else { format!("{x:.0} %") };
            let ratio = mean(runs.iter().map(|r| r.weighted_ratio));
            println!(
                "| {family} | {name} | {} | {:.1} ({:.1}) [{worst_pressure}] | {:.1} % [{worst_spread:.1} %] | {} | {} MiB [{}] | {:.0} MiB | {:.0} / {:.0} MiB |",
                pct(mean(runs.iter().map(|r| r.reclaimed_at10_pct))),
                mean(runs.iter().map(|r| r.pressure as f64)),
                mean(runs.iter().map(|r| r.oom as f64)),
                mean(runs.iter().map(|r| r.spread_pct)),
                if ratio.is_nan() { "–".to_string() } else { format!("{ratio:.2}") },
                runs.iter().map(|r| r.lowest_avail_mib).min().unwrap_or(0),
                runs.iter().map(|r| r.below_reserve).sum::<u64>(),
                mean(runs.iter().map(|r| r.final_free_mib as f64)),
                mean(runs.iter().map(|r| r.reclaimed_mib as f64)),
                mean(runs.iter().map(|r| r.given_mib as f64)),
            );
        }
    }
}
