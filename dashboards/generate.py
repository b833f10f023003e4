#!/usr/bin/env python3
"""Generate Stonelion's Grafana dashboards as JSON files next to this script.

The dashboards use Grafana's built-in InfluxDB data source in InfluxQL mode, so they
work against Stonelion's own /query endpoint and against InfluxDB 2 through its
InfluxQL compatibility API. One panel differs: "Devices online per site" takes mean()
of the boolean field `online`, which Stonelion reads as 1 and 0 but InfluxDB rejects.
Edit this script, run it, and commit the JSON it writes: `python3 dashboards/generate.py`.
"""

import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent

# Gas thresholds in %LEL: level 1 (warning) and level 2 (alarm).
GAS_WARNING_LEL = 25
GAS_ALARM_LEL = 50

DATASOURCE = {"type": "influxdb", "uid": "${datasource}"}


def datasource_variable():
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "influxdb",
        "current": {"text": "Stonelion", "value": "stonelion"},
        "hide": 0,
    }


def query_variable(name, label, query, multi=True):
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": query,
        "definition": query,
        "refresh": 1,
        "multi": multi,
        "includeAll": multi,
        "sort": 1,
        "current": {},
        "hide": 0,
    }


SITE_VARIABLE = query_variable(
    "site", "Site", 'SHOW TAG VALUES FROM "device_status" WITH KEY = "site"'
)
DEVICE_VARIABLE = query_variable(
    "device",
    "Device",
    'SHOW TAG VALUES FROM "device_status" WITH KEY = "device" WHERE "site" =~ /^$site$/',
)
SINGLE_SITE_VARIABLE = dict(SITE_VARIABLE, multi=False, includeAll=False)
SINGLE_DEVICE_VARIABLE = dict(DEVICE_VARIABLE, multi=False, includeAll=False)


def target(query, ref="A", result_format="time_series", alias=None):
    t = {
        "refId": ref,
        "datasource": DATASOURCE,
        "rawQuery": True,
        "query": query,
        "resultFormat": result_format,
    }
    if alias:
        t["alias"] = alias
    return t


def thresholds(steps):
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in steps]}


GAS_THRESHOLDS = thresholds([("green", None), ("orange", GAS_WARNING_LEL), ("red", GAS_ALARM_LEL)])


class Layout:
    """Places panels left to right on Grafana's 24-column grid."""

    def __init__(self):
        self.x = 0
        self.y = 0
        self.row_height = 0
        self.next_id = 1

    def place(self, panel, width, height):
        if self.x + width > 24:
            self.x = 0
            self.y += self.row_height
            self.row_height = 0
        panel["gridPos"] = {"x": self.x, "y": self.y, "w": width, "h": height}
        panel["id"] = self.next_id
        self.next_id += 1
        self.x += width
        self.row_height = max(self.row_height, height)
        return panel


def panel(kind, title, targets, unit=None, threshold_config=None, show_thresholds=False,
          options=None, transformations=None, description=None, min_value=None, max_value=None):
    defaults = {}
    if unit:
        defaults["unit"] = unit
    if threshold_config:
        defaults["thresholds"] = threshold_config
    if show_thresholds:
        defaults["custom"] = {"thresholdsStyle": {"mode": "line+area"}}
    if min_value is not None:
        defaults["min"] = min_value
    if max_value is not None:
        defaults["max"] = max_value
    p = {
        "type": kind,
        "title": title,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options or {},
    }
    if transformations:
        p["transformations"] = transformations
    if description:
        p["description"] = description
    return p


def dashboard(uid, title, description, variables, panels, annotations=()):
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["stonelion"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [datasource_variable(), *variables]},
        "annotations": {"list": list(annotations)},
        "panels": panels,
    }


SITE_FILTER = '"site" =~ /^$site$/'
DEVICE_FILTER = '"site" =~ /^$site$/ AND "device" =~ /^$device$/'


