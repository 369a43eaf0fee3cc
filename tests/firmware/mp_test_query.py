# The board's side of live queries: evaluating the compact filter form.
from fakes import assert_raises
from query import MAX_DEPTH, BadFilter, evaluate

INFO = {"id": "sim-001", "board": "pico_w", "temp_c": 41.5, "rssi": -70, "groups": ["kitchen", "north"], "backlog": 0}


def test_comparisons_and_logic():
    assert evaluate(["and", ["==", "board", "pico_w"], [">", "temp_c", 40]], INFO)
    assert not evaluate(["and", ["==", "board", "pico_w"], [">", "temp_c", 45]], INFO)
    assert evaluate(["or", ["<", "rssi", -80], ["<=", "backlog", 0]], INFO)
    assert evaluate(["not", ["!=", "id", "sim-001"]], INFO)
    assert evaluate([">=", "temp_c", 41.5], INFO)


def test_in_lists_and_groups():
    assert evaluate(["in", "id", ["sim-001", "sim-002"]], INFO)
    assert evaluate(["in", "groups", ["south", "north"]], INFO)
    assert not evaluate(["in", "groups", ["south"]], INFO)


def test_a_missing_field_or_mismatched_types_never_match():
    assert not evaluate([">", "heap_free", 0], INFO)
    assert not evaluate(["<", "board", 5], INFO)
    assert not evaluate(["in", "display", ["x"]], INFO)


def test_malformed_or_hostile_filters_raise_bad_filter():
    for bad in ([], "x", ["xor", 1, 2], ["==", 5, 5], ["in", "id", "sim-001"]):
        assert_raises(BadFilter, evaluate, bad, INFO)
    deep = ["==", "id", "x"]
    for _ in range(MAX_DEPTH + 2):
        deep = ["not", deep]
    assert_raises(BadFilter, evaluate, deep, INFO)
