// A real browser against ShardMQ's WebSocket listeners: headless Chromium (the Debian package,
// never a downloaded browser) loads a page that uses MQTT.js to connect over
// ws://127.0.0.1:WS_PORT/mqtt (and, when given, wss://127.0.0.1:WSS_PORT/mqtt), subscribe,
// receive what a TCP client (MQTT.js in Node) published, and publish an answer the TCP client
// receives. Over wss the browser trusts the broker's key alone (SPKI: the base64 SHA-256 of
// its public key), through Chromium's --ignore-certificate-errors-spki-list.
//
// Usage: node ws-test.mjs TCP_PORT WS_PORT [WSS_PORT SPKI]
import { chromium } from "playwright-core";
import mqtt from "mqtt";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const [tcpPort, wsPort, wssPort] = process.argv.slice(2, 5).map(Number);
const spki = process.argv[5];
const here = dirname(fileURLToPath(import.meta.url));
const bundle = join(here, "node_modules", "mqtt/dist/mqtt.min.js");
const TIMEOUT = 20000;

function fail(why) {
  console.error(`browser: FAILED: ${why}`);
  process.exit(1);
}
setTimeout(() => fail("timed out"), 60000).unref();

// The TCP side.
const tcp = mqtt.connect(`mqtt://127.0.0.1:${tcpPort}`, { protocolVersion: 4, clientId: "tcp-side" });
await new Promise((ok, ko) => { tcp.once("connect", ok); tcp.once("error", ko); });
await tcp.subscribeAsync("browser/up", { qos: 1 });
const waiting = new Map();
tcp.on("message", (t, p) => {
  const [label, text] = String(p).split("|");
  waiting.get(label)?.(`${t}:${text}`);
});

const profile = mkdtempSync(join(tmpdir(), "shardmq-chromium-"));
const args = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--no-first-run",
  "--disable-sync",
  "--disable-default-apps",
  // Nothing but loopback resolves.
  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
];
if (spki) args.push(`--ignore-certificate-errors-spki-list=${spki}`);
const context = await chromium.launchPersistentContext(profile, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  args,
});

// One exchange through the page over `url`: the page subscribes, the TCP client publishes,
// the page shows what it got and answers.
async function exchange(label, url) {
  const page = await context.newPage();
  page.on("console", (m) => console.log(`page: ${m.text()}`));
  await page.setContent("<!doctype html><title>ShardMQ over WebSocket</title><p id=out>waiting</p>");
  await page.addScriptTag({ path: bundle });
  const fromBrowser = new Promise((ok) => waiting.set(label, ok));
  // In the page: connect, subscribe, and answer the first message.
  await page.evaluate(
    ({ url, label, timeout }) =>
      new Promise((ok, ko) => {
        const c = window.mqtt.connect(url, { protocolVersion: 4, clientId: `in-the-browser-${label}`, reconnectPeriod: 0 });
        const t = setTimeout(() => ko(new Error("no SUBACK in the page")), timeout);
        c.on("error", (e) => ko(e));
        c.on("message", (topic, payload) => {
          document.getElementById("out").textContent = `${topic}:${payload}`;
          c.publish("browser/up", `${label}|echo ${payload}`, { qos: 1 });
        });
        c.on("connect", () =>
          c.subscribe(`browser/down/${label}`, { qos: 1 }, (err) => {
            clearTimeout(t);
            err ? ko(err) : ok();
          }),
        );
      }),
    { url, label, timeout: TIMEOUT },
  );
  await tcp.publishAsync(`browser/down/${label}`, "hello from tcp", { qos: 1 });
  await page.waitForFunction(() => document.getElementById("out").textContent !== "waiting", null, { timeout: TIMEOUT });
  const seen = await page.textContent("#out");
  if (seen !== `browser/down/${label}:hello from tcp`) fail(`${label}: the page saw ${JSON.stringify(seen)}`);
  const echoed = await Promise.race([fromBrowser, new Promise((_, ko) => setTimeout(() => ko(new Error(`${label}: no echo`)), TIMEOUT))]);
  if (echoed !== "browser/up:echo hello from tcp") fail(`${label}: the TCP client saw ${JSON.stringify(echoed)}`);
  console.log(`ok   browser (headless Chromium, MQTT.js) over ${label}: received a TCP client's message and answered it`);
  await page.close();
}

try {
  await exchange("WebSocket", `ws://127.0.0.1:${wsPort}/mqtt`);
  if (wssPort) await exchange("WebSocket over TLS", `wss://127.0.0.1:${wssPort}/mqtt`);
} finally {
  await context.close();
  await tcp.endAsync();
  rmSync(profile, { recursive: true, force: true });
}
