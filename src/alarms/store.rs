//! Alarm persistence in the state database (`state.sqlite` in the data directory).
//!
//! A transition, the alarm row it changes and the webhook deliveries it queues are written
//! in one transaction, so after a crash either all of them are on disk or none is.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{Alarm, AlarmEvent, AlarmId, AlarmKind, AlarmState, EventKind, Signoff, Transition};
use crate::model::{DeviceId, MetricName, RuleId, SiteId, Timestamp};
use crate::notify::{self, Webhook};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS alarms (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    rule        TEXT NOT NULL,
    kind        TEXT NOT NULL,
    site        TEXT NOT NULL,
    device      TEXT NOT NULL,
    metric      TEXT,
    unit        TEXT,
    level       INTEGER NOT NULL,
    state       TEXT NOT NULL,
    ack_by      TEXT,
    ack_at      INTEGER,
    ack_note    TEXT,
    closed_by   TEXT,
    closed_at   INTEGER,
    closed_note TEXT,
    value       REAL,
    threshold   REAL,
    raised_at   INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    cleared_at  INTEGER,
    description TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alarms_open ON alarms (state, device, rule);
CREATE TABLE IF NOT EXISTS alarm_transitions (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    alarm_id INTEGER NOT NULL REFERENCES alarms (id),
    event    TEXT NOT NULL,
    at       INTEGER NOT NULL,
    actor    TEXT NOT NULL,
    level    INTEGER NOT NULL,
    value    REAL,
    note     TEXT
);
CREATE INDEX IF NOT EXISTS alarm_transitions_by_alarm ON alarm_transitions (alarm_id, seq);
";

/// Opens the state database with the settings every connection to it uses.
pub fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;",
    )?;
    Ok(conn)
}

/// Filters for listing alarms; unset filters match everything.
#[derive(Clone, Debug, Default)]
pub struct AlarmFilter {
    pub state: Option<AlarmState>,
    pub site: Option<SiteId>,
    pub device: Option<DeviceId>,
    /// Most alarms returned, newest first.
    pub limit: usize,
}

/// The writing side, owned by the alarm manager.
pub struct AlarmStore {
    conn: Connection,
    webhooks: Vec<Webhook>,
}

impl AlarmStore {
    /// Opens the state database, creating the alarm and outbox tables.
    pub fn open(path: &Path, webhooks: Vec<Webhook>) -> rusqlite::Result<AlarmStore> {
        let conn = open_connection(path)?;
        conn.execute_batch(SCHEMA)?;
        notify::init_schema(&conn)?;
        Ok(AlarmStore { conn, webhooks })
    }

    /// Replaces the webhooks that later transitions are queued for.
    pub fn set_webhooks(&mut self, webhooks: Vec<Webhook>) {
        self.webhooks = webhooks;
    }

    /// Returns every alarm that is not closed, with its history.
    pub fn open_alarms(&self) -> rusqlite::Result<Vec<Alarm>> {
        let mut statement = self.conn.prepare(&format!(
            "{SELECT_ALARM} WHERE state != 'closed' ORDER BY id"
        ))?;
        let alarms: Vec<Alarm> = statement
            .query_map([], alarm_from_row)?
            .collect::<Result<_, _>>()?;
        alarms
            .into_iter()
            .map(|a| with_history(&self.conn, a))
            .collect()
    }

