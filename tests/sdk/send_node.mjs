#!/usr/bin/env node
// Sends events to a running Switchyard with the official, unmodified @segment/analytics-node.
//
//   node send_node.mjs HOST WRITE_KEY RUN_ID
//
// HOST is the base URL (http://127.0.0.1:PORT); the SDK posts to HOST/v1/batch. Sends one
// identify, track, page, screen, group and alias, then 20 more tracks: 26 calls. The SDK sets
// every messageId. Every call carries `context.run = RUN_ID` and `context.seq = n` (0..25), and
// the same pair in its `properties` (track, page, screen) or `traits` (identify, group); userId
// is `node-user-RUN_ID`.
//
// Prints one JSON line: {"sdk", "sent", "failed", "message_ids"} (`failed` counts messages the
// SDK gave up on or never settled). Exits 0 when the server accepted every message, 1 when the
// SDK reported any delivery error, 2 on bad usage.
import { Analytics } from "@segment/analytics-node";

const EXTRA_TRACKS = 20;

const [host, writeKey, run] = process.argv.slice(2);
if (process.argv.length !== 5) {
  console.error("usage: node send_node.mjs HOST WRITE_KEY RUN_ID");
  process.exit(2);
}

// Small retry budgets: a test wants a prompt failure, not the SDK's 12-hour default.
const analytics = new Analytics({
  writeKey,
  host,
  maxRetries: 3,
  flushAt: 15,
  flushInterval: 200,
  httpRequestTimeout: 10_000,
  maxTotalBackoffDuration: 30,
  maxRateLimitDuration: 60,
});

const userId = `node-user-${run}`;
const messageIds = [];
let seq = 0;
let settled = 0;
let failed = 0;

analytics.on("error", (err) => {
  console.error(`node: ${err.code}: ${err.reason}`);
});

const done = (err, ctx) => {
  settled += 1;
  if (err) failed += 1;
  if (ctx?.event?.messageId) messageIds.push(ctx.event.messageId);
};

const tag = () => {
  const mark = { run, seq };
  seq += 1;
  return mark;
};

let t = tag();
analytics.identify({ userId, traits: { ...t, email: `${run}@example.com` }, context: { ...t } }, done);
t = tag();
analytics.track({ userId, event: "Signed Up", properties: { ...t, plan: "pro" }, context: { ...t } }, done);
t = tag();
analytics.page({ userId, category: "Docs", name: "Home", properties: { ...t, path: "/" }, context: { ...t } }, done);
t = tag();
analytics.screen({ userId, category: "App", name: "Main", properties: { ...t }, context: { ...t } }, done);
t = tag();
analytics.group({ userId, groupId: `group-${run}`, traits: { ...t, plan: "team" }, context: { ...t } }, done);
t = tag();
analytics.alias({ userId, previousId: `anon-${run}`, context: { ...t } }, done);
for (let i = 0; i < EXTRA_TRACKS; i++) {
  t = tag();
  analytics.track(
    { userId, event: "Order Completed", properties: { ...t, revenue: i + 0.5 }, context: { ...t } },
    done,
  );
}

try {
  await analytics.closeAndFlush({ timeout: 60_000 });
} catch (err) {
  console.error(`node: closeAndFlush failed: ${err}`);
}

// Anything that never settled (closeAndFlush timed out) counts as failed too.
failed += seq - settled;
console.log(JSON.stringify({ sdk: "node", sent: seq, failed, message_ids: messageIds }));
process.exit(failed > 0 ? 1 : 0);
