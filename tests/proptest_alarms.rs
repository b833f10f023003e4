//! Property test of the alarm state machine: random sequences of readings, liveness
//! changes, operator actions and restarts, applied to `AlarmManager` over a real SQLite
//! state database.
//!
//! Two managers get the same commands, each with its own database: one is restarted
//! (store reopened, new manager) at random points, the other never is. After every command
//! the test checks that
//! - no two open (not closed) alarms share a device and rule;
//! - stored histories only grow, and each alarm's history walks allowed edges only;
//! - an operator action succeeds exactly when the alarm's state allows it, and adds one
//!   transition, while a rejected action adds none;
//! - the stored transitions, the queued webhook deliveries and the manager's transition
//!   counter agree, so every transition was stored;
//! - the restarted manager's alarms equal the other one's, so a restart restores the
//!   open alarms and the rule levels behind them.

#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use proptest::prelude::*;
use stonelion::alarms::manager::{AlarmCommand, AlarmManager};
use stonelion::alarms::store::{self as alarm_store, AlarmFilter, AlarmStore};
use stonelion::alarms::{Alarm, AlarmId, AlarmKind, AlarmState, EventKind};
use stonelion::clock::{Clock, ManualClock};
use stonelion::config::Config;
use stonelion::config::builtin::builtin_profiles;
use stonelion::metrics::SharedRegistry;
use stonelion::model::{DeviceId, MetricName, Reading, SiteId, Source, Timestamp, Value};
use stonelion::notify::DispatcherHandle;

const CONFIG: &str = r#"
[[sites]]
id = "plant-a"
name = "Plant A"
kind = "enterprise"

[[sites]]
id = "park-b3"
name = "Building B3"
kind = "park_building"

[[devices]]
id = "gas-01"
site = "plant-a"
profile = "gas-detector"

[[devices]]
id = "gas-02"
site = "plant-a"
profile = "gas-detector"

[[devices]]
id = "smoke-01"
site = "park-b3"
profile = "smoke-detector"

[[webhooks]]
name = "assistant"
url = "http://127.0.0.1:9/hook"
secret = "test-secret"
"#;

/// (device, site, metric) of the configured devices.
const DEVICES: [(&str, &str, &str); 3] =
    [("gas-01", "plant-a", "gas_lel"), ("gas-02", "plant-a", "gas_lel"), ("smoke-01", "park-b3", "smoke")];

/// Gas levels around the gas-detector profile's thresholds (25 and 50 %LEL, deadband 2).
const GAS_LEVELS: [f64; 10] = [0.0, 22.0, 24.0, 25.0, 26.0, 48.5, 49.0, 50.0, 51.0, 70.0];

#[derive(Clone, Debug)]
enum Op {
    Reading { device: usize, level: usize, after_ms: u16 },
    Liveness { device: usize, online: bool },
    Acknowledge { pick: usize },
    Close { pick: usize },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..DEVICES.len(), 0..GAS_LEVELS.len(), 1u16..5_000)
            .prop_map(|(device, level, after_ms)| Op::Reading { device, level, after_ms }),
        2 => (0..DEVICES.len(), any::<bool>()).prop_map(|(device, online)| Op::Liveness { device, online }),
        3 => any::<usize>().prop_map(|pick| Op::Acknowledge { pick }),
        3 => any::<usize>().prop_map(|pick| Op::Close { pick }),
        1 => Just(Op::Restart),
    ]
}

/// One manager over its own state database.
struct Instance {
    _dir: tempfile::TempDir,
    path: PathBuf,
    config: Config,
    clock: ManualClock,
    registry: SharedRegistry,
    manager: AlarmManager,
}

impl Instance {
    fn start(clock: &ManualClock) -> Instance {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let config = stonelion::config::parse(CONFIG, builtin_profiles()).unwrap();
        let registry = SharedRegistry::new();
        let manager = new_manager(&config, &path, clock, &registry);
        Instance { _dir: dir, path, config, clock: clock.clone(), registry, manager }
    }

    /// Drops the manager and its store connection, then opens both again.
    fn restart(&mut self) {
        let before = self.open_alarms();
        self.registry = SharedRegistry::new();
        self.manager = new_manager(&self.config, &self.path, &self.clock, &self.registry);
        assert_eq!(self.open_alarms(), before, "open alarms changed across a restart");
    }