def overview():
    layout = Layout()
    panels = [
        layout.place(panel(
            "bargauge", "Devices online per site (last 5 minutes)",
            [target('SELECT mean("online") FROM "device_status" '
                    f'WHERE {SITE_FILTER} AND time > now() - 5m GROUP BY "site"', alias="$tag_site")],
            unit="percentunit", min_value=0, max_value=1,
            threshold_config=thresholds([("red", None), ("orange", 0.9), ("green", 0.99)]),
            description="Share of device_status samples with online = true per site. "
                        "Needs the device_status measurement. InfluxDB rejects mean() over "
                        "booleans, so this panel stays empty on the InfluxDB 2 backend.",
        ), 12, 8),
        layout.place(panel(
            "table", "Active alarms by level",
            [target('SELECT last("level") AS "level" FROM "alarm_state" '
                    f'WHERE {SITE_FILTER} AND $timeFilter GROUP BY "site", "device", "rule"',
                    result_format="table")],
            threshold_config=thresholds([("green", None), ("orange", 1), ("red", 2)]),
            transformations=[
                {"id": "filterByValue", "options": {
                    "type": "include", "match": "any",
                    "filters": [{"fieldName": "level", "config": {
                        "id": "greaterOrEqual", "options": {"value": 1}}}]}},
                {"id": "groupBy", "options": {"fields": {
                    "level": {"operation": "groupby", "aggregations": []},
                    "device": {"operation": "aggregate", "aggregations": ["count"]}}}},
            ],
            description="Alarms whose last state in the time range is level 1 or 2, counted "
                        "per level. Needs the alarm_state measurement.",
        ), 12, 8),
        layout.place(panel(
            "table", "Latest gas readings",
            [target('SELECT last("gas_lel") AS "gas_lel" FROM "gas-detector" '
                    f'WHERE {SITE_FILTER} AND $timeFilter GROUP BY "site", "device"',
                    result_format="table")],
            unit="percent", threshold_config=GAS_THRESHOLDS,
            options={"cellHeight": "sm"},
        ), 12, 10),
        layout.place(panel(
            "timeseries", "Gas concentration, maximum per site",
            [target('SELECT max("gas_lel") FROM "gas-detector" '
                    f'WHERE {SITE_FILTER} AND $timeFilter GROUP BY time($__interval), "site" fill(null)',
                    alias="$tag_site")],
            unit="percent", threshold_config=GAS_THRESHOLDS, show_thresholds=True,
        ), 12, 10),
        layout.place(panel(
            "timeseries", "Alarm events",
            [target('SELECT count("level") FROM "alarm_events" '
                    f'WHERE {SITE_FILTER} AND $timeFilter GROUP BY time($__interval), "event" fill(0)',
                    alias="$tag_event")],
            options={"legend": {"displayMode": "table", "placement": "right"}},
        ), 24, 8),
    ]
    return dashboard(
        "stonelion-overview", "Stonelion overview",
        "Online rate, active alarms and gas readings across sites.",
        [SITE_VARIABLE], panels, [alarm_annotation(SITE_FILTER)],
    )


def site_view():
    layout = Layout()
    by_device = 'GROUP BY time($__interval), "device" fill(null)'
    panels = [
        layout.place(panel(
            "timeseries", "Gas concentration",
            [target(f'SELECT mean("gas_lel") FROM "gas-detector" WHERE {SITE_FILTER} AND $timeFilter {by_device}',
                    alias="$tag_device")],
            unit="percent", threshold_config=GAS_THRESHOLDS, show_thresholds=True,
            description=f"Thresholds: level 1 at {GAS_WARNING_LEL} %LEL, level 2 at {GAS_ALARM_LEL} %LEL.",
        ), 24, 9),
        layout.place(panel(
            "state-timeline", "Smoke",
            [target(f'SELECT last("smoke") FROM "smoke-detector" WHERE {SITE_FILTER} AND $timeFilter {by_device}',
                    alias="$tag_device")],
        ), 12, 7),
        layout.place(panel(
            "state-timeline", "Device online",
            [target(f'SELECT last("online") FROM "device_status" WHERE {SITE_FILTER} AND $timeFilter {by_device}',
                    alias="$tag_device")],
        ), 12, 7),
        layout.place(panel(
            "timeseries", "Power",
            [target(f'SELECT mean("power_kw") FROM "energy-meter" WHERE {SITE_FILTER} AND $timeFilter {by_device}',
                    alias="$tag_device")],
            unit="kwatt",
        ), 12, 8),
        layout.place(panel(
            "timeseries", "Energy per hour",
            [target('SELECT non_negative_derivative(max("energy_kwh"), 1h) FROM "energy-meter" '
                    f'WHERE {SITE_FILTER} AND $timeFilter GROUP BY time(1h), "device" fill(null)',
                    alias="$tag_device")],
            unit="kwatth",
            description="Increase of the energy counter per hour.",
        ), 12, 8),
        layout.place(panel(
            "timeseries", "Temperature",
            [target(f'SELECT mean("temperature_c") FROM "temperature-sensor" WHERE {SITE_FILTER} AND $timeFilter {by_device}',
                    alias="$tag_device")],
            unit="celsius",
        ), 24, 8),
    ]
    return dashboard(
        "stonelion-site", "Stonelion site",
        "Gas, smoke, energy and temperature per device of one site.",
        [SINGLE_SITE_VARIABLE], panels, [alarm_annotation(SITE_FILTER)],
    )