    /// Stores a new alarm and its first transition, queues its webhook deliveries, and
    /// returns the alarm with its assigned id.
    pub fn insert(
        &mut self,
        mut alarm: Alarm,
        transition: Transition,
    ) -> rusqlite::Result<(Alarm, AlarmEvent)> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO alarms (rule, kind, site, device, metric, unit, level, state, value, threshold,
                                 raised_at, updated_at, description)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                alarm.rule.as_str(),
                alarm.kind.as_str(),
                alarm.site.as_str(),
                alarm.device.as_str(),
                alarm.metric.as_ref().map(MetricName::as_str),
                alarm.unit,
                alarm.level,
                alarm.state.as_str(),
                alarm.value,
                alarm.threshold,
                alarm.raised_at.0,
                alarm.updated_at.0,
                alarm.description,
            ],
        )?;
        alarm.id = AlarmId(tx.last_insert_rowid());
        let event = record_transition(&tx, &self.webhooks, &mut alarm, transition)?;
        tx.commit()?;
        Ok((alarm, event))
    }

    /// Stores the changed alarm and one new transition, and queues its deliveries.
    pub fn update(
        &mut self,
        alarm: &mut Alarm,
        transition: Transition,
    ) -> rusqlite::Result<AlarmEvent> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "UPDATE alarms SET level = ?2, state = ?3, ack_by = ?4, ack_at = ?5, ack_note = ?6,
                 closed_by = ?7, closed_at = ?8, closed_note = ?9, value = ?10, threshold = ?11,
                 raised_at = ?12, updated_at = ?13, cleared_at = ?14
             WHERE id = ?1",
            params![
                alarm.id.0,
                alarm.level,
                alarm.state.as_str(),
                alarm.acknowledged.as_ref().map(|s| s.by.clone()),
                alarm.acknowledged.as_ref().map(|s| s.at.0),
                alarm.acknowledged.as_ref().and_then(|s| s.note.clone()),
                alarm.closed.as_ref().map(|s| s.by.clone()),
                alarm.closed.as_ref().map(|s| s.at.0),
                alarm.closed.as_ref().and_then(|s| s.note.clone()),
                alarm.value,
                alarm.threshold,
                alarm.raised_at.0,
                alarm.updated_at.0,
                alarm.cleared_at.map(|t| t.0),
            ],
        )?;
        let event = record_transition(&tx, &self.webhooks, alarm, transition)?;
        tx.commit()?;
        Ok(event)
    }
}

/// Appends the transition to the alarm and the database, and queues its webhook event.
fn record_transition(
    tx: &rusqlite::Transaction<'_>,
    webhooks: &[Webhook],
    alarm: &mut Alarm,
    transition: Transition,
) -> rusqlite::Result<AlarmEvent> {
    tx.execute(
        "INSERT INTO alarm_transitions (alarm_id, event, at, actor, level, value, note)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            alarm.id.0,
            transition.event.as_str(),
            transition.at.0,
            transition.actor,
            transition.level,
            transition.value,
            transition.note,
        ],
    )?;
    let kind = transition.event;
    let at = transition.at;
    alarm.history.push(transition);

    let body = serde_json::json!({
        "event": kind.as_str(),
        "occurred_at": at.to_rfc3339(),
        "alarm": alarm.to_json(),
    });
    let event = AlarmEvent {
        kind,
        alarm_id: alarm.id.to_string(),
        body: serde_json::to_vec(&body).expect("a JSON value always serializes"),
    };
    notify::enqueue(tx, webhooks, &event, at)?;
    Ok(event)
}

const SELECT_ALARM: &str = "SELECT id, rule, kind, site, device, metric, unit, level, state,
    ack_by, ack_at, ack_note, closed_by, closed_at, closed_note, value, threshold,
    raised_at, updated_at, cleared_at, description FROM alarms";

fn alarm_from_row(row: &Row<'_>) -> rusqlite::Result<Alarm> {
    let signoff = |by: Option<String>, at: Option<i64>, note: Option<String>| {
        by.zip(at).map(|(by, at)| Signoff {
            by,
            at: Timestamp(at),
            note,
        })
    };
    let kind: String = row.get(2)?;
    let state: String = row.get(8)?;
    Ok(Alarm {
        id: AlarmId(row.get(0)?),
        rule: RuleId::new(row.get::<_, String>(1)?),
        kind: if kind == "offline" {
            AlarmKind::Offline
        } else {
            AlarmKind::Rule
        },
        site: SiteId::new(row.get::<_, String>(3)?),
        device: DeviceId::new(row.get::<_, String>(4)?),
        metric: row.get::<_, Option<String>>(5)?.map(MetricName::new),
        unit: row.get(6)?,
        level: row.get(7)?,
        state: AlarmState::parse(&state).unwrap_or(AlarmState::Active),
        acknowledged: signoff(row.get(9)?, row.get(10)?, row.get(11)?),
        closed: signoff(row.get(12)?, row.get(13)?, row.get(14)?),
        value: row.get(15)?,
        threshold: row.get(16)?,
        raised_at: Timestamp(row.get(17)?),
        updated_at: Timestamp(row.get(18)?),
        cleared_at: row.get::<_, Option<i64>>(19)?.map(Timestamp),
        description: row.get(20)?,
        history: Vec::new(),
    })
}

