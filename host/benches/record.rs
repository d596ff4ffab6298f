//! Measurement, not a criterion benchmark: the bytes one quantum takes in
//! a `run --record` directory, at 100 and 1,000 domains (the `large`
//! scenario's mix of VMs, scaled), and what encoding a frame costs. Run:
//! `cargo bench --bench record`. The figures go in the README ("Record").

use std::path::Path;
use std::time::Instant;

use vm_balancer::backend::sim::Scenario;
use vm_balancer::config::Config;
use vm_balancer::record::{frame_size, Frame};

fn scenario(domains: u32) -> Scenario {
    let (web, db, batch) = (domains * 6 / 10, domains * 3 / 10, domains / 10);
    let cpus = (domains / 4).max(16);
    let text = format!(
        r#"
name = "record-{domains}"
seed = 8
quanta = 40
[host]
cpus = {cpus}
memory_mib = {memory}
base_used_mib = 16384
[[vm]]
name = "web"
count = {web}
vcpus = 4
max_mib = 2048
placement = "random"
cpu = {{ kind = "random-walk", start = 0.03, step = 0.01, min = 0.0, max = 0.1 }}
spread = 0.5
mem_mib = {{ kind = "random-walk", start = 800, step = 20, min = 600, max = 1200 }}
[[vm]]
name = "db"
count = {db}
vcpus = 4
max_mib = 4096
placement = "random"
cpu = {{ kind = "constant", value = 0.05 }}
spread = 0.8
mem_mib = {{ kind = "constant", value = 2500 }}
[[vm]]
name = "batch"
count = {batch}
vcpus = 4
max_mib = 2048
placement = "random"
cpu = {{ kind = "phases", values = [0.2, 0.02], every = 10 }}
mem_mib = {{ kind = "constant", value = 1200 }}
"#,
        memory = u64::from(domains) * 4096 + 16384,
    );
    Scenario::parse(&text, Path::new("record-bench")).expect("bench scenario")
}

fn main() {
    println!("{:>8} {:>14} {:>14} {:>12} {:>14}", "domains", "bytes/quantum", "uncompressed", "encode", "MiB/day @1s");
    for domains in [100u32, 1000] {
        let sc = scenario(domains);
        let mut pipeline = vm_balancer::simulate::pipeline(&sc, &[], &Config::default(), None).expect("pipeline");
        let (mut bytes, mut plain, mut took, mut n) = (0usize, 0usize, 0f64, 0usize);
        for q in 0..sc.quanta {
            let (_, trace) = pipeline.step_traced().expect("step");
            if q < 10 {
                continue; // past the start, when every vCPU is being placed
            }
            let frame = Frame::from_trace(&trace, 0);
            let start = Instant::now();
            bytes += frame_size(&frame).expect("encodes");
            took += start.elapsed().as_secs_f64();
            plain += rmp_serde::to_vec_named(&frame).expect("encodes").len();
            n += 1;
        }
        let per = bytes as f64 / n as f64;
        println!(
            "{domains:>8} {:>14.0} {:>14.0} {:>10.2}ms {:>14.0}",
            per,
            plain as f64 / n as f64,
            took / n as f64 * 1000.0,
            per * 86_400.0 / (1 << 20) as f64
        );
    }
}