def device_view():
    layout = Layout()
    interval = "GROUP BY time($__interval) fill(null)"
    panels = [
        layout.place(panel(
            "timeseries", "Gas concentration",
            [target(f'SELECT mean("gas_lel") AS "mean", max("gas_lel") AS "max" FROM "gas-detector" '
                    f'WHERE {DEVICE_FILTER} AND $timeFilter {interval}')],
            unit="percent", threshold_config=GAS_THRESHOLDS, show_thresholds=True,
        ), 12, 8),
        layout.place(panel(
            "timeseries", "Temperature",
            [target(f'SELECT mean("temperature_c") FROM "temperature-sensor" WHERE {DEVICE_FILTER} AND $timeFilter {interval}')],
            unit="celsius",
        ), 12, 8),
        layout.place(panel(
            "timeseries", "Power and energy",
            [target(f'SELECT mean("power_kw") AS "power_kw" FROM "energy-meter" WHERE {DEVICE_FILTER} AND $timeFilter {interval}'),
             target(f'SELECT last("energy_kwh") AS "energy_kwh" FROM "energy-meter" WHERE {DEVICE_FILTER} AND $timeFilter {interval}', ref="B")],
        ), 12, 8),
        layout.place(panel(
            "state-timeline", "Smoke and online",
            [target(f'SELECT last("smoke") AS "smoke" FROM "smoke-detector" WHERE {DEVICE_FILTER} AND $timeFilter {interval}'),
             target(f'SELECT last("online") AS "online" FROM "device_status" WHERE {DEVICE_FILTER} AND $timeFilter {interval}', ref="B")],
        ), 12, 8),
        layout.place(panel(
            "table", "Alarm events of this device",
            [target(f'SELECT "event", "rule", "level", "value" FROM "alarm_events" WHERE {DEVICE_FILTER} AND $timeFilter '
                    'ORDER BY time DESC LIMIT 200', result_format="table")],
        ), 24, 8),
    ]
    return dashboard(
        "stonelion-device", "Stonelion device",
        "Every metric and alarm event of one device.",
        [SINGLE_SITE_VARIABLE, SINGLE_DEVICE_VARIABLE], panels, [alarm_annotation(DEVICE_FILTER)],
    )


def alarm_annotation(condition):
    return {
        "name": "Alarm events",
        "datasource": DATASOURCE,
        "enable": True,
        "iconColor": "red",
        "query": f'SELECT "value", "level", "event", "rule", "device" FROM "alarm_events" WHERE {condition} AND $timeFilter',
        "textColumn": "event",
        "tagsColumn": "device,rule",
    }


def alarm_history():
    layout = Layout()
    panels = [
        layout.place(panel(
            "timeseries", "Events per interval",
            [target('SELECT count("level") FROM "alarm_events" '
                    f'WHERE {SITE_FILTER} AND $timeFilter GROUP BY time($__interval), "event" fill(0)',
                    alias="$tag_event")],
            options={"legend": {"displayMode": "table", "placement": "right"}},
        ), 16, 8),
        layout.place(panel(
            "bargauge", "Level 2 events per site",
            [target('SELECT count("level") FROM "alarm_events" '
                    f'WHERE "level" = 2 AND {SITE_FILTER} AND $timeFilter GROUP BY "site"', alias="$tag_site")],
        ), 8, 8),
        layout.place(panel(
            "table", "Alarm history",
            [target('SELECT "event", "level", "value", "rule", "device", "site" FROM "alarm_events" '
                    f'WHERE {SITE_FILTER} AND "device" =~ /^$device$/ AND $timeFilter ORDER BY time DESC LIMIT 1000',
                    result_format="table")],
        ), 24, 12),
    ]
    return dashboard(
        "stonelion-alarms", "Stonelion alarm history",
        "Alarm lifecycle events drawn as annotations and listed per device.",
        [SITE_VARIABLE, DEVICE_VARIABLE], panels,
        [alarm_annotation('"site" =~ /^$site$/ AND "device" =~ /^$device$/')],
    )


def main():
    outputs = {
        "overview.json": overview(),
        "site.json": site_view(),
        "device.json": device_view(),
        "alarm-history.json": alarm_history(),
    }
    for name, content in outputs.items():
        (HERE / name).write_text(json.dumps(content, indent=2) + "\n")


if __name__ == "__main__":
    main()