fn with_history(conn: &Connection, mut alarm: Alarm) -> rusqlite::Result<Alarm> {
    let mut statement = conn.prepare_cached(
        "SELECT event, at, actor, level, value, note FROM alarm_transitions WHERE alarm_id = ?1 ORDER BY seq",
    )?;
    let rows = statement.query_map(params![alarm.id.0], |row| {
        let event: String = row.get(0)?;
        Ok(Transition {
            event: EventKind::parse(&event).unwrap_or(EventKind::Raised),
            at: Timestamp(row.get(1)?),
            actor: row.get(2)?,
            level: row.get(3)?,
            value: row.get(4)?,
            note: row.get(5)?,
        })
    })?;
    alarm.history = rows.collect::<Result<_, _>>()?;
    Ok(alarm)
}

/// Reads one alarm with its history.
pub fn get(conn: &Connection, id: AlarmId) -> rusqlite::Result<Option<Alarm>> {
    let alarm = conn
        .query_row(
            &format!("{SELECT_ALARM} WHERE id = ?1"),
            params![id.0],
            alarm_from_row,
        )
        .optional()?;
    alarm.map(|a| with_history(conn, a)).transpose()
}

/// Lists alarms matching a filter, newest first, each with its history.
pub fn list(conn: &Connection, filter: &AlarmFilter) -> rusqlite::Result<Vec<Alarm>> {
    let sql = format!(
        "{SELECT_ALARM} WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR site = ?2)
         AND (?3 IS NULL OR device = ?3) ORDER BY id DESC LIMIT ?4"
    );
    let mut statement = conn.prepare_cached(&sql)?;
    let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
    let alarms: Vec<Alarm> = statement
        .query_map(
            params![
                filter.state.map(AlarmState::as_str),
                filter.site.as_ref().map(SiteId::as_str),
                filter.device.as_ref().map(DeviceId::as_str),
                limit
            ],
            alarm_from_row,
        )?
        .collect::<Result<_, _>>()?;
    alarms.into_iter().map(|a| with_history(conn, a)).collect()
}

impl AlarmStore {
    /// Reads one alarm through the writing connection.
    pub fn get(&self, id: AlarmId) -> rusqlite::Result<Option<Alarm>> {
        get(&self.conn, id)
    }
}

/// Open alarms of one site, as the site summary counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenAlarmCounts {
    /// Active alarms whose highest level is 1.
    pub active_level1: u64,
    /// Active alarms that reached level 2.
    pub active_level2: u64,
    /// Alarms not closed (active or cleared) that nobody has acknowledged.
    pub unacknowledged: u64,
}

/// Counts the alarms that are not closed, per site. Sites without such alarms are absent.
pub fn open_alarm_counts(conn: &Connection) -> rusqlite::Result<HashMap<SiteId, OpenAlarmCounts>> {
    let mut statement = conn.prepare_cached(
        "SELECT site,
                SUM(state = 'active' AND level = 1),
                SUM(state = 'active' AND level >= 2),
                SUM(ack_at IS NULL)
         FROM alarms WHERE state != 'closed' GROUP BY site",
    )?;
    let rows = statement.query_map([], |row| {
        let counts = OpenAlarmCounts {
            active_level1: row.get(1)?,
            active_level2: row.get(2)?,
            unacknowledged: row.get(3)?,
        };
        Ok((SiteId::new(row.get::<_, String>(0)?), counts))
    })?;
    rows.collect()
}
