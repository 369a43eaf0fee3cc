# Runs one firmware test function inside the MicroPython unix port:
#   micropython runner.py MODULE FUNCTION
# Prints PASS, or the traceback and exits 1. The working folder is the
# test's own empty "flash".
import sys

module_name, function_name = sys.argv[1], sys.argv[2]
module = __import__(module_name)
try:
    getattr(module, function_name)()
except Exception as e:
    sys.print_exception(e)
    print("FAIL", function_name)
    sys.exit(1)
print("PASS", function_name)
