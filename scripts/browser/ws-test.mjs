// A real browser against ShardMQ's WebSocket listener: headless Chromium (the Debian package,
// never a downloaded browser) loads a page that uses MQTT.js to connect over
// ws://127.0.0.1:WS_PORT/mqtt, subscribe, receive what a TCP client (MQTT.js in Node)
// published, and publish an answer the TCP client receives.
//
// Usage: node ws-test.mjs TCP_PORT WS_PORT
import { chromium } from "playwright-core";
import mqtt from "mqtt";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const [tcpPort, wsPort] = process.argv.slice(2).map(Number);
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
const fromBrowser = new Promise((ok) => tcp.on("message", (t, p) => ok(`${t}:${p}`)));

const profile = mkdtempSync(join(tmpdir(), "shardmq-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-default-apps",
    // Nothing but loopback resolves.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
  ],
});
try {
  const page = await context.newPage();
  page.on("console", (m) => console.log(`page: ${m.text()}`));
  await page.setContent("<!doctype html><title>ShardMQ over WebSocket</title><p id=out>waiting</p>");
  await page.addScriptTag({ path: bundle });
  // In the page: connect, subscribe, and answer the first message.
  await page.evaluate(
    ({ url, timeout }) =>
      new Promise((ok, ko) => {
        const c = window.mqtt.connect(url, { protocolVersion: 4, clientId: "in-the-browser", reconnectPeriod: 0 });
        const t = setTimeout(() => ko(new Error("no SUBACK in the page")), timeout);
        c.on("error", (e) => ko(e));
        c.on("message", (topic, payload) => {
          document.getElementById("out").textContent = `${topic}:${payload}`;
          c.publish("browser/up", `echo ${payload}`, { qos: 1 });
        });
        c.on("connect", () =>
          c.subscribe("browser/down", { qos: 1 }, (err) => {
            clearTimeout(t);
            err ? ko(err) : ok();
          }),
        );
      }),
    { url: `ws://127.0.0.1:${wsPort}/mqtt`, timeout: TIMEOUT },
  );
  await tcp.publishAsync("browser/down", "hello from tcp", { qos: 1 });
  await page.waitForFunction(() => document.getElementById("out").textContent !== "waiting", null, { timeout: TIMEOUT });
  const seen = await page.textContent("#out");
  if (seen !== "browser/down:hello from tcp") fail(`the page saw ${JSON.stringify(seen)}`);
  const echoed = await Promise.race([fromBrowser, new Promise((_, ko) => setTimeout(() => ko(new Error("no echo")), TIMEOUT))]);
  if (echoed !== "browser/up:echo hello from tcp") fail(`the TCP client saw ${JSON.stringify(echoed)}`);
  console.log("ok   browser (headless Chromium, MQTT.js) over WebSocket: received a TCP client's message and answered it");
} finally {
  await context.close();
  await tcp.endAsync();
  rmSync(profile, { recursive: true, force: true });
}
