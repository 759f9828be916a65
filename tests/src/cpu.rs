//! Where a benchmark's CPU goes: the time each process of a run (the broker,
//! PostgreSQL, the load generator, the relay, the runner) spent over a
//! window, read from `/proc` (Linux), as a share of one core.
//!
//! A process is counted by its own time and its threads' (the `utime` and
//! `stime` of `/proc/<pid>/stat`). One that started inside the window counts
//! from zero; one that ended inside it is not counted (PostgreSQL's
//! short-lived backends, the only such processes in a run, are a small
//! part). The machine's busy share comes from `/proc/stat`.

use std::collections::BTreeMap;
use std::time::Instant;

/// How a process is picked out.
#[derive(Debug, Clone)]
pub enum Role {
    /// This process.
    Pid(u32),
    /// Every process whose command name (`/proc/<pid>/comm`) is this.
    Named(&'static str),
}

/// The CPU time counters of a set of roles at one moment.
#[derive(Debug, Clone)]
pub struct Sample {
    at: Instant,
    /// Per role, each process's ticks.
    ticks: Vec<(String, BTreeMap<u32, u64>)>,
    /// The machine's busy and total ticks (all cores).
    machine: (u64, u64),
}

/// Reads the counters of `roles` (a label each) now.
pub fn sample(roles: &[(&str, Role)]) -> Sample {
    let named = processes_by_name();
    let ticks = roles
        .iter()
        .map(|(label, role)| {
            let pids: Vec<u32> = match role {
                Role::Pid(pid) => vec![*pid],
                Role::Named(name) => named
                    .iter()
                    .filter(|(_, comm)| comm == name)
                    .map(|(pid, _)| *pid)
                    .collect(),
            };
            let ticks = pids
                .into_iter()
                .filter_map(|pid| process_ticks(pid).map(|t| (pid, t)))
                .collect();
            ((*label).to_owned(), ticks)
        })
        .collect();
    Sample {
        at: Instant::now(),
        ticks,
        machine: machine_ticks().unwrap_or_default(),
    }
}

/// What each role spent between two samples of the same roles.
#[derive(Debug, Clone, PartialEq)]
pub struct Shares {
    /// Per role, in the order given: percent of one core (200 is both of
    /// two cores).
    pub roles: Vec<(String, f64)>,
    /// Percent of the machine (all cores) busy.
    pub machine_busy: f64,
}

impl Sample {
    /// The shares of one core each role used from `self` to `later`.
    pub fn shares_until(&self, later: &Sample) -> Shares {
        let seconds = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let per_second = clock_ticks_per_second() as f64;
        let roles = later
            .ticks
            .iter()
            .map(|(label, now)| {
                let before = self.ticks.iter().find(|(l, _)| l == label).map(|(_, t)| t);
                let spent: u64 = now
                    .iter()
                    .map(|(pid, t)| {
                        t.saturating_sub(before.and_then(|b| b.get(pid)).copied().unwrap_or(0))
                    })
                    .sum();
                (label.clone(), 100.0 * spent as f64 / per_second / seconds)
            })
            .collect();
        let busy = later.machine.0.saturating_sub(self.machine.0) as f64;
        let total = later.machine.1.saturating_sub(self.machine.1) as f64;
        Shares {
            roles,
            machine_busy: if total > 0.0 {
                100.0 * busy / total
            } else {
                0.0
            },
        }
    }
}

impl std::fmt::Display for Shares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (label, share)) in self.roles.iter().enumerate() {
            let separator = if i == 0 { "" } else { ", " };
            write!(f, "{separator}{label} {share:.0}")?;
        }
        write!(
            f,
            " (% of one core); machine busy {:.0} %",
            self.machine_busy
        )
    }
}

/// Every process's id and command name.
fn processes_by_name() -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            Some((pid, comm.trim_end().to_owned()))
        })
        .collect()
}

/// A process's user and system ticks, its threads' included.
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: fields are counted
    // after its closing parenthesis (field 3 is the state; 14 and 15 are
    // utime and stime).
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The machine's busy and total ticks over all cores (`/proc/stat`).
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already
    // in user and nice).
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks_per_second() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A busy loop of this process shows in its own share, and in no other
    /// role's.
    #[test]
    fn a_busy_process_shows_its_cpu_time() {
        let roles = [
            ("this", Role::Pid(std::process::id())),
            ("none", Role::Named("no-such-process-name")),
        ];
        let before = sample(&roles);
        let until = Instant::now() + std::time::Duration::from_millis(300);
        let mut x = 0u64;
        while Instant::now() < until {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let shares = before.shares_until(&sample(&roles));
        assert_eq!(shares.roles[1], ("none".to_owned(), 0.0));
        assert!(
            shares.roles[0].1 > 50.0,
            "a busy loop used {:.0} % of a core",
            shares.roles[0].1
        );
        assert!(shares.machine_busy > 0.0);
    }
}