    fn alarms(&self) -> Vec<Alarm> {
        let conn = alarm_store::open_connection(&self.path).unwrap();
        let mut alarms = alarm_store::list(&conn, &AlarmFilter { limit: 100_000, ..AlarmFilter::default() }).unwrap();
        alarms.sort_by_key(|a| a.id);
        alarms
    }

    fn open_alarms(&self) -> Vec<Alarm> {
        AlarmStore::open(&self.path, self.config.webhooks.clone()).unwrap().open_alarms().unwrap()
    }

    fn queued_deliveries(&self) -> usize {
        let conn = alarm_store::open_connection(&self.path).unwrap();
        let count: i64 = conn.query_row("SELECT count(*) FROM webhook_outbox", [], |row| row.get(0)).unwrap();
        usize::try_from(count).unwrap()
    }

    /// The sum of the manager's `alarm_transitions` counter since it started.
    fn counted_transitions(&self) -> usize {
        self.registry
            .encode()
            .lines()
            .filter(|line| line.contains("alarm_transitions_total{"))
            .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as usize)
            .sum()
    }

    /// Applies one command; returns the outcome of an operator action.
    fn apply(&mut self, op: &Op, ids: &[AlarmId]) -> Option<(AlarmId, bool)> {
        let pick = |pick: usize| ids.get(pick % (ids.len() + 1)).copied().unwrap_or(AlarmId(999_999));
        match *op {
            Op::Reading { device, level, after_ms } => {
                self.clock.advance_millis(i64::from(after_ms));
                let (device, site, metric) = DEVICES[device];
                let value = if metric == "smoke" { Value::Bool(level % 2 == 1) } else { Value::Number(GAS_LEVELS[level]) };
                let reading = Reading {
                    site: SiteId::from(site),
                    device: DeviceId::from(device),
                    metric: MetricName::from(metric),
                    ts: self.clock.now(),
                    value,
                    source: Source::Mqtt,
                };
                self.manager.handle(AlarmCommand::Readings(vec![reading]));
                None
            }
            Op::Liveness { device, online } => {
                self.clock.advance_millis(1);
                let device = DeviceId::from(DEVICES[device].0);
                let cause = if online { "reading received" } else { "no reading within stale_after" };
                let command = AlarmCommand::Liveness { device, online, at: self.clock.now(), cause: cause.to_owned() };
                self.manager.handle(command);
                None
            }
            Op::Acknowledge { pick: n } => {
                let id = pick(n);
                let (reply, mut outcome) = tokio::sync::oneshot::channel();
                let by = "operator-1".to_owned();
                self.manager.handle(AlarmCommand::Acknowledge { id, by, note: Some("seen".to_owned()), reply });
                Some((id, outcome.try_recv().unwrap().is_ok()))
            }
            Op::Close { pick: n } => {
                let id = pick(n);
                let (reply, mut outcome) = tokio::sync::oneshot::channel();
                let by = "operator-1".to_owned();
                self.manager.handle(AlarmCommand::Close { id, by, note: Some("fixed".to_owned()), reply });
                Some((id, outcome.try_recv().unwrap().is_ok()))
            }
            Op::Restart => {
                self.restart();
                None
            }
        }
    }
}

fn new_manager(config: &Config, path: &std::path::Path, clock: &ManualClock, registry: &SharedRegistry) -> AlarmManager {
    let store = AlarmStore::open(path, config.webhooks.clone()).unwrap();
    let clock: Arc<dyn Clock> = Arc::new(clock.clone());
    AlarmManager::new(config, store, clock, DispatcherHandle::default(), None, registry).unwrap()
}

/// Walks a history and returns the state it ends in, failing on a disallowed edge.
fn walk(alarm: &Alarm) -> Result<AlarmState, String> {
    let mut state: Option<AlarmState> = None;
    let mut level = 0u8;
    let mut acknowledged = false;
    for (step, t) in alarm.history.iter().enumerate() {
        let rule_event = matches!(t.event, EventKind::Raised | EventKind::Escalated | EventKind::Cleared);
        let offline_event = matches!(t.event, EventKind::DeviceOffline | EventKind::DeviceOnline);
        if (alarm.kind == AlarmKind::Rule && offline_event) || (alarm.kind == AlarmKind::Offline && rule_event) {
            return Err(format!("step {step}: {:?} on a {:?} alarm", t.event, alarm.kind));
        }
        let next = match (state, t.event) {
            (None | Some(AlarmState::Cleared), EventKind::Raised | EventKind::DeviceOffline) => {
                acknowledged = false;
                AlarmState::Active
            }
            (Some(AlarmState::Active), EventKind::Escalated) if t.level > level => AlarmState::Active,
            (Some(AlarmState::Active), EventKind::Cleared | EventKind::DeviceOnline) => AlarmState::Cleared,
            (Some(s @ (AlarmState::Active | AlarmState::Cleared)), EventKind::Acknowledged) if !acknowledged => {
                acknowledged = true;
                s
            }
            (Some(AlarmState::Cleared), EventKind::Closed) => AlarmState::Closed,
            (from, event) => return Err(format!("step {step}: {event:?} from {from:?} at level {level} is not allowed")),
        };
        level = t.level;
        state = Some(next);
    }
    state.ok_or_else(|| "the alarm has no history".to_owned())
}

