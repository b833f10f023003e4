"""The Python `influxdb` client (InfluxDB 1.x) against Stonelion's /query and /write.

Started by tests/influxql_python_client.rs, which starts a Stonelion server on loopback,
writes two hours of readings for six devices, and passes the address in STONELION_HOST
and STONELION_PORT and an admin API token in STONELION_TOKEN. The client sends the token
as its password, in the `p` query parameter as InfluxDB 1.x clients do.
"""

import os
import time

import pytest
from influxdb import InfluxDBClient
from influxdb.exceptions import InfluxDBClientError


@pytest.fixture(scope="module")
def client():
    host = os.environ["STONELION_HOST"]
    port = int(os.environ["STONELION_PORT"])
    token = os.environ["STONELION_TOKEN"]
    client = InfluxDBClient(
        host=host, port=port, username="python-client", password=token, database="stonelion", timeout=10
    )
    yield client
    client.close()


def test_ping_reports_version(client):
    assert client.ping().startswith("1.8")


def test_list_databases(client):
    assert client.get_list_database() == [{"name": "stonelion"}]


def test_list_measurements(client):
    names = [m["name"] for m in client.get_list_measurements()]
    assert "gas-detector" in names
    assert "alarm_events" in names


def test_tag_values_with_key(client):
    result = client.query('SHOW TAG VALUES FROM "gas-detector" WITH KEY = "site"')
    values = sorted(row["value"] for row in result.get_points())
    assert values == ["park-b", "plant-a"]


def test_field_keys_types(client):
    result = client.query('SHOW FIELD KEYS FROM "smoke-detector"')
    assert list(result.get_points()) == [{"fieldKey": "smoke", "fieldType": "boolean"}]


def test_grouped_aggregate_by_tag(client):
    result = client.query(
        'SELECT max("gas_lel") FROM "gas-detector" WHERE time > now() - 3h GROUP BY "device"'
    )
    devices = sorted(tags["device"] for (_, tags) in result.keys())
    assert devices == ["gas-01", "gas-02", "gas-03"]
    for point in result.get_points(tags={"device": "gas-01"}):
        assert 10 <= point["max"] <= 40


def test_write_then_query_round_trip(client):
    now_ms = int(time.time() * 1000) - 5_000
    points = [
        {
            "measurement": "lab_probe",
            "tags": {"site": "lab", "device": "probe-9", "site_kind": "enterprise"},
            "time": now_ms - step * 1_000,
            "fields": {"temperature_c": 20.0 + step},
        }
        for step in range(3)
    ]
    assert client.write_points(points, time_precision="ms")
    result = client.query(
        'SELECT "temperature_c" FROM "lab_probe" '
        "WHERE \"device\" = 'probe-9' ORDER BY time DESC",
        epoch="ms",
    )
    rows = list(result.get_points())
    assert [row["temperature_c"] for row in rows] == [20, 21, 22]
    assert [row["time"] for row in rows] == [now_ms, now_ms - 1_000, now_ms - 2_000]


def test_default_time_is_rfc3339(client):
    result = client.query(
        'SELECT last("gas_lel") FROM "gas-detector" WHERE "device" = \'gas-01\''
    )
    rows = list(result.get_points())
    assert len(rows) == 1
    assert rows[0]["time"].endswith("Z")


def test_multiple_statements(client):
    results = client.query("SHOW DATABASES; SHOW RETENTION POLICIES")
    assert len(results) == 2
    assert list(results[1].get_points())[0]["name"] == "autogen"


def test_parse_error_raises(client):
    with pytest.raises(InfluxDBClientError) as error:
        client.query("SELECT FROM nothing")
    assert "error parsing query" in str(error.value)


def test_wrong_token_rejected():
    host = os.environ["STONELION_HOST"]
    port = int(os.environ["STONELION_PORT"])
    intruder = InfluxDBClient(host=host, port=port, username="x", password="wrong", database="stonelion")
    with pytest.raises(InfluxDBClientError) as error:
        intruder.query("SHOW MEASUREMENTS")
    assert error.value.code == 401
