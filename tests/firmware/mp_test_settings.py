# Settings: defaults filled in, and each problem named by its field.
import json

import settings
from fakes import assert_raises

SCHEMA = settings.load_protocol()["settings"]
GOOD = {"wifi_ssid": "home", "mqtt_host": "10.0.0.2"}


def write(obj):
    with open("settings.json", "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))


def problem(obj):
    write(obj)
    return assert_raises(settings.SettingsError, settings.load, SCHEMA).args[0]


def test_minimal_settings_get_documented_defaults():
    write(GOOD)
    s = settings.load(SCHEMA)
    assert s["mqtt_port"] == 1883 and s["keepalive_s"] == 30
    assert s["telemetry_interval_ms"] == 10000 and s["device_id"] is None
    assert s["groups"] == []


def test_missing_file_says_how_to_create_it():
    assert "not found" in assert_raises(settings.SettingsError, settings.load, SCHEMA).args[0]


def test_malformed_json_is_named():
    assert problem("{oops") == "settings.json: not valid JSON"


def test_wrong_type_names_the_field_and_value():
    msg = problem(dict(GOOD, mqtt_port="1883"))
    assert msg.startswith("mqtt_port: must be an integer"), msg


def test_out_of_range_names_the_range():
    assert problem(dict(GOOD, keepalive_s=1)) == "keepalive_s: must be from 2 to 3600, got 1"


def test_bool_is_not_an_integer():
    assert problem(dict(GOOD, mqtt_port=True)).startswith("mqtt_port: must be an integer")


def test_missing_required_field():
    assert problem({"wifi_ssid": "x"}) == "mqtt_host: missing (required)"


def test_unknown_field_is_rejected():
    assert problem(dict(GOOD, colour="red")).startswith("colour: unknown setting")


def test_device_id_pattern():
    assert problem(dict(GOOD, device_id="has space")).startswith("device_id: must match")
    assert problem(dict(GOOD, device_id="x" * 33)).startswith("device_id: must match")
    write(dict(GOOD, device_id="Board_7-a"))
    assert settings.load(SCHEMA)["device_id"] == "Board_7-a"


def test_groups_must_be_names():
    assert problem(dict(GOOD, groups=["ok", "not ok"])).startswith("groups: entries must match")


def test_backoff_bounds_must_be_ordered():
    assert problem(dict(GOOD, reconnect_min_ms=5000, reconnect_max_ms=1000)).startswith("reconnect_min_ms")


def test_top_level_must_be_an_object():
    assert problem("[1, 2]") == "settings.json must hold a JSON object"