/// Checks one instance's alarms after a command, given its alarms before it.
fn check_step(before: &[Alarm], after: &[Alarm], op: &Op, outcome: Option<(AlarmId, bool)>) {
    let mut open = HashSet::new();
    for alarm in after.iter().filter(|a| a.state != AlarmState::Closed) {
        assert!(open.insert((alarm.device.clone(), alarm.rule.clone())), "two open alarms for {} {}", alarm.device, alarm.rule);
    }
    for alarm in after {
        assert_eq!(walk(alarm), Ok(alarm.state), "alarm {} history {:?}", alarm.id, alarm.history);
    }

    let old: HashMap<AlarmId, &Alarm> = before.iter().map(|a| (a.id, a)).collect();
    for alarm in before {
        assert!(after.iter().any(|a| a.id == alarm.id), "alarm {} disappeared after {op:?}", alarm.id);
    }
    let mut added = 0;
    for alarm in after {
        let previous = old.get(&alarm.id).map_or(&[][..], |a| a.history.as_slice());
        assert!(alarm.history.starts_with(previous), "alarm {} history was rewritten by {op:?}", alarm.id);
        added += alarm.history.len() - previous.len();
    }

    let Some((id, succeeded)) = outcome else { return };
    let target = old.get(&id);
    let allowed = match op {
        Op::Acknowledge { .. } => target.is_some_and(|a| a.state != AlarmState::Closed && a.acknowledged.is_none()),
        _ => target.is_some_and(|a| a.state == AlarmState::Cleared),
    };
    assert_eq!(succeeded, allowed, "{op:?} on alarm {id} in state {:?}", target.map(|a| a.state));
    assert_eq!(added, usize::from(succeeded), "{op:?} on alarm {id} added {added} transitions");
}

fn run(ops: &[Op]) {
    let start = Timestamp(1_767_225_600_000);
    let restarted_clock = ManualClock::new(start);
    let steady_clock = ManualClock::new(start);
    let mut restarted = Instance::start(&restarted_clock);
    let mut steady = Instance::start(&steady_clock);
    let mut before = Vec::new();

    for op in ops {
        let ids: Vec<AlarmId> = before.iter().map(|a: &Alarm| a.id).collect();
        let outcome = restarted.apply(op, &ids);
        if !matches!(op, Op::Restart) {
            assert_eq!(steady.apply(op, &ids), outcome, "the managers answered {op:?} differently");
        }
        let after = restarted.alarms();
        check_step(&before, &after, op, outcome);
        assert_eq!(after, steady.alarms(), "the restarted manager's alarms differ after {op:?}");

        let stored: usize = after.iter().map(|a| a.history.len()).sum();
        assert_eq!(steady.queued_deliveries(), stored, "one queued delivery per stored transition");
        assert_eq!(steady.counted_transitions(), stored, "one stored transition per counted transition");
        before = after;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn alarm_state_machine(ops in prop::collection::vec(op(), 1..60)) {
        run(&ops);
    }
}

#[test]
fn alarm_state_machine_full_lifecycle() {
    // Raise, escalate, acknowledge, clear, close; then offline, restart, online, close.
    let ops = [
        Op::Reading { device: 0, level: 4, after_ms: 1_000 },
        Op::Reading { device: 0, level: 8, after_ms: 1_000 },
        Op::Acknowledge { pick: 0 },
        Op::Reading { device: 0, level: 0, after_ms: 1_000 },
        Op::Close { pick: 0 },
        Op::Liveness { device: 2, online: false },
        Op::Restart,
        Op::Liveness { device: 2, online: true },
        Op::Close { pick: 1 },
    ];
    run(&ops);
}
