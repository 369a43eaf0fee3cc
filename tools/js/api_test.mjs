// The fleet API from a client we did not write: the NATS JavaScript client.
// Usage: node api_test.mjs NATS_URL DEVICE   (prints one JSON object; tests/test_api_js.py checks it)
import { connect } from "@nats-io/transport-node";

const [url, device] = process.argv.slice(2);
const nc = await connect({ servers: url });
const out = {};
const ask = async (subject, body) => {
  const reply = await nc.request(subject, typeof body === "string" ? body : JSON.stringify(body), { timeout: 5000 });
  const code = reply.headers?.get("Nats-Service-Error-Code");
  return code ? { error: code, description: reply.headers.get("Nats-Service-Error") } : reply.json();
};

// Every gateway answers health; gather them for a second.
out.health = [];
for await (const m of await nc.requestMany("fleet-api.health", "", { strategy: "timer", maxWait: 1000 })) {
  out.health.push(m.json());
}
out.devices = (await ask("fleet-api.devices", "")).map((d) => d.id);

const [sent] = await ask("fleet-api.commands.send", { device, name: "ping" });
const deadline = Date.now() + 20000;
let command = sent;
while (!["succeeded", "failed", "rejected", "expired"].includes(command.state) && Date.now() < deadline) {
  await new Promise((r) => setTimeout(r, 100));
  command = await ask("fleet-api.commands", sent.id);
}
out.command = { id: sent.id, state: command.state, result: command.result };
out.unknown = await ask("fleet-api.commands.send", { device: "sim-999", name: "ping" });
out.config = await ask("fleet-api.config.set", { device, set: { led: true } });

// A query ends on the gateway's empty end marker, long before maxWait.
const started = Date.now();
out.query = { matches: [] };
for await (const m of await nc.requestMany("fleet-api.query", JSON.stringify({ where: "", fields: ["id"], timeout: 5 }),
                                           { strategy: "sentinel", maxWait: 20000 })) {
  if (m.data.length === 0) {
    out.query.end = Object.fromEntries(["Fleet-Matching", "Fleet-Answered", "Fleet-Online", "Fleet-Silent"]
      .map((k) => [k, m.headers?.get(k)]));
  } else {
    out.query.matches.push(m.json().id);
  }
}
out.query.seconds = (Date.now() - started) / 1000;
await nc.close();
console.log(JSON.stringify(out));
