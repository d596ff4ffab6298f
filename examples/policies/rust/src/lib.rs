//! spread: each quantum, moves the hottest vCPU whose move helps from the
//! busiest usable pCPU to the least-loaded one.
use vm_balancer_sdk::{export_policy, Action, Info, Policy, Snapshot};

#[derive(Default)]
pub struct Spread;

impl Policy for Spread {
    fn info() -> Info {
        Info { name: "spread", version: "0.1.0", cpu: true, memory: false }
    }

    fn decide(&mut self, s: &Snapshot) -> Result<Vec<Action>, String> {
        let load = |id: u32| s.domains.iter().flat_map(|d| &d.vcpus).filter(|v| v.cpu == id).map(|v| v.demand()).sum::<f32>();
        let (Some(hot), Some(cold)) = (
            s.usable_cpus().max_by(|a, b| load(a.id).total_cmp(&load(b.id))),
            s.usable_cpus().min_by(|a, b| load(a.id).total_cmp(&load(b.id))),
        ) else { return Ok(vec![]) };
        let mine = s.domains.iter().flat_map(|d| d.vcpus.iter().map(move |v| (d, v))).filter(|(_, v)| v.cpu == hot.id);
        let helps = mine.filter(|(_, v)| load(hot.id) - load(cold.id) > v.demand() + 0.05); // max(hot - d, cold + d) < hot
        Ok(match helps.max_by(|a, b| a.1.demand().total_cmp(&b.1.demand())) {
            Some((d, v)) => vec![Action::pin(&d.name, v.id, vec![cold.id], "spread")],
            None => vec![],
        })
    }
}
export_policy!(Spread);

#[test]
fn moves_one_vcpu_off_the_busy_cpu() {
    use vm_balancer_sdk::builder::{DomainBuilder, SnapshotBuilder};
    let snap = SnapshotBuilder::new(2, 4 << 20).domain(DomainBuilder::new("a").vcpu(0, 1.0).vcpu(0, 1.0)).build();
    let actions = Spread.decide(&snap).unwrap();
    assert!(matches!(&actions[..], [Action::Pin { cpus, .. }] if cpus == &vec![1]), "{actions:?}");
}
