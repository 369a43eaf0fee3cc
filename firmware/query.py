# Live queries: the host sends a filter in a compact, already parsed form
# (host/fleet/query.py), the board evaluates it over its own info without
# eval() and answers. Every board answers, matching or not, so the asker
# knows when every online board has been heard.
#
#   ["and", A, B]  ["or", A, B]  ["not", A]
#   ["==", field, value]  (also != < <= > >=)  ["in", field, [values]]
#
# A field the board does not have compares as false. Depth and size are
# bounded so a hostile filter cannot exhaust the stack or the heap.
MAX_DEPTH = 16

_COMPARE = ("==", "!=", "<", "<=", ">", ">=")


class BadFilter(Exception):
    pass


def evaluate(node, info, depth=0):
    if depth > MAX_DEPTH:
        raise BadFilter("filter nested deeper than %d" % MAX_DEPTH)
    if not isinstance(node, list) or not node:
        raise BadFilter("not a filter: %r" % (node,))
    op = node[0]
    if op == "and" and len(node) == 3:
        return evaluate(node[1], info, depth + 1) and evaluate(node[2], info, depth + 1)
    if op == "or" and len(node) == 3:
        return evaluate(node[1], info, depth + 1) or evaluate(node[2], info, depth + 1)
    if op == "not" and len(node) == 2:
        return not evaluate(node[1], info, depth + 1)
    if op == "in" and len(node) == 3 and isinstance(node[2], list):
        value = info.get(node[1])
        if isinstance(value, list):  # groups: any of them
            for item in value:
                if item in node[2]:
                    return True
            return False
        return value is not None and value in node[2]
    if op in _COMPARE and len(node) == 3 and isinstance(node[1], str):
        return _compare(op, info.get(node[1]), node[2])
    raise BadFilter("unknown operator %r" % (op,))


def _compare(op, left, right):
    if left is None:
        return False
    if op == "==":
        return left == right
    if op == "!=":
        return left != right
    number = (int, float)
    both_numbers = isinstance(left, number) and isinstance(right, number)
    both_strings = isinstance(left, str) and isinstance(right, str)
    if not (both_numbers or both_strings):
        return False  # "abc" < 5 is not an answer, it is a mismatch
    if op == "<":
        return left < right
    if op == "<=":
        return left <= right
    if op == ">":
        return left > right
    return left >= right
