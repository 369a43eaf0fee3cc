// Runs a MicroPython script on the webassembly port (a 32-bit VM) with the
// firmware importable, as tests/test_firmware_units.py does on the unix port:
//   node heap32.mjs SCRIPT [--board sim] [--heapsize BYTES]
// The VM's virtual filesystem gets every firmware/*.py and protocol.json
// (/firmware), the board profile (/board), the fetched micropython-lib
// modules (/lib), tests/firmware's fakes (/fakes) and the shims in vm/
// (/shim: a socket module, which the port lacks). os.getenv/putenv, which
// the port lacks too, read and write a table. The script runs in /flash,
// in steps (see tools/bench/heap_device.py): STEPS, step(i), measure(i), report().
import { readdirSync, readFileSync, statSync, existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "..", "..");

const args = process.argv.slice(2);
let board = "sim";
let heapsize = 256 * 1024;
let script = null;
for (let i = 0; i < args.length; i++) {
  if (args[i] === "--board") board = args[++i];
  else if (args[i] === "--heapsize") heapsize = Number(args[++i]);
  else script = args[i];
}
if (!script) {
  console.error("usage: node heap32.mjs SCRIPT [--board sim] [--heapsize BYTES]");
  process.exit(2);
}

let failed = false;
const mp = await loadMicroPython({
  heapsize,
  stdout: (line) => console.log(line),
  stderr: (line) => { console.error(line); },
});

// Copies the files of `from` that `keep` accepts into the VM's `to`, recursing.
function copyTree(from, to, keep) {
  if (!existsSync(from)) return;
  mp.FS.mkdirTree(to);
  for (const name of readdirSync(from)) {
    const path = join(from, name);
    if (statSync(path).isDirectory()) {
      if (name !== "__pycache__") copyTree(path, `${to}/${name}`, keep);
    } else if (keep(name)) {
      mp.FS.writeFile(`${to}/${name}`, readFileSync(path));
    }
  }
}

const py = (name) => name.endsWith(".py");
copyTree(join(root, "firmware"), "/firmware", (n) => py(n) || n === "protocol.json");
copyTree(join(root, "boards", board), "/board", py);
copyTree(join(root, "build", "micropython-lib"), "/lib", py);
copyTree(join(root, "tests", "firmware"), "/fakes", (n) => n === "fakes.py");
copyTree(join(here, "vm"), "/shim", py);
mp.FS.mkdirTree("/flash");

const env = JSON.stringify(Object.fromEntries(
  Object.entries(process.env).filter(([k]) => k.startsWith("FLEET_SIM_")),
));

try {
  mp.runPython(`
import sys, os
sys.path[:0] = ["/shim", "/board", "/firmware", "/lib", "/fakes"]
_env = ${env}
os.getenv = lambda key, default=None: _env.get(key, default)
def _putenv(key, value):
    _env[key] = value
os.putenv = _putenv
del _putenv
import socket
sys.modules["usocket"] = socket  # umqtt.simple's name for it
os.chdir("/flash")
`);
  // This port collects only at its top level, between two runPython calls
  // (gc.collect() inside one only asks for it): so each step of the script
  // runs in a call of its own, and the collection and the measure in the next.
  mp.runPython("EXTERNAL_GC = True\n" + readFileSync(resolve(script), "utf8"));
  mp.runPython("import gc\ngc.collect()");
  mp.runPython("figures['baseline'] = figures['peak'] = gc.mem_alloc()");
  mp.runPython("_steps = len(STEPS)");
  const steps = mp.globals.get("_steps");
  for (let i = 0; i < steps; i++) {
    mp.runPython(`step(${i})`);
    mp.runPython("gc.collect()");
    mp.runPython(`measure(${i})`);
  }
  mp.runPython("report()");
} catch (e) {
  // A Python exception: its traceback went to stderr already.
  console.error(String(e && e.message ? e.message : e));
  failed = true;
}
process.exit(failed ? 1 : 0);
