#!/usr/bin/env python3
"""Generate Stonelion's Grafana dashboards as JSON files next to this script.

The dashboards use Grafana's built-in InfluxDB data source in InfluxQL mode, so they
work against Stonelion's own /query endpoint and against InfluxDB 2 through its
InfluxQL compatibility API. Device panels select a field from every measurement
(`FROM /.*/`), because each device profile is its own measurement: a gas panel shows
`gas_lel` of the MQTT gas detectors and of Modbus gas controllers alike.
Edit this script, run it, and commit the JSON it writes: `python3 dashboards/generate.py`.
"""

import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent

# Gas thresholds in %LEL: level 1 (warning) and level 2 (alarm).
GAS_WARNING_LEL = 25
GAS_ALARM_LEL = 50

DATASOURCE = {"type": "influxdb", "uid": "${datasource}"}

# Every measurement: panels pick readings by field name, whatever profile wrote them.
ALL_MEASUREMENTS = "/.*/"

# Energy counters by field name: `energy_kwh` (energy-meter) and `energy_import_kwh`
# (chint-dtsu666, eastron-sdm630).
ENERGY_FIELDS = ("energy_kwh", "energy_import_kwh")


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


# site_summary has every configured site, also one whose devices never reported.
SITE_VARIABLE = query_variable(
    "site", "Site", 'SHOW TAG VALUES FROM "site_summary" WITH KEY = "site"'
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


def count_override(field, color):
    """Colors a table column's cell when its count is 1 or more."""
    return {
        "matcher": {"id": "byName", "options": field},
        "properties": [
            {"id": "thresholds", "value": thresholds([("green", None), (color, 1)])},
            {"id": "custom.cellOptions", "value": {"type": "color-background"}},
        ],
    }


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
          options=None, transformations=None, description=None, min_value=None, max_value=None,
          overrides=()):
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
        "fieldConfig": {"defaults": defaults, "overrides": list(overrides)},
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
    summary_note = ("Read from site_summary, which the server writes every summary_interval "
                    "(10 s by default) with the state at that moment, so the panel shows "
                    "the latest summary in the time range.")
    panels = [
        layout.place(panel(
            "bargauge", "Devices online per site",
            [target('SELECT last("devices_online_ratio") FROM "site_summary" '
                    f'WHERE {SITE_FILTER} AND $timeFilter GROUP BY "site"', alias="$tag_site")],
            unit="percentunit", min_value=0, max_value=1,
            threshold_config=thresholds([("red", None), ("orange", 0.9), ("green", 0.99)]),
            description="Share of the site's configured devices that are online "
                        "(devices_online / devices_total). A device that has not reported "
                        "since the server started counts as not online. " + summary_note,
        ), 12, 8),
        layout.place(panel(
            "table", "Active alarms by level",
            [target('SELECT last("alarms_active_level2") AS "level 2", '
                    'last("alarms_active_level1") AS "level 1", '
                    'last("alarms_unacknowledged") AS "unacknowledged" FROM "site_summary" '
                    f'WHERE {SITE_FILTER} AND $timeFilter GROUP BY "site"',
                    result_format="table")],
            overrides=[
                count_override("level 2", "red"),
                count_override("level 1", "orange"),
                count_override("unacknowledged", "orange"),
            ],
            transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True}}}],
            description="Active alarms per site and highest level reached, and open alarms "
                        "(active or cleared) that nobody acknowledged. An alarm raised before "
                        "the time range and still active is counted. " + summary_note,
        ), 12, 8),
        layout.place(panel(
            "table", "Latest gas readings",
            [target(f'SELECT last("gas_lel") AS "gas_lel" FROM {ALL_MEASUREMENTS} '
                    f'WHERE {SITE_FILTER} AND $timeFilter GROUP BY "site", "device"',
                    result_format="table")],
            unit="percent", threshold_config=GAS_THRESHOLDS,
            options={"cellHeight": "sm"},
            description="Field gas_lel (%LEL) of every device profile that has it.",
        ), 12, 10),
        layout.place(panel(
            "timeseries", "Gas concentration, maximum per site",
            [target(f'SELECT max("gas_lel") FROM {ALL_MEASUREMENTS} '
                    f'WHERE {SITE_FILTER} AND $timeFilter GROUP BY time($__interval), "site" fill(null)',
                    alias="$tag_site $measurement")],
            unit="percent", threshold_config=GAS_THRESHOLDS, show_thresholds=True,
            description="InfluxQL aggregates each measurement on its own, so a site with gas "
                        "detectors of two profiles has one line per profile.",
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
            [target(f'SELECT mean("gas_lel") FROM {ALL_MEASUREMENTS} WHERE {SITE_FILTER} AND $timeFilter {by_device}',
                    alias="$tag_device")],
            unit="percent", threshold_config=GAS_THRESHOLDS, show_thresholds=True,
            description=f"Thresholds: level 1 at {GAS_WARNING_LEL} %LEL, level 2 at {GAS_ALARM_LEL} %LEL.",
        ), 24, 9),
        layout.place(panel(
            "state-timeline", "Smoke",
            [target(f'SELECT last("smoke") FROM {ALL_MEASUREMENTS} WHERE {SITE_FILTER} AND $timeFilter {by_device}',
                    alias="$tag_device")],
        ), 12, 7),
        layout.place(panel(
            "state-timeline", "Device online",
            [target(f'SELECT last("online") FROM "device_status" WHERE {SITE_FILTER} AND $timeFilter {by_device}',
                    alias="$tag_device")],
        ), 12, 7),
        layout.place(panel(
            "timeseries", "Power",
            [target(f'SELECT mean("power_kw") FROM {ALL_MEASUREMENTS} WHERE {SITE_FILTER} AND $timeFilter {by_device}',
                    alias="$tag_device")],
            unit="kwatt",
        ), 12, 8),
        layout.place(panel(
            "timeseries", "Energy per hour",
            [target(f'SELECT non_negative_derivative(max("{field}"), 1h) FROM {ALL_MEASUREMENTS} '
                    f'WHERE {SITE_FILTER} AND $timeFilter GROUP BY time(1h), "device" fill(null)',
                    ref=ref, alias="$tag_device")
             for ref, field in zip("AB", ENERGY_FIELDS)],
            unit="kwatth",
            description="Increase of the energy counter per hour: energy_kwh or "
                        "energy_import_kwh, whichever the device's profile has. "
                        "Needs readings in two hours.",
        ), 12, 8),
        layout.place(panel(
            "timeseries", "Temperature",
            [target(f'SELECT mean("temperature_c") FROM {ALL_MEASUREMENTS} WHERE {SITE_FILTER} AND $timeFilter {by_device}',
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
            [target(f'SELECT mean("gas_lel") AS "mean", max("gas_lel") AS "max" FROM {ALL_MEASUREMENTS} '
                    f'WHERE {DEVICE_FILTER} AND $timeFilter {interval}')],
            unit="percent", threshold_config=GAS_THRESHOLDS, show_thresholds=True,
        ), 12, 8),
        layout.place(panel(
            "timeseries", "Temperature",
            [target(f'SELECT mean("temperature_c") FROM {ALL_MEASUREMENTS} WHERE {DEVICE_FILTER} AND $timeFilter {interval}')],
            unit="celsius",
        ), 12, 8),
        layout.place(panel(
            "timeseries", "Power and energy",
            [target(f'SELECT mean("power_kw") AS "power_kw" FROM {ALL_MEASUREMENTS} WHERE {DEVICE_FILTER} AND $timeFilter {interval}'),
             *[target(f'SELECT last("{field}") AS "{field}" FROM {ALL_MEASUREMENTS} '
                      f'WHERE {DEVICE_FILTER} AND $timeFilter {interval}', ref=ref)
               for ref, field in zip("BC", ENERGY_FIELDS)]],
        ), 12, 8),
        layout.place(panel(
            "state-timeline", "Smoke and online",
            [target(f'SELECT last("smoke") AS "smoke" FROM {ALL_MEASUREMENTS} WHERE {DEVICE_FILTER} AND $timeFilter {interval}'),
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
